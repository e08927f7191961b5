"""The Responses API (``POST /v1/responses``): its request turned into a chat
request, and its output shaped as the official clients parse it.

A Responses request is validated by turning it into a chat-completions body
and handing that to ``ChatRequest.from_openai``, so both endpoints accept and
refuse the same things. The output is a list of items (reasoning, a message,
function calls); the stream is the typed event sequence of OpenAI's API, each
event with a ``sequence_number``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from api import sse
from api.delta import Delta
from api.openai.response_tools import ToolSet, offered_name
from api.openai.seal import Sealer
from api.openai.turns import Turn, conversation_id
from api.record import Tokens
from api.schemas import MAX_MESSAGES, ChatRequest, json_object
from scheduler.errors import InvalidRequest

_PASSED = (
    "model",
    "temperature",
    "top_p",
    "stream",
    "keep_alive",
    "seed",
    "top_k",
    "min_p",
    "tool_choice",
    "thinking",
    "parallel_tool_calls",
)
_TEXT_PARTS = {"input_text", "output_text", "text"}
SUMMARIES = ("auto", "concise", "detailed")
_RENAMED = {
    "max_tokens": "max_output_tokens",
    "messages": "input",
    "response_format": "text.format",
    "reasoning_effort": "reasoning.effort",
}


def chat_request(
    body: Any, turn: Turn | None = None, sealer: Sealer | None = None
) -> tuple[ChatRequest, ToolSet]:
    """The chat request for a Responses body, and its tools; with ``turn``,
    its input is the turn's (references resolved) after the conversation it
    continues. ``sealer`` opens reasoning the client kept for mlxd."""
    body = json_object(body)
    text = body.get("text")
    if text is not None and not isinstance(text, dict):
        raise InvalidRequest("'text' must be an object", param="text")
    messages = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise InvalidRequest("'instructions' must be a string", param="instructions")
        messages.append({"role": "system", "content": instructions})
    if turn is not None and turn.context:
        messages += _input_messages(turn.context, sealer)
    messages += _input_messages(turn.items if turn is not None else body.get("input"), sealer)
    tools = ToolSet.from_body(body.get("tools"))
    chat: dict[str, Any] = {k: body[k] for k in _PASSED if k in body}
    chat["messages"] = messages
    if body.get("tools") is not None:
        chat["tools"] = tools.chat
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    if text is not None and text.get("format") is not None:
        chat["response_format"] = text["format"]
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and reasoning.get("effort") is not None:
        chat["reasoning_effort"] = reasoning["effort"]
    if isinstance(reasoning, dict) and reasoning.get("summary") not in (None, *SUMMARIES):
        raise InvalidRequest(
            "'reasoning.summary' must be 'auto', 'concise' or 'detailed'", "reasoning.summary"
        )
    try:
        req = ChatRequest.from_openai(chat)
    except InvalidRequest as e:
        param = e.param or ""
        if param.startswith("messages["):
            e.param = "input" + param.removeprefix("messages")
        else:
            e.param = _RENAMED.get(param, e.param)
        raise
    custom = tuple((name, tool.grammar) for name, tool in tools.custom.items() if tool.grammar)
    return attrs.evolve(req, custom_grammars=custom), tools


def _input_messages(value: Any, sealer: Sealer | None) -> list[dict[str, Any]]:
    """Input items as chat messages: a run of calls becomes one assistant
    message with ``tool_calls``; their outputs become tool messages; the
    reasoning before an assistant turn goes with it (``reasoning_content``)."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise InvalidRequest("'input' must be a string or a non-empty list of items", "input")
    if len(value) > MAX_MESSAGES:
        raise InvalidRequest(f"'input' may hold at most {MAX_MESSAGES} items", "input")
    out: list[dict[str, Any]] = []
    thought = ""  # reasoning waiting for the assistant turn it belongs to
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise InvalidRequest(f"input[{i}] must be an object", param="input")
        kind = item.get("type", "message")
        message: dict[str, Any] | None = None
        if kind == "message":
            message = {"role": item.get("role"), "content": _text(item.get("content"), i)}
        elif kind in ("function_call", "custom_tool_call"):
            arguments = item.get("arguments", "{}")
            if kind == "custom_tool_call":
                arguments = json.dumps({"input": item.get("input", "")}, ensure_ascii=False)
            call = {
                "id": item.get("call_id"),
                "type": "function",
                "function": {"name": offered_name(item), "arguments": arguments},
            }
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls") and not thought:
                out[-1]["tool_calls"].append(call)
            else:
                message = {"role": "assistant", "content": None, "tool_calls": [call]}
        elif kind in ("function_call_output", "custom_tool_call_output"):
            output = item.get("output")
            content = output if isinstance(output, str) else _text(output, i)
            message = {"role": "tool", "tool_call_id": item.get("call_id"), "content": content}
        elif kind == "reasoning":
            thought += _reasoning(item, sealer)
        else:
            raise InvalidRequest(f"input[{i}]: items of type {kind!r} are not supported", "input")
        if message is None:
            continue
        if message["role"] == "assistant" and thought:
            message["reasoning_content"] = thought
        if message["role"] != "system":
            thought = ""
        out.append(message)
    return out


def check_items(items: list[dict[str, Any]]) -> None:
    """Refuse items that could not be a request's input (``InvalidRequest``)."""
    _input_messages(items, None)


def _reasoning(item: dict[str, Any], sealer: Sealer | None) -> str:
    """A reasoning item's text: its content, or what mlxd sealed for the client."""
    parts = item.get("content")
    if isinstance(parts, list):
        texts = [p.get("text") for p in parts if isinstance(p, dict)]
        if any(isinstance(t, str) and t for t in texts):
            return "".join(t for t in texts if isinstance(t, str))
    if sealer is not None and item.get("encrypted_content") is not None:
        return sealer.open(item["encrypted_content"]) or ""
    return ""


def _text(content: Any, i: int) -> Any:
    """An item's content as a chat message's: its text joined, or, with
    images (``input_image``: a data: URI, or an http(s) URL), the chat's
    parts in their order."""
    if not isinstance(content, list):
        return content  # a string, or refused by the chat check
    parts: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "input_image":
            url = part.get("image_url")
            if url is None:
                raise InvalidRequest(
                    f"input[{i}]: an input_image needs its 'image_url' (a data: URI)", "input"
                )
            parts.append({"type": "image_url", "image_url": {"url": url}})
            continue
        if kind not in _TEXT_PARTS:
            raise InvalidRequest(f"input[{i}]: only text and image content is supported", "input")
        if not isinstance(part.get("text"), str):
            raise InvalidRequest(f"input[{i}]: a text part needs 'text'", param="input")
        parts.append({"type": "text", "text": part["text"]})
    if any(p["type"] == "image_url" for p in parts):
        return parts
    return "".join(p["text"] for p in parts)


