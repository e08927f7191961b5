"""The Responses API (``POST /v1/responses``): its request turned into a chat
request, and its output shaped as the official clients parse it.

A Responses request is validated by turning it into a chat-completions body
and handing that to ``ChatRequest.from_openai``, so both endpoints accept and
refuse the same things. The output is a list of items (reasoning, a message,
function calls); the stream is the typed event sequence of OpenAI's API, each
event with a ``sequence_number``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from api import sse
from api.conversation import Turn
from api.delta import Delta
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


def chat_request(body: Any, turn: Turn | None = None) -> ChatRequest:
    """The chat request for a Responses body; with ``turn``, its input is
    the turn's (references resolved) after the conversation it continues."""
    body = json_object(body)
    if body.get("conversation") is not None:
        raise InvalidRequest(
            "'conversation' is not supported: continue a response with 'previous_response_id'",
            param="conversation",
        )
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
        messages += _input_messages(turn.context)
    messages += _input_messages(turn.items if turn is not None else body.get("input"))
    chat: dict[str, Any] = {k: body[k] for k in _PASSED if k in body}
    chat["messages"] = messages
    if body.get("tools") is not None:
        chat["tools"] = _tools(body["tools"])
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
        return ChatRequest.from_openai(chat)
    except InvalidRequest as e:
        param = e.param or ""
        if param.startswith("messages["):
            e.param = "input" + param.removeprefix("messages")
        else:
            e.param = _RENAMED.get(param, e.param)
        raise


def _tools(raw: Any) -> Any:
    """Responses' flat function tools in the chat shape."""
    if not isinstance(raw, list):
        return raw  # refused by the chat check
    out = []
    for i, tool in enumerate(raw):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise InvalidRequest(
                f"tools[{i}]: only function tools are supported, not {kind!r}", param="tools"
            )
        fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
        out.append({"type": "function", "function": fn})
    return out


def _input_messages(value: Any) -> list[dict[str, Any]]:
    """Input items as chat messages: a run of function calls becomes one
    assistant message with ``tool_calls``; their outputs become tool messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise InvalidRequest("'input' must be a string or a non-empty list of items", "input")
    if len(value) > MAX_MESSAGES:
        raise InvalidRequest(f"'input' may hold at most {MAX_MESSAGES} items", "input")
    out: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise InvalidRequest(f"input[{i}] must be an object", param="input")
        kind = item.get("type", "message")
        if kind == "message":
            out.append({"role": item.get("role"), "content": _text(item.get("content"), i)})
        elif kind == "function_call":
            call = {
                "id": item.get("call_id"),
                "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")},
            }
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls"):
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            content = output if isinstance(output, str) else _text(output, i)
            out.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": content})
        elif kind != "reasoning":  # earlier reasoning is left out of the prompt
            raise InvalidRequest(f"input[{i}]: items of type {kind!r} are not supported", "input")
    return out


def _text(content: Any, i: int) -> Any:
    if not isinstance(content, list):
        return content  # a string, or refused by the chat check
    texts: list[str] = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") not in _TEXT_PARTS:
            raise InvalidRequest(f"input[{i}]: only text content is supported", "input")
        if not isinstance(part.get("text"), str):
            raise InvalidRequest(f"input[{i}]: a text part needs 'text'", param="input")
        texts.append(part["text"])
    return "".join(texts)


class ResponseShaper:
    """Builds the response object and the stream's events for one request
    (the face of ``api.shapers.Shaper``).

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
    ) -> None:
        self.keep = keep  # stores the finished response (``api/conversation.py``)
        self.id = f"resp_{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.req = req
        self.body = body
        self.tokens = tokens
        self.seq = 0
        self.summary = (self.body.get("reasoning") or {}).get("summary") is not None
        self._items = _Items(self.summary)  # a stream's
        self._finish: str | None = None

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
            "tools": [_flat_tool(t) for t in self.req.tools],
            "tool_choice": (
                {"type": "function", "name": choice.name} if choice.name else choice.mode
            ),
            "parallel_tool_calls": self.req.parallel_tool_calls,
            "text": {"format": (self.body.get("text") or {}).get("format") or {"type": "text"}},
            "error": None,
            "incomplete_details": None,
            "usage": _usage(tokens) if tokens is not None else None,
            "store": self.keep is not None,
            "previous_response_id": self.body.get("previous_response_id"),
            **extra,
        }

    def final(self, whole: Delta) -> dict[str, Any]:
        items = _Items(self.summary)
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

    def __init__(self, summary: bool = False) -> None:
        self.done: list[dict[str, Any]] = []
        self._open: dict[str, Any] | None = None
        self._text = ""
        # Reasoning as its summary too, when the request asks for one: mlxd's
        # models summarise nothing, so the summary is the reasoning itself.
        self._summary = summary

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
            item = {
                "type": "function_call",
                "id": f"fc_{uuid.uuid4().hex}",
                "call_id": call.id,
                "name": call.name,
                "arguments": call.arguments,
                "status": "completed",
            }
            where = {"item_id": item["id"], "output_index": len(self.done)}
            events += [
                (
                    "response.output_item.added",
                    {
                        "output_index": len(self.done),
                        "item": item | {"arguments": "", "status": "in_progress"},
                    },
                ),
                ("response.function_call_arguments.delta", where | {"delta": call.arguments}),
                ("response.function_call_arguments.done", where | {"arguments": call.arguments}),
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
            return self._open | {"summary": summary, "content": content, "status": status}
        content = [] if started else [_text_part(self._text)]
        return self._open | {"status": status, "role": "assistant", "content": content}


def _flat_tool(tool: dict[str, Any]) -> dict[str, Any]:
    fn = tool["function"]
    return {"type": "function", "strict": None, **fn}


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
