"""The pool as the API sees it: the scheduler, whose leases lend runners
that generate and embed (``runner/client.py``'s ``RunnerProcess`` in the
daemon). The scheduler itself needs less of a runner (``scheduler.pool.Runner``)
and knows nothing of requests; this is what the routes add to it."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

import numpy as np
import trio

from runner.protocol import Chunk, Generate
from scheduler.pool import Runner, Scheduler


class ModelRunner(Runner, Protocol):
    last_stats: dict[str, Any] | None  # the runner's last stats, for /api/ps

    def generate(
        self, request: Generate, *, more: bool = False
    ) -> AbstractAsyncContextManager[trio.MemoryReceiveChannel[Chunk]]:
        """Start generating: a channel of chunks, the last with ``finish``."""

    async def embed(self, inputs: list[list[int]]) -> np.ndarray:
        """The inputs' vectors (count x dims float32, unit length)."""


Pool = Scheduler[ModelRunner]
