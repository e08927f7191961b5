"""The output of the two chat-era endpoints, whole and streamed:
``chat.completion`` (and its chunks) and ``text_completion``.

A shaper (``api.stream.Shaper``) is made per request and sees its deltas in
order; whatever a stream must remember between them (how many tool calls went
out, where the next logprob's text starts) is its state, so the stream driver
(``api/stream.py``) and the whole answer share one builder of each object. The
Responses API's shaper (``api/openai/responses.py``) and the Messages API's
(``api/anthropic/messages.py``) have the same face.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from api import sse
from api.delta import Delta, ToolCall
from api.generation import Prepared
from api.openai import logprobs
from api.record import Tokens


def usage(tokens: Tokens) -> dict[str, Any]:
    out: dict[str, Any] = {
        "prompt_tokens": tokens.prompt,
        "completion_tokens": tokens.generated,
        "total_tokens": tokens.prompt + tokens.generated,
        "prompt_tokens_details": {"cached_tokens": tokens.cached or 0},
    }
    if tokens.reasoning:
        out["completion_tokens_details"] = {"reasoning_tokens": tokens.reasoning}
    return out


class _OpenAI:
    """The envelope both endpoints share; a stream's chunks carry
    ``"usage": null`` when its usage is asked for (and then a last chunk with
    the usage and no choices)."""

    end = sse.DONE
    opens_with_usage = False

    def __init__(self, job: Prepared, prefix: str, kind: str) -> None:
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = job.model
        self.texts = job.texts
        self.logprobs = job.params.logprobs is not None
        self.tokens = job.record.tokens
        self._kind = kind
        self._usage = job.params.include_usage

    def envelope(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        out = self.envelope(self._kind, [choice])
        if self._usage:
            out["usage"] = None
        return out

    def closing(self) -> list[dict[str, Any]]:
        if not self._usage:
            return []
        return [self.envelope(self._kind, []) | {"usage": usage(self.tokens)}]

    def failed(self, status: int, error: dict[str, Any]) -> dict[str, Any]:
        return error  # a late failure is an error object in the stream

    def frame(self, event: dict[str, Any]) -> bytes:
        return sse.event(event)


class ChatShaper(_OpenAI):
    def __init__(self, job: Prepared) -> None:
        super().__init__(job, "chatcmpl", "chat.completion.chunk")
        self._calls = 0  # tool calls streamed so far: each delta's index

    def opening(self) -> list[dict[str, Any]]:
        return [self._choice({"role": "assistant", "content": ""}, Delta())]

    def events(self, d: Delta) -> list[dict[str, Any]]:
        delta: dict[str, Any] = {}
        if d.reasoning:
            delta["reasoning_content"] = d.reasoning
        if d.text:
            delta["content"] = d.text
        if d.calls:
            first = self._calls
            delta["tool_calls"] = [
                _tool_call(c) | {"index": first + i} for i, c in enumerate(d.calls)
            ]
            self._calls += len(d.calls)
        return [self._choice(delta, d)]

    def final(self, whole: Delta) -> dict[str, Any]:
        choice = {
            "index": 0,
            "message": _message(whole),
            "logprobs": self._logprobs(whole),
            "finish_reason": whole.finish,
        }
        return self.envelope("chat.completion", [choice]) | {"usage": usage(self.tokens)}

    def _choice(self, delta: dict[str, Any], d: Delta) -> dict[str, Any]:
        return self.chunk(
            {"index": 0, "delta": delta, "logprobs": self._logprobs(d), "finish_reason": d.finish}
        )

    def _logprobs(self, d: Delta) -> dict[str, Any] | None:
        return logprobs.chat(self.texts, d.logprobs) if self.logprobs else None


class CompletionShaper(_OpenAI):
    def __init__(self, job: Prepared) -> None:
        super().__init__(job, "cmpl", "text_completion")
        self._offset = 0  # where the next logprob's token starts in the text

    def opening(self) -> list[dict[str, Any]]:
        return []

    def events(self, d: Delta) -> list[dict[str, Any]]:
        return [self.chunk(self._choice(d))]

    def final(self, whole: Delta) -> dict[str, Any]:
        return self.envelope("text_completion", [self._choice(whole)]) | {
            "usage": usage(self.tokens)
        }

    def _choice(self, d: Delta) -> dict[str, Any]:
        return {
            "index": 0,
            "text": d.text,
            "logprobs": self._logprobs(d),
            "finish_reason": d.finish,
        }

    def _logprobs(self, d: Delta) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        shaped = logprobs.completion(self.texts, d.logprobs, self._offset)
        self._offset += sum(len(t) for t in shaped["tokens"])
        return shaped


def _tool_call(call: ToolCall) -> dict[str, Any]:
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }


def _message(whole: Delta) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": whole.text or None}
    if whole.reasoning:
        message["reasoning_content"] = whole.reasoning
    if whole.calls:
        message["tool_calls"] = [_tool_call(c) for c in whole.calls]
    elif message["content"] is None:
        message["content"] = ""
    return message
