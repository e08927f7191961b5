"""Embedding for one loaded model, inside its runner process.

The model is mlx-embeddings' (BERT-family encoders, Qwen3-Embedding and the
rest it knows), loaded from a Hugging Face directory as it is: that library
holds each architecture's pooling and normalisation, so mlxd writes no
encoder of its own. It is imported only when a runner loads an embedding
model (about 2.5 s), never by a spare waiting for a chat model.

The daemon sends token ids (it tokenizes; special tokens included). An
``embed`` request's inputs are sorted by length and read in pieces of at
most ``BATCH_TOKENS`` padded tokens, each input padded on the right with an
attention mask, so a vector does not depend on what shares its piece (the
tests check it against the input alone). One piece is one step of the
runner's loop, the requests in hand taking turns, so a big request (64 long
inputs take seconds on a CPU) neither holds up a small one behind it nor
outlives its client: between two pieces the loop reads commands, and a
``cancel`` (the client left) drops the rest of it.

What the runner loop asks of an engine is here too (``warm_up``, ``stats``,
``cancel``, ``reset``, ``recover``, ``prefixes``, ``step``), so the loop needs
no second shape; ``add`` refuses, so a generate request to an embedding model
fails alone; ``answers`` hands over the requests a step finished.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
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
        self._jobs: collections.deque[_Job] = collections.deque()  # taking turns, a piece each
        self._done: list[tuple[int, np.ndarray]] = []

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
        return len(self._jobs)

    def warm_up(self) -> None:
        """Load the device's kernels for the common shapes with a throwaway input."""
        self._batch([[0, 1]])

    def add(self, req: Generate) -> Hit:
        raise ValueError("this model embeds text; it does not generate")

    def cancel(self, req_id: int) -> None:
        """Drop what is left of a request (its client left)."""
        for job in list(self._jobs):
            if job.id == req_id:
                self._jobs.remove(job)
                self.stats.cancelled += 1

    def request_ids(self) -> list[int]:
        return [job.id for job in self._jobs]

    def reset(self) -> None:
        self._jobs.clear()

    def recover(self) -> None:
        self.reset()
        mx.clear_cache()

    def step(self) -> list[Output]:
        """Read the next piece of the next request in turn (``answers`` then
        holds it, if that was its last piece)."""
        if not self._jobs:
            return []
        job = self._jobs.popleft()
        end = job.done + 1
        # Sorted by length: the piece's width is its last input's.
        while end < len(job.order) and (end + 1 - job.done) * job.width(end) <= BATCH_TOKENS:
            end += 1
        vectors = self._batch([job.inputs[i] for i in job.order[job.done : end]])
        if job.out is None:
            job.out = np.empty((len(job.inputs), vectors.shape[1]), dtype=np.float32)
        job.out[job.order[job.done : end]] = vectors
        job.done = end
        self.stats.steps += 1
        if job.done < len(job.order):
            self._jobs.append(job)  # the others' turn
        else:
            self._done.append((job.id, job.out))
        return []

    # -- embedding ------------------------------------------------------------

    def submit(self, req_id: int, inputs: Sequence[Sequence[int]]) -> None:
        """Take a request: unit vectors for ``inputs`` (lists of token ids),
        count x dims float32, come out of ``answers`` once all its pieces are
        read; ``ValueError`` if the inputs cannot be embedded."""
        if not inputs or any(not ids for ids in inputs):
            raise ValueError("every input needs at least one token")
        longest = max(len(ids) for ids in inputs)
        if longest > self.max_length:
            raise ValueError(f"an input has {longest} tokens; this model reads {self.max_length}")
        order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
        self._jobs.append(_Job(req_id, list(inputs), order))
        self.stats.prompt_tokens += sum(len(ids) for ids in inputs)
        self.stats.max_batch = max(self.stats.max_batch, len(inputs))

    def answers(self) -> list[tuple[int, np.ndarray]]:
        """The requests finished since the last call: (id, vectors)."""
        done, self._done = self._done, []
        return done

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


@attrs.define
class _Job:
    id: int
    inputs: list[Sequence[int]]
    order: list[int]  # the inputs' indices, shortest first
    done: int = 0  # how many of ``order`` are read
    out: np.ndarray | None = None

    def width(self, at: int) -> int:
        return len(self.inputs[self.order[at]])