class ResponseShaper:
    """Builds the response object and the stream's events for one request
    (the face of ``api.openai.chat.Shaper``).

    The output is a list of items in the order the model produced them: a
    reasoning item, a message, function calls."""

    end = b""  # the stream ends with its response.completed (or incomplete) event
    opens_with_usage = False

    def __init__(
        self,
        model: str,
        req: ChatRequest,
        body: Mapping[str, Any],
        tokens: Tokens,
        keep: Callable[[dict[str, Any]], None] | None = None,
        tools: ToolSet | None = None,
        sealer: Sealer | None = None,
    ) -> None:
        self.keep = keep  # stores the finished response (``api/openai/turns.py``)
        self.id = f"resp_{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.req = req
        self.body = body
        self.tokens = tokens
        self.seq = 0
        self.summary = (self.body.get("reasoning") or {}).get("summary") is not None
        include = body.get("include")
        wants_sealed = isinstance(include, list) and "reasoning.encrypted_content" in include
        self._tools, self._sealer = tools or ToolSet([], {}), sealer if wants_sealed else None
        self._items = self._new_items()  # a stream's
        self._finish: str | None = None
        self.conversation = conversation_id(body.get("conversation"))

    def _new_items(self) -> _Items:
        return _Items(self.summary, self._tools, self._sealer)

    def response(
        self, status: str, output: list[dict[str, Any]], tokens: Tokens | None, **extra: Any
    ) -> dict[str, Any]:
        p = self.req.params
        choice = self.req.tool_choice
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": self.model,
            "output": output,
            "instructions": self.body.get("instructions"),
            "max_output_tokens": p.max_tokens,
            "temperature": p.sampling.temperature,
            "top_p": p.sampling.top_p,
            "tools": self.body.get("tools") or [],
            "tool_choice": (
                {"type": "function", "name": choice.name} if choice.name else choice.mode
            ),
            "parallel_tool_calls": self.req.parallel_tool_calls,
            "text": {"format": (self.body.get("text") or {}).get("format") or {"type": "text"}},
            "error": None,
            "incomplete_details": None,
            "usage": _usage(tokens) if tokens is not None else None,
            "store": self.body.get("store", True) is not False,
            "previous_response_id": self.body.get("previous_response_id"),
            "conversation": {"id": self.conversation} if self.conversation else None,
            **extra,
        }

    def final(self, whole: Delta) -> dict[str, Any]:
        items = self._new_items()
        items.add(whole)
        return self._finished(items.close(whole.finish), whole.finish)

    def _finished(self, output: list[dict[str, Any]], finish: str | None) -> dict[str, Any]:
        if finish == "length":
            done = self.response(
                "incomplete",
                output,
                self.tokens,
                incomplete_details={"reason": "max_output_tokens"},
            )
        else:
            done = self.response("completed", output, self.tokens)
        if self.keep is not None:
            self.keep(done)
        return done

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        self.seq += 1
        return {"type": kind, "sequence_number": self.seq - 1, **fields}

    def frame(self, event: dict[str, Any]) -> bytes:
        return sse.typed(event)

    def opening(self) -> list[dict[str, Any]]:
        start = self.response("in_progress", [], None)
        return [
            self.event("response.created", response=start),
            self.event("response.in_progress", response=start),
        ]

    def events(self, d: Delta) -> list[dict[str, Any]]:
        self._finish = d.finish
        return [self.event(kind, **fields) for kind, fields in self._items.add(d)]

    def closing(self) -> list[dict[str, Any]]:
        finish = self._finish
        out = [self.event(kind, **fields) for kind, fields in self._items.closing(finish)]
        final = self._finished(self._items.done, finish)
        kind = "response.completed" if final["status"] == "completed" else "response.incomplete"
        return [*out, self.event(kind, response=final)]

    def failed(self, status: int, error: dict[str, Any]) -> dict[str, Any]:
        info = error["error"]
        failed = self.response(
            "failed",
            [],
            None,
            error={"code": info["code"] or "server_error", "message": info["message"]},
        )
        return self.event("response.failed", response=failed)


Event = tuple[str, dict[str, Any]]


