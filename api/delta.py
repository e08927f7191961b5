"""What a piece of a model's answer holds, by part: the one accumulator the
whole token pipeline writes into, from the reader to the shapers."""

from __future__ import annotations

import json
import uuid
from typing import Any

import attrs


@attrs.frozen
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    @classmethod
    def from_parsed(cls, parsed: dict[str, Any]) -> ToolCall:
        name, args = parsed["name"], parsed.get("arguments", {})
        if not isinstance(name, str):
            raise ValueError("a tool call's name must be a string")
        text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        given = parsed.get("id")  # some formats carry the model's own id
        return cls(given if isinstance(given, str) else f"call_{uuid.uuid4().hex[:24]}", name, text)


@attrs.define
class Delta:
    """Text, reasoning and tool calls as the reader split them; per token,
    when asked for, ``{"id", "logprob", "top": [[id, logprob], ...]}``; and,
    on the last one, why the answer ended ("stop", "length" or "tool_calls")
    and the stop string that ended it, if one did.
    Added up (``+=``), the deltas of a generation are its whole answer."""

    text: str = ""
    reasoning: str = ""
    calls: list[ToolCall] = attrs.field(factory=list)
    logprobs: list[dict[str, Any]] = attrs.field(factory=list)
    finish: str | None = None
    stop_sequence: str | None = None  # the stop string that ended it, if one did

    def __iadd__(self, other: Delta) -> Delta:
        self.text += other.text
        self.reasoning += other.reasoning
        self.calls += other.calls
        self.logprobs += other.logprobs
        self.finish, self.stop_sequence = other.finish, other.stop_sequence
        return self

    @property
    def empty(self) -> bool:
        """Nothing to send: no part, no logprobs, no end."""
        return not (self.text or self.reasoning or self.calls or self.logprobs or self.finish)
