"""Text on the daemon's side of a model: chat template, tokenizing, detokenizing.

The runner sees only token ids; everything textual happens here, with the
model's own Hugging Face tokenizer (no MLX). Tokenizing runs in worker threads
(``trio.to_thread``); detokenizing a stream is cheap and runs inline.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from scheduler.errors import InvalidRequest


class Texts:
    """The tokenizer and text limits of one model directory."""

    def __init__(self, model_dir: Path, max_context: int | None) -> None:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        from transformers import AutoTokenizer

        self.tokenizer: Any = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        config = json.loads((model_dir / "config.json").read_text())
        self.max_context = max_context or _context_from(config, self.tokenizer)
        self.stop_ids = _stop_ids(model_dir, config, self.tokenizer)

    @property
    def backend(self) -> Tokenizer:
        return self.tokenizer.backend_tokenizer

    def chat_prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        if not self.tokenizer.chat_template:
            raise InvalidRequest(
                "this model has no chat template; use /v1/completions", param="messages"
            )
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        return self.encode(text)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def text_stream(self, stops: Sequence[str]) -> TextStream:
        return TextStream(self.backend, stops)


class TextStream:
    """Turns generated token ids into text deltas, cutting at stop strings.

    Text that might be the start of a stop string is held back until it is
    known not to be one, so a stop string never leaks into the output.
    """

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str] = ()) -> None:
        self._tokenizer = tokenizer
        self._decode = DecodeStream(skip_special_tokens=True)
        self._stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def feed(self, token: int) -> str:
        if self.stopped:
            return ""
        piece = self._decode.step(self._tokenizer, token) or ""
        if not self._stops:
            return piece
        text = self._held + piece
        hits = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return text[: min(hits)]
        keep = _longest_stop_prefix(text, self._stops)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


def _longest_stop_prefix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that begins some stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if stop.startswith(text[-n:]):
                best = n
                break
    return best


def _context_from(config: dict[str, Any], tokenizer: Any) -> int:
    for key in ("max_position_embeddings", "max_sequence_length", "n_positions", "seq_length"):
        value = config.get(key) or config.get("text_config", {}).get(key)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 10**7:
        return limit
    return 4096


def _stop_ids(model_dir: Path, config: dict[str, Any], tokenizer: Any) -> tuple[int, ...]:
    ids: set[int] = set()
    sources: list[Any] = [config.get("eos_token_id"), tokenizer.eos_token_id]
    gen_config = model_dir / "generation_config.json"
    if gen_config.is_file():
        sources.append(json.loads(gen_config.read_text()).get("eos_token_id"))
    for value in sources:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return tuple(sorted(ids))
