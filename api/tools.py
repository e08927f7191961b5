"""Function tools: the request's ``tools`` and ``tool_choice``, and the grammar
that makes a model call one when the request requires it.

Tools reach the model through its own chat template; its calls are read back
by ``api.reader``. ``tool_choice`` "none" leaves the tools out of the prompt;
"required" or a named function constrains the output to one call in the
model's format, by the same llguidance mask as structured output. That needs
a format whose calls are JSON between markers (``json_tools``: Qwen, Hermes
and most others); for other formats it is refused with a 400.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import attrs

from api.texts import Markers
from scheduler.errors import InvalidRequest

_FORCEABLE = {"json_tools"}


@attrs.frozen
class ToolChoice:
    mode: str = "auto"  # "auto", "none", "required" or "function"
    name: str | None = None  # the function, for mode "function"


def tools_field(body: Mapping[str, Any]) -> tuple[dict[str, Any], ...]:
    """``tools``, as OpenAI's chat API sends them, each checked."""
    raw = body.get("tools")
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise InvalidRequest("'tools' must be a list of function tools", param="tools")
    out = []
    for i, tool in enumerate(raw):
        where = f"tools[{i}]"
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise InvalidRequest(
                f"'{where}' must be {{'type': 'function', 'function': {{...}}}}", param=where
            )
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InvalidRequest(f"'{where}.function.name' must be a string", param=where)
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise InvalidRequest(f"'{where}.function.parameters' must be a JSON schema", where)
        out.append({"type": "function", "function": {**fn, "parameters": params}})
    return tuple(out)


def tool_choice_field(body: Mapping[str, Any], tools: tuple[dict[str, Any], ...]) -> ToolChoice:
    raw = body.get("tool_choice")
    if raw is None:
        return ToolChoice("auto" if tools else "none")
    if raw in ("auto", "none", "required"):
        choice = ToolChoice(raw)
    elif isinstance(raw, dict) and raw.get("type") == "function":
        # chat nests the name under "function"; responses puts it beside "type"
        fn = raw.get("function")
        name = fn.get("name") if isinstance(fn, dict) else raw.get("name")
        if not isinstance(name, str) or name not in {t["function"]["name"] for t in tools}:
            raise InvalidRequest(f"'tool_choice' names no tool in 'tools': {name!r}", "tool_choice")
        choice = ToolChoice("function", name)
    else:
        raise InvalidRequest(
            "'tool_choice' must be 'auto', 'none', 'required' or a function", "tool_choice"
        )
    if choice.mode in ("required", "function") and not tools:
        raise InvalidRequest(f"'tool_choice' {raw!r} needs 'tools'", param="tool_choice")
    return choice


def forced_call(
    markers: Markers, tools: tuple[dict[str, Any], ...], choice: ToolChoice
) -> dict[str, Any] | None:
    """The runner grammar that forces one call, or ``None`` when nothing is forced."""
    if choice.mode not in ("required", "function"):
        return None
    if markers.tool is None or markers.tool_format not in _FORCEABLE:
        raise InvalidRequest(
            f"tool_choice {choice.mode!r} cannot be enforced for this model: its tool-call "
            f"format ({markers.tool_format or 'none'}) is not one mlxd can constrain",
            param="tool_choice",
        )
    fns = [t["function"] for t in tools if choice.name in (None, t["function"]["name"])]
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": fn["name"]}, "arguments": fn["parameters"]},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for fn in fns
    ]
    schema = {"anyOf": calls, "x-guidance": {"whitespace_flexible": False}}
    start, end = markers.tool
    lark = f"start: {json.dumps(start + chr(10))} call {json.dumps(chr(10) + end)}\n"
    return {"type": "lark", "lark": lark + f"call: %json {json.dumps(schema)}\n"}
