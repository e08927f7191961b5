"""A cap on a request's reasoning: after so many tokens of it, the model's
end-of-reasoning marker is forced, and the answer proper begins.

Anthropic's ``thinking.budget_tokens`` asks for this. A thinking model
writes its reasoning between markers (``<think>`` … ``</think>``); the
template may open the block in the prompt. The budget is an mlx-lm logits
processor, like the grammar, seeing the tokens the request has generated:
it follows whether the model is inside a block, counts the tokens there,
and once the count reaches the budget lets only the marker's next token
through, until the marker is written.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx


class ReasoningBudget:
    def __init__(self, tokens: int, start: list[int], end: list[int], opened: bool) -> None:
        self.tokens = tokens
        self.start, self.end = start, end
        self.inside = opened
        self.spent = 0  # tokens of the open block so far
        self._seen: list[int] = []

    @classmethod
    def from_option(cls, option: dict[str, Any]) -> ReasoningBudget:
        start, end = [int(t) for t in option["start"]], [int(t) for t in option["end"]]
        if not end:
            raise ValueError("a reasoning budget needs the end marker's tokens")
        return cls(int(option["tokens"]), start, end, bool(option.get("open")))

    def _follow(self, tokens: list[int]) -> None:
        for token in tokens:
            self._seen.append(token)
            if self.inside:
                self.spent += 1
                if self._seen[-len(self.end) :] == self.end:
                    self.inside = False
            elif self.start and self._seen[-len(self.start) :] == self.start:
                self.inside, self.spent = True, 0

    def forced(self) -> int | None:
        """The token that must come next, if the budget is spent."""
        if not self.inside or self.spent < self.tokens:
            return None
        for k in range(len(self.end) - 1, 0, -1):  # the part of the marker already written
            if self._seen[-k:] == self.end[:k]:
                return self.end[k]
        return self.end[0]

    def __call__(self, generated: mx.array, logits: mx.array) -> mx.array:
        new: list[int] = generated[len(self._seen) :].tolist()  # type: ignore[assignment]
        self._follow(new)
        token = self.forced()
        if token is None:
            return logits
        only = mx.arange(logits.shape[-1]) == token
        return mx.where(only, logits, -mx.inf)
