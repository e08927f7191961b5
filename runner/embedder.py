"""Embedding for one loaded model, inside its runner process.

The model is mlx-embeddings' (BERT-family encoders, Qwen3-Embedding and the
rest it knows), loaded from a Hugging Face directory as it is: that library
holds each architecture's pooling and normalisation, so mlxd writes no
encoder of its own. It is imported only when a runner loads an embedding
model (about 2.5 s), never by a spare waiting for a chat model.

The daemon sends token ids (it tokenizes; special tokens included). An
``embed`` command is answered at once, between decoding steps of nothing: an
embedding runner has no streams, so ``active`` is always 0 and the runner's
loop only ever blocks for the next command. Its inputs are sorted by length
and read in batches of at most ``BATCH_TOKENS`` padded tokens, each input
padded on the right with an attention mask, so a vector does not depend on
what shares its batch (the tests check it against the input alone).

What the runner loop asks of an engine is here too (``warm_up``, ``stats``,
``cancel``, ``reset``, ``recover``, ``prefixes``), so the loop needs no second
shape; ``add`` refuses, so a generate request to an embedding model fails alone.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from runner.protocol import Generate
from runner.steps import Hit, Output, Stats

log = logging.getLogger("mlxd.runner")

BATCH_TOKENS = 4096  # padded tokens read at once (scheduler/memory.py charges this much)


class Embedder:
    prefixes = None  # no KV to keep: nothing is generated
    chunk = 0

    def __init__(self, model: Any, max_length: int) -> None:
        self.model = model
        self.max_length = max_length
        self.stats = Stats()

    @classmethod
    def load(cls, model_dir: Path) -> Embedder:
        import json

        from mlx_embeddings.utils import load_model

        model = load_model(model_dir, lazy=True)
        mx.eval(model.parameters())
        config = json.loads((model_dir / "config.json").read_text())
        return cls(model, int(config.get("max_position_embeddings") or 512))

    # -- what the runner loop asks of every engine ---------------------------

    @property
    def active(self) -> int:
        return 0

    def warm_up(self) -> None:
        """Load the device's kernels for the common shapes with a throwaway input."""
        self.embed([[0, 1]])
        self.stats = Stats()

    def add(self, req: Generate) -> Hit:
        raise ValueError("this model embeds text; it does not generate")

    def cancel(self, req_id: int) -> None:
        pass  # an embed request is answered before the next command is read

    def request_ids(self) -> list[int]:
        return []

    def reset(self) -> None:
        pass

    def recover(self) -> None:
        mx.clear_cache()

    def step(self) -> list[Output]:
        return []

    # -- embedding ------------------------------------------------------------

    def embed(self, inputs: Sequence[Sequence[int]]) -> np.ndarray:
        """Unit vectors for ``inputs`` (lists of token ids), count x dims float32."""
        if not inputs or any(not ids for ids in inputs):
            raise ValueError("every input needs at least one token")
        longest = max(len(ids) for ids in inputs)
        if longest > self.max_length:
            raise ValueError(f"an input has {longest} tokens; this model reads {self.max_length}")
        order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
        out: np.ndarray | None = None
        start = 0
        while start < len(order):
            end = start + 1
            # Sorted by length: the batch's width is its last input's.
            while end < len(order) and (end + 1 - start) * len(inputs[order[end]]) <= BATCH_TOKENS:
                end += 1
            rows = [inputs[i] for i in order[start:end]]
            vectors = self._batch(rows)
            if out is None:
                out = np.empty((len(inputs), vectors.shape[1]), dtype=np.float32)
            out[order[start:end]] = vectors
            start = end
        assert out is not None
        self.stats.steps += 1
        self.stats.prompt_tokens += sum(len(ids) for ids in inputs)
        self.stats.max_batch = max(self.stats.max_batch, len(inputs))
        return out

    def _batch(self, rows: list[Sequence[int]]) -> np.ndarray:
        width = max(len(r) for r in rows)
        ids = np.zeros((len(rows), width), dtype=np.int32)
        mask = np.zeros((len(rows), width), dtype=np.int32)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
            mask[i, : len(r)] = 1
        result = self.model(mx.array(ids), attention_mask=mx.array(mask))
        vectors = result.text_embeds.astype(mx.float32)
        mx.eval(vectors)
        return np.array(vectors, copy=True)
