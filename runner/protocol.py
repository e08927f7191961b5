"""The protocol between the daemon and a runner process.

One JSON object per line. The daemon writes commands to the runner's stdin;
the runner writes events to its stdout (anything else it prints goes to
stderr, which the daemon passes through to its own log).

Commands (daemon → runner)::

    {"op": "load", "model_dir": "/models/x", "max_batch": 8}
                                      first line to a runner started without a
                                      model (a spare); it then loads and says "ready"
    {"op": "generate", "id": 7, "prompt": [1, 2, 3], "max_tokens": 64,
     "temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
     "seed": null, "stop_ids": [2]}
    {"op": "cancel", "id": 7}         stop generating for 7 at the next step
    {"op": "stats"}                   answer with a "stats" event
    {"op": "shutdown"}                finish nothing more, exit 0

Events (runner → daemon)::

    {"ev": "ready", "pid": 123, "memory": {...}}     the model is loaded
    {"ev": "tokens", "batch": 3, "out": [[7, 42, null], [8, 2, "stop"]]}
        one decoding step: [id, token, finish] for every sequence that made a
        token; finish is null, "stop" (the token is a stop id) or "length"
    {"ev": "error", "ids": [7], "message": "..."}    those requests failed
    {"ev": "stats", "active": 2, "max_batch": 4, ..., "memory": {...}}
    {"ev": "fatal", "message": "..."}                 loading failed; exiting

``memory`` is MLX's view: ``{"active": bytes, "peak": bytes, "cache": bytes}``.
Stdin reaching EOF means the daemon is gone: the runner exits.
"""

from __future__ import annotations

import json
from typing import Any

import attrs


@attrs.frozen
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None


@attrs.frozen
class Generate:
    id: int
    prompt: tuple[int, ...]
    max_tokens: int
    sampling: Sampling
    stop_ids: tuple[int, ...] = ()

    def to_message(self) -> dict[str, Any]:
        return {
            "op": "generate",
            "id": self.id,
            "prompt": list(self.prompt),
            "max_tokens": self.max_tokens,
            **attrs.asdict(self.sampling),
            "stop_ids": list(self.stop_ids),
        }

    @classmethod
    def from_message(cls, msg: dict[str, Any]) -> Generate:
        fields = attrs.fields_dict(Sampling)
        return cls(
            id=msg["id"],
            prompt=tuple(msg["prompt"]),
            max_tokens=msg["max_tokens"],
            sampling=Sampling(**{k: msg[k] for k in fields if k in msg}),
            stop_ids=tuple(msg.get("stop_ids", ())),
        )


def encode(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    msg = json.loads(line)
    if not isinstance(msg, dict):
        raise ValueError(f"protocol message is not an object: {line[:80]!r}")
    return msg
