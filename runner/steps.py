"""What an engine gives the runner loop (``runner/__main__.py``): a step's
outputs, what a new request reuses, and counters.

The language-model engine (``runner/engine.py``), the embedder and the tests'
scripted engine all answer in these; importing them loads neither MLX nor
mlx-lm, so a runner whose engine needs neither starts in a fraction of a second.
"""

from __future__ import annotations

from typing import Any

import attrs

Logprobs = dict[str, Any]  # {"logprob": x, "top": [[token, x], ...]}
Output = tuple[int, int, str | None, Logprobs | None]  # request id, token, finish, logprobs


@attrs.frozen
class Hit:
    """What a prompt reuses: a private cache holding its first ``tokens``
    tokens (``None`` and 0 for a miss), and where it came from."""

    cache: list[Any] | None = None
    tokens: int = 0
    source: str = ""  # "memory", "disk" or "" (a miss)


@attrs.define
class Stats:
    steps: int = 0
    tokens: int = 0
    prompt_tokens: int = 0
    cancelled: int = 0
    max_batch: int = 0
    migrations: int = 0
