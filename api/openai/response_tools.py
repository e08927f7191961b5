"""The tools of a Responses request, as the model is offered them and as its
calls go back to the client.

Besides plain ``function`` tools, the Responses API has:

- ``namespace`` tools, a group of functions (and custom tools) under one
  name (Codex sends its sub-agent tools so). Each is offered to the model as
  ``namespace.name``: a dot is not allowed in a function's own name, so the
  joined name can stand for no other tool. A call to it goes back as a
  ``function_call`` whose ``name`` is the function's and whose ``namespace``
  is the group's, as the openai SDK's types have it; the same item sent back
  in a later turn is written into the prompt under the joined name again, so
  the conversation's tokens do not change from turn to turn.
- ``custom`` tools, which take free text (a patch, a script) rather than
  JSON, optionally in a grammar (Lark or a regular expression). The model is
  offered a function with one string parameter, ``input``; its call goes back
  as a ``custom_tool_call`` with that text as ``input``, and the grammar
  constrains what the model may write there (``api/openai/custom_calls.py``).
- tools that OpenAI's servers run (``web_search``, ``file_search``,
  ``code_interpreter``, ``image_generation``, ``computer_use``, remote
  ``mcp``, ...): mlxd cannot run them, so they are left out of the prompt,
  with a line in the log, and the request is answered without them.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

import attrs

from api.delta import ToolCall
from scheduler.errors import InvalidRequest

log = logging.getLogger("mlxd.api")

_INPUT = "The tool's input: free text"


@attrs.frozen
class Offered:
    """A tool as the model is offered it."""

    name: str  # the function name the model calls (``namespace.name`` in a group)
    namespace: str | None = None
    custom: bool = False  # takes free text (``input``), not JSON arguments
    grammar: dict[str, Any] | None = None  # a custom tool's format: {"syntax", "definition"}

    @property
    def own_name(self) -> str:
        return self.name.removeprefix(f"{self.namespace}.") if self.namespace else self.name


@attrs.frozen
class ToolSet:
    """A request's tools: the chat-shape functions to offer, and what each is."""

    chat: list[dict[str, Any]]
    offered: dict[str, Offered]  # by the name the model calls

    @classmethod
    def from_body(cls, raw: Any) -> ToolSet:
        if raw is None:
            return cls([], {})
        if not isinstance(raw, list):
            raise InvalidRequest("'tools' must be a list", param="tools")
        chat: list[dict[str, Any]] = []
        offered: dict[str, Offered] = {}
        for i, tool in enumerate(raw):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind == "namespace":
                group = tool.get("name")
                members = tool.get("tools")
                if not isinstance(group, str) or not group or not isinstance(members, list):
                    raise InvalidRequest(
                        f"tools[{i}]: a namespace needs a 'name' and a list of 'tools'",
                        f"tools[{i}]",
                    )
                for member in members:
                    _offer(member, i, chat, offered, group)
            elif kind in ("function", "custom"):
                _offer(tool, i, chat, offered, None)
            else:
                name = tool.get("name") if isinstance(tool, dict) else None
                log.info(
                    "tools[%d] (%s%s) is left out of the prompt: mlxd does not run hosted tools",
                    i,
                    kind,
                    f" {name!r}" if name else "",
                )
        return cls(chat, offered)

    @property
    def custom(self) -> dict[str, Offered]:
        return {n: o for n, o in self.offered.items() if o.custom}

    def item(self, call: ToolCall, status: str = "completed") -> dict[str, Any]:
        """The output item for a call the model made."""
        tool = self.offered.get(call.name)
        name = tool.own_name if tool is not None else call.name
        item: dict[str, Any]
        if tool is not None and tool.custom:
            item = {"type": "custom_tool_call", "id": f"ctc_{uuid.uuid4().hex}"}
            item |= {"call_id": call.id, "name": name, "input": _custom_input(call.arguments)}
        else:
            item = {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}"}
            item |= {"call_id": call.id, "name": name, "arguments": call.arguments}
        item["status"] = status
        if tool is not None and tool.namespace:
            item["namespace"] = tool.namespace
        return item


def offered_name(item: dict[str, Any]) -> Any:
    """The name a call item (``function_call``, ``custom_tool_call``) had in
    the prompt: its namespace's too."""
    name, namespace = item.get("name"), item.get("namespace")
    if isinstance(namespace, str) and namespace and isinstance(name, str):
        return f"{namespace}.{name}"
    return name


def _offer(
    tool: Any,
    i: int,
    chat: list[dict[str, Any]],
    offered: dict[str, Offered],
    namespace: str | None,
) -> None:
    kind = tool.get("type") if isinstance(tool, dict) else None
    name = tool.get("name") if isinstance(tool, dict) else None
    if kind not in ("function", "custom") or not isinstance(name, str) or not name:
        raise InvalidRequest(
            f"tools[{i}]: each tool needs a 'type' (function or custom) and a 'name'",
            f"tools[{i}]",
        )
    full = f"{namespace}.{name}" if namespace else name
    fn: dict[str, Any] = {"name": full}
    description = tool.get("description")
    if kind == "function":
        if description is not None:
            fn["description"] = description
        for key in ("parameters", "strict"):
            if key in tool:
                fn[key] = tool[key]
        offered[full] = Offered(full, namespace)
    else:
        grammar = _custom_format(tool.get("format"), i)
        note = f"{_INPUT}." if grammar is None else f"{_INPUT}, in the {grammar['syntax']} grammar:"
        text = note if grammar is None else f"{note}\n{grammar['definition']}"
        fn["description"] = f"{description}\n\n{text}" if description else text
        fn["parameters"] = {
            "type": "object",
            "properties": {"input": {"type": "string"}},
            "required": ["input"],
            "additionalProperties": False,
        }
        offered[full] = Offered(full, namespace, custom=True, grammar=grammar)
    chat.append({"type": "function", "function": fn})


def _custom_format(fmt: Any, i: int) -> dict[str, Any] | None:
    """A custom tool's ``format``: None for free text, else its grammar."""
    if fmt is None or (isinstance(fmt, dict) and fmt.get("type") == "text"):
        return None
    if (
        not isinstance(fmt, dict)
        or fmt.get("type") != "grammar"
        or fmt.get("syntax") not in ("lark", "regex")
        or not isinstance(fmt.get("definition"), str)
    ):
        raise InvalidRequest(
            f"tools[{i}].format must be text, or a grammar with syntax 'lark' or 'regex' "
            "and its 'definition'",
            f"tools[{i}]",
        )
    return {"syntax": fmt["syntax"], "definition": fmt["definition"]}


def _custom_input(arguments: str) -> str:
    """A custom tool's text, from the call's JSON arguments."""
    try:
        parsed = json.loads(arguments)
    except (ValueError, RecursionError):
        return arguments
    if isinstance(parsed, dict) and isinstance(parsed.get("input"), str):
        return parsed["input"]
    return arguments
