"""Constrained decoding: a request's grammar as a logits processor.

llguidance compiles the grammar (a JSON schema, or "any JSON object") against
the model's tokenizer and, at every step, says which tokens keep the output a
valid prefix; the others get a logit of -inf. Building llguidance's view of the
tokenizer takes a second or two, so a runner does it on its first grammar
request only.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import llguidance
import mlx.core as mx
import numpy as np

from runner.protocol import to_llguidance


class Grammars:
    """Compiles request grammars for one model directory."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir

    @functools.cached_property
    def tokenizer(self) -> llguidance.LLTokenizer:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        import llguidance.hf
        from transformers import AutoTokenizer

        hf: Any = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
        return llguidance.hf.from_tokenizer(hf)

    def constraint(self, grammar: dict[str, Any], stop_ids: tuple[int, ...]) -> Constraint:
        """A fresh matcher for one request; ``ValueError`` if the grammar is bad."""
        matcher = llguidance.LLMatcher(self.tokenizer, to_llguidance(grammar), log_level=0)
        if matcher.is_error():
            raise ValueError(f"invalid grammar: {matcher.get_error()}")
        return Constraint(matcher, self.tokenizer.vocab_size, stop_ids)


class Constraint:
    """One request's grammar state, used as an mlx-lm logits processor.

    It is called with the tokens the request has generated so far and the
    logits for the next one. mlx-lm computes the next step's logits before it
    hands out the token just sampled, so the processor is where each token is
    first seen: ``sync`` feeds the matcher whatever it has not had yet, and is
    safe to call again with the same tokens (the engine does, to learn whether
    the grammar is complete, and a sequence moving between the single and
    batch paths shows its tokens again).
    """

    def __init__(
        self, matcher: llguidance.LLMatcher, vocab_size: int, stop_ids: tuple[int, ...]
    ) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.stop_ids = stop_ids
        self._consumed = 0

    def sync(self, tokens: Sequence[int] | mx.array, start: int = 0) -> None:
        """Feed the generated tokens (``tokens[start:]``) the matcher has not had;
        only those are sliced off and converted, so a step costs one token."""
        new = tokens[start + self._consumed :]
        ids: Sequence[int] = new.tolist() if isinstance(new, mx.array) else new  # type: ignore[assignment]
        for token in ids:
            if token in self.stop_ids:
                return  # the request ends here; a stop token is not grammar text
            if not self.matcher.consume_token(token):
                print(
                    f"grammar rejected token {token}: {self.matcher.get_error()}", file=sys.stderr
                )
            self._consumed += 1

    @property
    def done(self) -> bool:
        """Nothing may follow (or the matcher failed: it then allows nothing)."""
        return self.matcher.is_stopped()

    def __call__(self, generated: mx.array, logits: mx.array) -> mx.array:
        self.sync(generated)
        if self.matcher.is_error():
            return logits  # the engine finishes the request: ``done`` is true
        return mx.where(mx.array(self._allowed(logits.shape[-1])), logits, -mx.inf)

    def _allowed(self, width: int) -> np.ndarray:
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.zeros(width, dtype=bool)
        n = min(width, self.vocab_size)
        allowed[:n] = np.unpackbits(bits, bitorder="little")[:n]
        if self.matcher.is_accepting():
            allowed[[t for t in self.stop_ids if t < width]] = True
        return allowed
