"""The pool's memory ledger: what each model is charged against one budget,
and the arithmetic of room (free now, coming back, reclaimable from prefix
caches), growth of prefix caches into free memory, a load's read-ahead, and
why a request could never fit. Pure, like the policy (``scheduler/policy.py``),
which decides who is queued, granted, loaded or evicted and asks the ledger
what that costs; the ledger decides nothing about requests.

Each model is charged its estimated cost (weights and working memory) while
it loads; once ready, that plus the KV cache its running requests reserve
(each its prompt plus ``max_tokens``, in the cache's steps), or what its
runner measures if that is more; plus a reservation for its prefix cache,
which the runner never outgrows (``PrefixLimit``).
"""

from __future__ import annotations

import enum
from collections import deque
from typing import Any

import attrs

from config.units import format_bytes
from scheduler.errors import MlxdError, ModelTooLarge, RequestTooLarge
from scheduler.events import FOREVER, ModelSpec, PrefixLimit, StartRunner, Ticket

KV_STEP = 256  # tokens: mlx-lm's KV caches grow in steps of this many


class State(enum.Enum):
    ABSENT = "absent"
    LOADING = "loading"
    READY = "ready"
    STOPPING = "stopping"


@attrs.define
class ModelState:
    spec: ModelSpec
    cost: int = 0
    context: int = 0  # what its runner process holds before the model (``SpareHeld``)
    state: State = State.ABSENT
    runner: Any = None
    held: int = 0  # charged while loading (its cost) or stopping (what it still holds)
    kv_per_token: int = 0
    measured: int = 0  # what its runner last said it holds, less its cached prefixes
    prefixes: int = 0  # the prefix-cache reservation, charged too
    prefixes_used: int = 0  # what the runner last said its prefixes take
    queue: deque[Ticket] = attrs.field(factory=deque)
    running: set[Ticket] = attrs.field(factory=set)
    growing: dict[Ticket, int] = attrs.field(factory=dict)  # running, waiting to grow: to what
    last_used: float = 0.0
    keep_alive_s: float = 0.0
    unload_asked: bool = False
    draining: bool = False
    retired: bool = False  # gone from the config: forgotten once absent
    hold_s: float = 0.0  # how long its requests hold a slot, on average (recent ones weigh most)
    failures: int = 0  # loads that failed in a row
    retry_at: float = 0.0  # no load is tried before this, after a failure
    load_error: MlxdError | None = None  # the last failure's, for requests meanwhile
    stale: bool = False  # its config changed: unloaded once idle, even if pinned
    pinned: bool = False  # never unloaded for memory or keep-alive: its config's, or ``Pin``

    def __attrs_post_init__(self) -> None:
        self.keep_alive_s, self.pinned = self.spec.keep_alive_s, self.spec.pinned
        self.cost, self.kv_per_token = self.spec.cost, self.spec.kv_per_token

    @property
    def idle(self) -> bool:
        return self.state is State.READY and not self.running and not self.queue

    def kv(self, ticket: Ticket, max_tokens: int | None = None) -> int:
        """The KV bytes ``ticket`` reserves (for ``max_tokens`` output tokens
        instead of what its reservation holds)."""
        more = ticket.reserved if max_tokens is None else max_tokens
        return self.kv_bytes(len(ticket.prompt) + more)

    def kv_bytes(self, tokens: int) -> int:
        """The KV cache of one sequence of ``tokens`` (in the cache's steps)."""
        return -(-tokens // KV_STEP) * KV_STEP * self.kv_per_token

    @property
    def base(self) -> int:
        """Its bytes with no request running: its runner process, its weights
        and working memory."""
        return self.context + self.cost

    @property
    def bytes(self) -> int:
        """Charged against the budget, its prefix-cache reservation apart."""
        return self.charge() if self.state is State.READY else self.held

    def stopping(self) -> None:
        """Now on its way out: it holds what it was charged until it says less."""
        self.held, self.state = self.bytes, State.STOPPING

    @property
    def reserved(self) -> int:
        """The KV bytes its running requests reserve."""
        return sum(self.kv(t) for t in self.running)

    def charge(self, extra: int = 0) -> int:
        """A ready model's bytes: its base plus the KV its running requests
        (and ``extra``) reserve, never below what its runner measures."""
        return max(self.base + self.reserved + extra, self.measured)

    def growth(self, extra: int) -> int:
        """How much more a ready model is charged once ``extra`` KV is reserved."""
        return self.charge(extra) - self.bytes

    @property
    def expires(self) -> float:
        """When an idle model may be unloaded (``FOREVER`` if never)."""
        if self.pinned:
            return FOREVER
        return self.last_used + self.keep_alive_s

    @property
    def charged(self) -> int:
        """All it is charged: its bytes and its prefix-cache reservation."""
        return self.bytes + self.prefixes


class Ledger:
    """The budget and every model's charge (``models`` is the policy's own
    table of model states, shared, which the policy changes as it decides).
    ``spare``: what the spare runner holds; ``context``: what a runner holds
    before its model, as the last spare measured."""

    def __init__(self, models: dict[str, ModelState], budget: int) -> None:
        self.models = models
        self.budget = budget
        self.spare = 0
        self.context = 0

    @property
    def used(self) -> int:
        return self.spare + sum(m.charged for m in self.models.values())

    @property
    def free(self) -> int:
        return self.budget - self.used

    def measured(self, m: ModelState, measured: int, prefixes: int) -> None:
        if m.state is State.READY:
            m.measured = measured - prefixes
            m.prefixes_used = prefixes
            # Beyond its runner and its requests' KV, what it holds is its
            # weights and working memory: its cost, for its next load too.
            m.cost = max(m.cost, m.measured - m.context - m.reserved)
        elif m.state is State.STOPPING:
            m.held, m.prefixes = min(m.held + m.prefixes, measured), 0

    def too_large(self, ticket: Ticket, room: int, pinned: int) -> MlxdError:
        """Why ``ticket`` could never run, even with its model alone: a 400 if
        a smaller ``max_tokens`` would fit, else a 503."""
        m = self.models[ticket.model]
        budget = f"the memory budget is {format_bytes(self.budget)} ({self.budget} bytes"
        budget += f", {format_bytes(pinned)} of it held by pinned models)" if pinned else ")"
        kv, base = m.kv(ticket, ticket.max_tokens), m.base
        weights = f"{format_bytes(base)} ({base} bytes) for its weights"
        if m.context:
            weights += f" and runner process ({format_bytes(m.context)} of it)"
        if base + m.kv(ticket, 1) > room:
            return ModelTooLarge(
                f"model {ticket.model!r} needs about {weights}, plus {format_bytes(kv)} "
                f"({kv} bytes) of KV cache for this request, but {budget}; raise "
                "memory_budget or use a smaller model",
                param="model",
            )
        fits = (room - base) // max(m.kv_per_token, 1) // KV_STEP * KV_STEP
        most = max(fits - len(ticket.prompt), 1)
        return RequestTooLarge(
            f"this request needs {format_bytes(kv)} ({kv} bytes) of KV cache for its "
            f"{len(ticket.prompt)} prompt tokens plus max_tokens {ticket.max_tokens}, and "
            f"model {ticket.model!r} {weights}, but {budget}; max_tokens {most} would fit",
            param="max_tokens",
        )

    def need(self, name: str, ticket: Ticket) -> int:
        """The bytes a candidate needs for ``ticket``, its next: an absent
        model its base and the ticket's KV (less the spare runner's bytes,
        which its load takes over); a ready one the growth of its charge by
        that KV."""
        m = self.models[name]
        kv = m.kv(ticket)
        if m.state is State.ABSENT:  # its load takes the spare runner, and its bytes
            return m.base + kv - self.spare
        return m.growth(kv)

    def room(self) -> tuple[int, int]:
        """Free bytes now, and bytes to come: what runners already stopping
        will free, and the prefix-cache reservations of loads (what a load's
        read-ahead leaves unused can be taken back once it is ready)."""
        coming = sum(
            m.charged if m.state is State.STOPPING else m.prefixes
            for m in self.models.values()
            if m.state in (State.STOPPING, State.LOADING)
        )
        return self.free, coming

    def reclaimable(
        self, loading: bool = False
    ) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
        """Prefix-cache bytes a load may take without evicting a model: the
        reservations ready models are not using (any model; with ``loading``,
        loads' read-ahead too), then the cached prefixes of idle ones (least
        recently used first); as (model, bytes)."""
        ready = [(n, m) for n, m in self.models.items() if m.state is State.READY]
        unused = [(n, m.prefixes - m.prefixes_used) for n, m in ready]
        if loading:
            unused += [(n, m.prefixes) for n, m in self.models.items() if m.state is State.LOADING]
        idle = sorted((m.last_used, n) for n, m in ready if m.idle or m.draining)
        held = [(n, min(self.models[n].prefixes, self.models[n].prefixes_used)) for _, n in idle]
        return [u for u in unused if u[1] > 0], [h for h in held if h[1] > 0]

    def shrink(self, name: str, by: int, dropped: bool) -> PrefixLimit:
        m = self.models[name]
        m.prefixes -= by
        m.prefixes_used = min(m.prefixes_used, m.prefixes)
        return PrefixLimit(name, m.runner, m.prefixes, dropped)

    def make_room(
        self,
        need: int,
        unused: bool = True,
        held: bool = True,
        spare: tuple[str, ...] = (),
        loading: bool = False,
    ) -> tuple[list[PrefixLimit], int]:
        """Free up to ``need`` bytes of prefix-cache reservations: ``unused``
        ones first (``loading``: loads' read-ahead too, whose runners hear
        their limit once ready), then the ``held`` cached prefixes of idle
        models other than those in ``spare`` (models being evicted, whose
        prefixes go to disk with them). Returns the effects and the bytes freed."""
        limits: dict[str, PrefixLimit] = {}  # one effect per model: its last limit
        freed = 0
        free_unused, free_held = self.reclaimable(loading)
        steps = [(free_unused, False)] * unused + [(free_held, True)] * held
        for amounts, dropped in steps:
            for name, size in amounts:
                if freed >= need:
                    break
                if name not in spare:
                    if self.models[name].state is State.LOADING:  # keep what it may read
                        size = min(size, need - freed)
                    limits[name] = self.shrink(name, size, dropped)
                    freed += size
        return [e for e in limits.values() if e.runner is not None], freed

    def grow(self) -> list[PrefixLimit]:
        """Give free memory to prefix caches below their limit (step 12),
        once no load or unload is under way (a model loading gets its share
        when it is ready)."""
        effects: list[PrefixLimit] = []
        if any(m.state in (State.LOADING, State.STOPPING) for m in self.models.values()):
            return effects
        free = self.free
        ready = [(m.last_used, n) for n, m in self.models.items() if m.state is State.READY]
        for _, name in sorted(ready, reverse=True):
            m = self.models[name]
            more = min(m.spec.prefix_cache - m.prefixes, free)
            if more > 0 and not m.draining:
                m.prefixes += more
                free -= more
                effects.append(PrefixLimit(name, m.runner, m.prefixes))
        return effects

    def read_ahead(self, start: StartRunner) -> StartRunner:
        """Give a starting load's prefix cache free memory (up to its
        ``prefix_cache``) when it has a prompt to read a cached prefix for."""
        m = self.models[start.model]
        if not start.prompt:
            return start
        m.prefixes = max(0, min(m.spec.prefix_cache, self.free))
        return attrs.evolve(start, prefixes=m.prefixes)
