"""What a runner tells the daemon, as typed values.

``runner/protocol.py`` describes the wire: one JSON object a line, its kind
in ``ev``. The runner builds these and writes them with ``line``; the
daemon's client (``runner/client.py``) reads each back with ``read`` and
matches on its type, so no layer above reads an event by key.

Like the protocol, this module imports neither MLX nor trio.
"""

from __future__ import annotations

import base64
from typing import Any

import attrs
import numpy as np

from runner import protocol

Memory = dict[str, int]  # MLX's active, peak and cache bytes; "device" where the driver says
Output = tuple[int, int, str | None, dict[str, Any] | None]  # request id, token, finish, logprobs


@attrs.frozen
class Spare:
    """A spare has its imports done and its device up, and waits for "load";
    ``bytes``: what it holds so (a CUDA context), as every runner does first."""

    pid: int
    startup_s: float
    bytes: int


@attrs.frozen
class Ready:
    """The model is loaded (in ``load_s``); ``prefix_bytes``: what its prefix
    cache read while the weights loaded."""

    pid: int
    memory: Memory
    load_s: float
    prefix_bytes: int = 0


@attrs.frozen
class Cached:
    """Request ``id`` starts from a cached prefix of ``tokens`` prompt tokens
    (from "memory" or "disk"; 0 and "" for none); sent before its tokens."""

    id: int
    tokens: int
    source: str = ""


@attrs.frozen
class Tokens:
    """One decoding step: an output for every sequence that made a token."""

    out: list[Output]


@attrs.frozen
class Embeddings:
    """Request ``id``'s vectors, in its inputs' order: count x dims
    little-endian float32, base64 (a fifth of a JSON list's size, and exact)."""

    id: int
    count: int
    dims: int
    data: str

    @classmethod
    def of(cls, req_id: int, vectors: np.ndarray) -> Embeddings:
        count, dims = vectors.shape
        data = base64.b64encode(np.ascontiguousarray(vectors, dtype="<f4").tobytes()).decode()
        return cls(req_id, count, dims, data)

    def vectors(self) -> np.ndarray:
        raw = np.frombuffer(base64.b64decode(self.data), dtype="<f4")
        return raw.reshape(self.count, self.dims).astype(np.float32)


@attrs.frozen
class Failed:
    """Those requests failed (a bad request alone, or a whole step);
    ``refused``: for their own input (``BadInput``), the sender's error."""

    ids: list[int | None]
    message: str
    refused: bool = False


@attrs.frozen
class Stats:
    """A runner's state between two steps: what the pool measures (its
    ``memory``, its prefix cache's bytes) and ``/api/ps`` shows whole."""

    active: int
    memory: Memory
    counters: dict[str, int]  # the engine's (``runner/steps.py``'s ``Stats``)
    prefill_chunk: int | None = None
    prefix: dict[str, int] | None = None  # ``PrefixCache.summary``

    @property
    def prefix_bytes(self) -> int:
        return int((self.prefix or {}).get("bytes", 0))

    def shown(self) -> dict[str, Any]:
        """As ``/api/ps`` shows it: the counters beside the rest."""
        return {**self.counters, **attrs.asdict(self, filter=lambda a, _: a.name != "counters")}


@attrs.frozen
class Saving:
    """After "shutdown": the model is freed; what it holds is the prefixes
    being written to disk."""

    memory: Memory
    prefix_bytes: int


@attrs.frozen
class Saved:
    """The prefixes are written; ``skipped_bytes``: not, over the hourly bound."""

    written_bytes: int
    skipped_bytes: int


@attrs.frozen
class Fatal:
    """Loading failed; the runner exits."""

    message: str


@attrs.frozen
class Pong:
    """The answer to a ping (sent while the runner computes or loads too)."""

    id: int | None = None


Event = (
    Spare | Ready | Cached | Tokens | Embeddings | Failed | Stats | Saving | Saved | Fatal | Pong
)
WIRE = protocol.Wire[Event](
    "ev",
    "event",
    {
        Spare: "spare",
        Ready: "ready",
        Cached: "cached",
        Tokens: "tokens",
        Embeddings: "embeddings",
        Failed: "error",
        Stats: "stats",
        Saving: "saving",
        Saved: "saved",
        Fatal: "fatal",
        Pong: "pong",
    },
)
line, read = WIRE.line, WIRE.read  # an event as a line of the wire; the event a line holds
