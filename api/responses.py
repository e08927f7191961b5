"""The Responses API (``POST /v1/responses``): its request turned into a chat
request, and its output shaped as the official clients parse it.

A Responses request is validated by turning it into a chat-completions body
and handing that to ``ChatRequest.from_openai``, so both endpoints accept and
refuse the same things. The output is one assistant message item; the stream
is the typed event sequence of OpenAI's API, each event with a
``sequence_number``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from api.generation import Delta, Usage
from api.schemas import ChatRequest, json_object
from scheduler.errors import InvalidRequest

_PASSED = ("model", "temperature", "top_p", "stream", "keep_alive", "seed", "top_k", "min_p")
_TEXT_PARTS = {"input_text", "output_text", "text"}
_RENAMED = {
    "max_tokens": "max_output_tokens",
    "messages": "input",
    "response_format": "text.format",
}


def chat_request(body: Any) -> ChatRequest:
    body = json_object(body)
    for key in ("previous_response_id", "conversation"):
        if body.get(key) is not None:
            raise InvalidRequest(
                f"'{key}' is not supported: mlxd stores no responses; send the whole input",
                param=key,
            )
    if body.get("tools"):
        raise InvalidRequest("'tools' are not supported yet", param="tools")
    text = body.get("text")
    if text is not None and not isinstance(text, dict):
        raise InvalidRequest("'text' must be an object", param="text")
    messages = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise InvalidRequest("'instructions' must be a string", param="instructions")
        messages.append({"role": "system", "content": instructions})
    messages += _input_messages(body.get("input"))
    chat: dict[str, Any] = {k: body[k] for k in _PASSED if k in body}
    chat["messages"] = messages
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    if text is not None and text.get("format") is not None:
        chat["response_format"] = text["format"]
    try:
        return ChatRequest.from_openai(chat)
    except InvalidRequest as e:
        e.param = _RENAMED.get(e.param or "", e.param)
        raise


def _input_messages(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise InvalidRequest("'input' must be a string or a non-empty list of items", "input")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise InvalidRequest(f"input[{i}] must be an object", param="input")
        kind = item.get("type", "message")
        if kind != "message":
            raise InvalidRequest(
                f"input[{i}]: items of type {kind!r} are not supported yet", "input"
            )
        content = item.get("content")
        if isinstance(content, list):
            texts: list[str] = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") not in _TEXT_PARTS:
                    raise InvalidRequest(f"input[{i}]: only text content is supported", "input")
                if not isinstance(part.get("text"), str):
                    raise InvalidRequest(f"input[{i}]: a text part needs 'text'", param="input")
                texts.append(part["text"])
            content = "".join(texts)
        out.append({"role": item.get("role"), "content": content})
    return out


class Shaper:
    """Builds the response object and the stream's events for one request."""

    def __init__(self, model: str, req: ChatRequest, body: dict[str, Any]) -> None:
        self.id = f"resp_{uuid.uuid4().hex}"
        self.item_id = f"msg_{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.req = req
        self.body = body
        self.seq = 0

    def message(self, text: str, status: str) -> dict[str, Any]:
        content = [] if status == "in_progress" else [_text_part(text)]
        return {
            "type": "message",
            "id": self.item_id,
            "status": status,
            "role": "assistant",
            "content": content,
        }

    def response(
        self, status: str, output: list[dict[str, Any]], usage: Usage | None, **extra: Any
    ) -> dict[str, Any]:
        p = self.req.params
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
            "tools": [],
            "tool_choice": self.body.get("tool_choice") or "auto",
            "parallel_tool_calls": True,
            "text": {"format": (self.body.get("text") or {}).get("format") or {"type": "text"}},
            "error": None,
            "incomplete_details": None,
            "usage": _usage(usage) if usage is not None else None,
            **extra,
        }

    def final(self, text: str, finish: str | None, usage: Usage) -> dict[str, Any]:
        if finish == "length":
            return self.response(
                "incomplete",
                [self.message(text, "incomplete")],
                usage,
                incomplete_details={"reason": "max_output_tokens"},
            )
        return self.response("completed", [self.message(text, "completed")], usage)

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        self.seq += 1
        return {"type": kind, "sequence_number": self.seq - 1, **fields}

    async def events(
        self, first: Delta, more: Callable[[], Any], usage: Usage
    ) -> AsyncIterator[dict[str, Any]]:
        """The stream, from the first delta on; ``more()`` awaits the next one
        (``None`` at the end)."""
        where = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        start = self.response("in_progress", [], None)
        yield self.event("response.created", response=start)
        yield self.event("response.in_progress", response=start)
        yield self.event(
            "response.output_item.added", output_index=0, item=self.message("", "in_progress")
        )
        yield self.event("response.content_part.added", **where, part=_text_part(""))
        parts: list[str] = []
        d: Delta | None = first
        finish = None
        while d is not None:
            if d.text:
                parts.append(d.text)
                yield self.event("response.output_text.delta", **where, delta=d.text, logprobs=[])
            finish = d.finish
            d = None if d.finish else await more()
        text = "".join(parts)
        yield self.event("response.output_text.done", **where, text=text, logprobs=[])
        yield self.event("response.content_part.done", **where, part=_text_part(text))
        final = self.final(text, finish, usage)
        yield self.event("response.output_item.done", output_index=0, item=final["output"][0])
        kind = "response.completed" if final["status"] == "completed" else "response.incomplete"
        yield self.event(kind, response=final)

    def failed(self, error: dict[str, Any]) -> dict[str, Any]:
        info = error["error"]
        failed = self.response(
            "failed",
            [],
            None,
            error={"code": info["code"] or "server_error", "message": info["message"]},
        )
        return self.event("response.failed", response=failed)


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _usage(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }
