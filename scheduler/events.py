"""What goes in and out of the pool's policy (``scheduler/policy.py``): the
models' specs and the requests' tickets it is given, the events it handles
(each carrying the time it happened) and the effects it asks its owner
(``scheduler/pool.py``) to carry out. Plain values, no behaviour."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any

import attrs

from scheduler.errors import MlxdError

FOREVER = math.inf
_ticket_ids = itertools.count(1)


@attrs.frozen
class ModelSpec:
    """What the policy knows of a configured model."""

    cost: int = 0  # estimated bytes of weights and working memory; ``Sized`` may update it
    kv_per_token: int = 0  # KV cache bytes per token of a sequence; ``Sized`` too
    max_concurrency: int = 8
    queue_limit: int = 64
    queue_timeout_s: float = 600.0
    keep_alive_s: float = 300.0
    pinned: bool = False
    prefix_cache: int = 0  # bytes its prefix cache may take, when the budget allows


INTERACTIVE, NORMAL, BACKGROUND = 0, 1, 2  # a priority: its index in config.settings.PRIORITIES


@attrs.define(eq=False)
class Ticket:
    """One request's claim on a model. Compared by identity."""

    model: str
    keep_alive_s: float | None = None  # overrides the model's, from this request on
    prompt: tuple[int, ...] = ()  # its tokens: a load it causes reads their cached prefix
    max_tokens: int = 0  # the most it may generate
    client: str = ""  # who sent it (``scheduler/order.py`` shares turns between clients)
    priority: int = NORMAL
    weight: float = 1.0  # its client's share of turns
    id: int = attrs.field(factory=lambda: next(_ticket_ids))
    since: float = 0.0
    deadline: float = FOREVER
    granted: float | None = None
    # Output tokens its KV reservation holds, with its prompt (None: all of
    # ``max_tokens``); ``Grow`` raises it as the sequence generates.
    reserve: int | None = None
    resumes: bool = False  # it is a paused sequence's rest, waiting to go on

    @property
    def reserved(self) -> int:
        """Output tokens its KV reservation holds now."""
        return self.max_tokens if self.reserve is None else min(self.reserve, self.max_tokens)


# -- events (each carries the time it happened) ------------------------------


@attrs.frozen
class Submitted:
    ticket: Ticket
    now: float = 0.0


@attrs.frozen
class Withdrawn:
    ticket: Ticket
    now: float = 0.0


@attrs.frozen
class Released:
    ticket: Ticket
    now: float = 0.0


@attrs.frozen
class Loaded:
    model: str
    runner: Any
    now: float = 0.0
    prefixes: int = 0  # the bytes of cached prefixes its runner read ahead


@attrs.frozen
class LoadFailed:
    model: str
    error: MlxdError
    now: float = 0.0


@attrs.frozen
class RunnerExited:
    model: str
    now: float = 0.0


@attrs.frozen
class Sized:
    model: str
    cost: int  # weights and working memory
    kv_per_token: int = 0  # KV cache bytes per token of a sequence
    now: float = 0.0


@attrs.frozen
class Measured:
    model: str
    bytes: int  # all the runner holds
    prefixes: int = 0  # of which its cached prefixes
    now: float = 0.0


@attrs.frozen
class SpareHeld:
    """The spare runner (a process started ahead of the next load) holds
    ``held`` bytes; None while one starts (it will hold what the last one
    did), 0 when there is none. What a spare holds is what every runner
    process holds before its model (on a CUDA host, its CUDA context), so
    each model is charged that much too."""

    held: int | None
    now: float = 0.0


@attrs.frozen
class Unload:
    model: str
    now: float = 0.0


@attrs.frozen
class Grow:
    """A running ticket's sequence nears the end of its reservation: it asks
    for ``reserve`` output tokens (granted with ``Grown`` when they fit, before
    any new request is; else it pauses itself, releasing its ticket)."""

    ticket: Ticket
    reserve: int
    now: float = 0.0


@attrs.frozen
class Pin:
    """Pin the model (never unloaded for memory or keep-alive) or unpin it."""

    model: str
    pinned: bool = True
    now: float = 0.0


@attrs.frozen
class Reconfigure:
    """A new config: models not in ``specs`` are unloaded once their requests
    are done and then forgotten; ``changed`` ones are unloaded when idle, to
    load again with their new settings; new ones are added."""

    specs: Mapping[str, ModelSpec]
    changed: frozenset[str] = frozenset()
    now: float = 0.0


@attrs.frozen
class Tick:
    now: float = 0.0


@attrs.frozen
class Shutdown:
    now: float = 0.0


Event = (
    Submitted
    | Withdrawn
    | Released
    | Loaded
    | LoadFailed
    | RunnerExited
    | Sized
    | Reconfigure
    | Measured
    | SpareHeld
    | Unload
    | Grow
    | Pin
    | Tick
    | Shutdown
)

# -- effects -----------------------------------------------------------------


@attrs.frozen
class Grant:
    ticket: Ticket
    runner: Any


@attrs.frozen
class Reject:
    ticket: Ticket
    error: MlxdError


@attrs.frozen
class StartRunner:
    """Load ``model`` with a prefix cache of ``prefixes`` bytes, into which it
    may read the cached prefix of ``prompt`` (the first waiting request's)
    while its weights load."""

    model: str
    prefixes: int = 0
    prompt: tuple[int, ...] = ()


@attrs.frozen
class StopRunner:
    model: str
    runner: Any
    reason: str  # idle (keep-alive 0), expired, memory, manual, shutdown


@attrs.frozen
class PrefixLimit:
    """The bytes the model's prefix cache may hold from now on; ``dropped``
    when cached prefixes are given up for another model's load."""

    model: str
    runner: Any
    bytes: int
    dropped: bool = False


@attrs.frozen
class Pause:
    """Pause the ticket's sequence (it goes on later from its tokens): an
    interactive request waits for what it holds."""

    ticket: Ticket


@attrs.frozen
class Grown:
    """The ticket's reservation now holds ``ticket.reserve`` output tokens."""

    ticket: Ticket


Effect = Grant | Reject | StartRunner | StopRunner | PrefixLimit | Grown | Pause