class _Items:
    """The output items, opened and closed as the parts of the output arrive;
    ``add`` and ``closing`` return the stream events that go with that."""

    def __init__(self, summary: bool, tools: ToolSet, sealer: Sealer | None) -> None:
        self.done: list[dict[str, Any]] = []
        self._open: dict[str, Any] | None = None
        self._text = ""
        # Reasoning as its summary too, when the request asks for one: mlxd's
        # models summarise nothing, so the summary is the reasoning itself.
        self._summary = summary
        self._tools = tools  # what each call is (a namespace's function, a custom tool)
        self._sealer = sealer  # seals reasoning for a client that keeps it (encrypted_content)

    def add(self, d: Delta) -> list[Event]:
        events: list[Event] = []
        if d.reasoning:
            events += self._ensure("reasoning")
            kind = "summary_text" if self._summary else "text"
            events.append(self._delta(f"response.reasoning_{kind}.delta", d.reasoning))
        if d.text:
            events += self._ensure("message")
            events.append(self._delta("response.output_text.delta", d.text, logprobs=[]))
        for call in d.calls:
            events += self._close("completed")
            item = self._tools.item(call)
            where = {"item_id": item["id"], "output_index": len(self.done)}
            if item["type"] == "custom_tool_call":
                text, started = item["input"], item | {"input": "", "status": "in_progress"}
                deltas = [
                    ("response.custom_tool_call_input.delta", where | {"delta": text}),
                    ("response.custom_tool_call_input.done", where | {"input": text}),
                ]
            else:
                text, started = item["arguments"], item | {"arguments": "", "status": "in_progress"}
                deltas = [
                    ("response.function_call_arguments.delta", where | {"delta": text}),
                    ("response.function_call_arguments.done", where | {"arguments": text}),
                ]
            events += [
                ("response.output_item.added", {"output_index": len(self.done), "item": started}),
                *deltas,
                ("response.output_item.done", {"output_index": len(self.done), "item": item}),
            ]
            self.done.append(item)
        return events

    def close(self, finish: str | None) -> list[dict[str, Any]]:
        self.closing(finish)
        return self.done

    def closing(self, finish: str | None) -> list[Event]:
        events = []
        if not self.done and self._open is None:
            events = self._ensure("message")  # an empty answer is still a message
        return events + self._close("incomplete" if finish == "length" else "completed")

    def _ensure(self, kind: str) -> list[Event]:
        if self._open is not None and self._open["type"] == kind:
            return []
        events = self._close("completed")
        prefix = "rs" if kind == "reasoning" else "msg"
        self._open = {"type": kind, "id": f"{prefix}_{uuid.uuid4().hex}"}
        self._text = ""
        events.append(
            (
                "response.output_item.added",
                {"output_index": len(self.done), "item": self._item("in_progress")},
            )
        )
        if kind == "message":
            events.append(("response.content_part.added", self._where() | {"part": _text_part("")}))
        elif self._summary:
            part = {"part": {"type": "summary_text", "text": ""}}
            events.append(("response.reasoning_summary_part.added", self._where() | part))
        return events

    def _delta(self, kind: str, text: str, **extra: Any) -> Event:
        self._text += text
        return kind, self._where() | {"delta": text, **extra}

    def _close(self, status: str) -> list[Event]:
        if self._open is None:
            return []
        text, item = self._text, self._item(status)
        if self._open["type"] == "reasoning" and self._summary:
            part = {"part": {"type": "summary_text", "text": text}}
            events = [
                ("response.reasoning_summary_text.done", self._where() | {"text": text}),
                ("response.reasoning_summary_part.done", self._where() | part),
            ]
        elif self._open["type"] == "reasoning":
            events = [("response.reasoning_text.done", self._where() | {"text": text})]
        else:
            events = [
                ("response.output_text.done", self._where() | {"text": text, "logprobs": []}),
                ("response.content_part.done", self._where() | {"part": _text_part(text)}),
            ]
        events.append(("response.output_item.done", {"output_index": len(self.done), "item": item}))
        self.done.append(item)
        self._open = None
        return events

    def _where(self) -> dict[str, Any]:
        assert self._open is not None
        where = {"item_id": self._open["id"], "output_index": len(self.done)}
        if self._open["type"] == "reasoning" and self._summary:
            return where | {"summary_index": 0}
        return where | {"content_index": 0}

    def _item(self, status: str) -> dict[str, Any]:
        assert self._open is not None
        started = status == "in_progress"
        if self._open["type"] == "reasoning":
            content = [] if started else [{"type": "reasoning_text", "text": self._text}]
            summary = (
                [{"type": "summary_text", "text": self._text}] if content and self._summary else []
            )
            item = self._open | {"summary": summary, "content": content, "status": status}
            if self._sealer is not None and not started:
                item["encrypted_content"] = self._sealer.seal(self._text)
            return item
        content = [] if started else [_text_part(self._text)]
        return self._open | {"status": status, "role": "assistant", "content": content}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _usage(tokens: Tokens) -> dict[str, Any]:
    return {
        "input_tokens": tokens.prompt,
        "input_tokens_details": {
            "cached_tokens": tokens.cached or 0,
            "cache_write_tokens": tokens.written,
        },
        "output_tokens": tokens.generated,
        "output_tokens_details": {"reasoning_tokens": tokens.reasoning},
        "total_tokens": tokens.prompt + tokens.generated,
    }
