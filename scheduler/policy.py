"""What the pool decides, as a pure state machine: events in, effects out.

``Policy.handle(event)`` never blocks, sleeps or does I/O, and takes the time
from the event, so every decision is tested by calling it directly. One task
(``scheduler/pool.py``) owns the policy, carries out its effects and wakes it
at ``next_deadline()``; nothing else touches its state. The events and
effects themselves are plain values in ``scheduler/events.py``.

Each model is charged bytes against one budget: its estimated cost (weights
and working memory) while it loads; once ready, that plus the KV cache its
running requests reserve (each its prompt plus ``max_tokens``, in the
cache's steps), or what its runner measures if that is more; plus a
reservation for its prefix cache (the KV of earlier requests kept for
reuse). The runner never lets its prefix cache outgrow the reservation,
which the policy sets (``PrefixLimit``): up to the model's ``prefix_cache``
bytes, out of memory nobody else is waiting for. The part a model is not
using goes back as soon as a load needs it; the cached prefixes of idle
models go next, before any model is evicted.

Decision steps, for each event:

1. ``Submitted``: refuse at once if the daemon is stopping (``ShuttingDown``),
   if the model could not fit even with every unpinned model unloaded
   (``ModelTooLarge``, naming the bytes), if its last load failed within the
   back-off (step 4), or if it already holds ``max_concurrency`` +
   ``queue_limit`` requests (``QueueFull``, whose ``Retry-After`` is the
   queue ahead, served ``max_concurrency`` at a time, times how long its
   requests hold a slot on average); otherwise queue the ticket (FIFO) with
   its deadline.
2. ``Withdrawn`` (the client gave up while queued): drop it from the queue; if
   it was granted in the same instant, treat it as ``Released``.
3. ``Released``: the request is done; its slot frees up and the model's idle
   time starts.
4. ``Loaded`` / ``LoadFailed``: the runner is ready, or the model is absent
   again and its queued tickets get the error. Nothing retries by itself, so
   a broken model cannot spin in a load loop, and requests meanwhile get the
   error at once, without a load, for a back-off (5 s, doubling with each
   failure in a row, 5 min at most); the first request after it tries again.
5. ``RunnerExited``: the model is absent and its bytes are free. Requests that
   were running have had their streams failed by the runner handle; queued
   ones make it a load candidate again (step 10).
6. ``Measured``: the runner's measured bytes (less its cached prefixes,
   charged by their reservation) update the model's charge; what they hold
   beyond its runner process and the KV its running requests reserve raises
   its estimated cost if it is more (so that its next load, and loads beside
   it, are admitted by what it really holds). If that puts the charges over
   the budget, prefix-cache reservations nobody uses go first (a load's
   read-ahead too: its runner drops what it read beyond the new limit once
   ready), then idle models. A stopping runner that has freed its weights to
   write its prefixes to disk is charged what it still holds.
7. ``Unload``: unload the model once it is idle.
8. ``Shutdown``: reject queued tickets, stop every runner, accept nothing new.

Then, at every event (``Tick`` only does this):

9.  Queued tickets past their deadline are rejected (``QueueTimeout``); idle
    unpinned models are stopped when asked to (``Unload``) or when their
    keep-alive has run out.
10. Ready models grant queued tickets, oldest first across models, up to
    each one's concurrency (unless it is draining, step 11), while each
    ticket's KV reservation fits in free memory; the first that does not fit
    stops the grants behind it (so a large request is not passed for ever by
    small ones) and waits for room (step 11). A resident model never waits on
    another model's load.
11. Absent models with queued tickets are load candidates, and so are ready
    models whose next ticket did not fit, oldest waiting ticket first; an
    absent one needs its cost plus its first ticket's KV, a ready one that
    KV. A candidate that fits in free memory starts loading
    (``StartRunner``, single-flight: one load however many wait). One that
    does not fit takes back the prefix-cache reservations models are not
    using; then, if the cached prefixes of idle models make up the rest, it
    drops those (least recently used model first) and evicts nothing;
    otherwise it evicts idle models, least recently used first, then those
    with the shortest keep-alive, never a pinned or a busy one (their
    prefixes go to disk with them), and loads once their runners have exited.
    A model with queued requests is busy, so each model's waiting requests
    are served together before it can be swapped out (no A-B-A-B thrash).
    When busy models still block the oldest candidate after ``max_turn_s``,
    they drain: they take no new requests until their running ones finish,
    and are then evicted, so no request waits for its model's turn for ever.
    Later candidates wait behind a blocked one.
12. When no candidate waits, ready models whose prefix-cache reservation is
    below their ``prefix_cache`` get free memory for it, most recently used
    first; so does a load that has just started for a request, so that its
    runner can read that request's cached prefix from disk while the weights
    load. Until it is ready, a load's reservation counts as memory to come
    for later candidates (they wait for it rather than evict).
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Mapping
from typing import Any

import attrs

from config.units import format_bytes
from scheduler.errors import (
    MlxdError,
    ModelLoadFailed,
    ModelNotFound,
    ModelTooLarge,
    QueueFull,
    QueueTimeout,
    RequestTooLarge,
    ShuttingDown,
)
from scheduler.events import (
    FOREVER,
    Effect,
    Event,
    Grant,
    Loaded,
    LoadFailed,
    Measured,
    ModelSpec,
    PrefixLimit,
    Reconfigure,
    Reject,
    Released,
    RunnerExited,
    Shutdown,
    Sized,
    SpareHeld,
    StartRunner,
    StopRunner,
    Submitted,
    Ticket,
    Unload,
    Withdrawn,
)

KV_STEP = 256  # tokens: mlx-lm's KV caches grow in steps of this many
LOAD_BACKOFF_S = 5.0  # after a failed load, doubling with each failure in a row
LOAD_BACKOFF_MAX_S = 300.0
RETRY_AFTER_MAX_S = 600


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

    def __attrs_post_init__(self) -> None:
        self.keep_alive_s = self.spec.keep_alive_s
        self.cost, self.kv_per_token = self.spec.cost, self.spec.kv_per_token

    @property
    def idle(self) -> bool:
        return self.state is State.READY and not self.running and not self.queue

    def kv(self, ticket: Ticket, max_tokens: int | None = None) -> int:
        """The KV bytes ``ticket`` reserves (with ``max_tokens`` instead of its own)."""
        more = ticket.max_tokens if max_tokens is None else max_tokens
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

    @property
    def expires(self) -> float:
        """When an idle model may be unloaded (``FOREVER`` if never)."""
        if self.spec.pinned:
            return FOREVER
        return self.last_used + self.keep_alive_s


class Policy:
    def __init__(self, specs: Mapping[str, ModelSpec], budget: int, max_turn_s: float = 10.0):
        self.models = {name: ModelState(spec) for name, spec in specs.items()}
        self.budget = budget
        self.max_turn_s = max_turn_s
        self.stopping = False
        self.now = 0.0
        self.spare = 0  # what the spare runner holds
        self.context = 0  # what a runner holds before its model, as the last spare measured

    @property
    def used(self) -> int:
        return self.spare + sum(m.bytes + m.prefixes for m in self.models.values())

    def spare_fits(self) -> bool:
        """Whether a spare runner may start: nobody waits for memory, and
        there is room for what a runner holds."""
        return not self.stopping and not self._candidates() and self.free >= self.context

    @property
    def free(self) -> int:
        return self.budget - self.used

    @property
    def finished(self) -> bool:
        """Stopping, and no runner is left alive."""
        return self.stopping and all(m.state is State.ABSENT for m in self.models.values())

    def next_deadline(self) -> float:
        """The next time something is due even if no event comes."""
        times = [FOREVER]
        for m in self.models.values():
            times += [t.deadline for t in m.queue]
            if m.idle:
                times.append(m.expires)
        blocked = self._blocked()
        if blocked is not None:
            turn = self.models[blocked[0]].queue[0].since + self.max_turn_s
            if turn > self.now:  # once past, the busy models are draining already
                times.append(turn)
        return min(times)

    def handle(self, event: Event) -> list[Effect]:
        effects: list[Effect] = []
        now = self.now = event.now
        if getattr(event, "model", None) not in (None, *self.models):
            return []  # news from a runner of a model already forgotten
        match event:
            case Submitted(ticket):
                if (error := self._refusal(ticket)) is not None:
                    return [Reject(ticket, error)]
                ticket.since = now
                ticket.deadline = now + self.models[ticket.model].spec.queue_timeout_s
                self.models[ticket.model].queue.append(ticket)
            case Withdrawn(ticket) | Released(ticket):
                m = self.models[ticket.model]
                if ticket in m.queue:
                    m.queue.remove(ticket)
                if ticket in m.running:
                    m.running.discard(ticket)
                    m.last_used = now
                    if ticket.granted is not None:
                        held = now - ticket.granted
                        m.hold_s = held if not m.hold_s else 0.8 * m.hold_s + 0.2 * held
            case Loaded(model, runner, _, prefixes):
                m = self.models[model]
                m.runner, m.last_used, m.prefixes_used = runner, now, prefixes
                if prefixes > m.prefixes:  # its reservation was cut while it read ahead
                    effects.append(PrefixLimit(model, runner, m.prefixes, dropped=True))
                    m.prefixes_used = m.prefixes
                if self.stopping:
                    m.stopping()
                    return [StopRunner(model, runner, "shutdown")]
                m.state = State.READY  # its prefix cache grows in step 12
                m.failures, m.retry_at, m.load_error = 0, 0.0, None
            case LoadFailed(model, error):
                m = self.models[model]
                self._absent(m)
                m.failures += 1
                m.retry_at = now + min(LOAD_BACKOFF_S * 2 ** (m.failures - 1), LOAD_BACKOFF_MAX_S)
                m.load_error = error
                effects += [Reject(t, error) for t in m.queue]
                m.queue.clear()
            case RunnerExited(model):
                self._absent(self.models[model])
            case Sized(model, cost, kv_per_token):
                self.models[model].cost = cost
                self.models[model].kv_per_token = kv_per_token
            case Measured(model, measured, prefixes):
                self._measured(self.models[model], measured, prefixes)
            case SpareHeld(held):
                self.spare = self.context if held is None else held
                if held:
                    self.context = held
                    for m in self.models.values():
                        if m.state is State.ABSENT:  # a running one's measurement covers it
                            m.context = held
            case Unload(model):
                self.models[model].unload_asked = True
            case Reconfigure(specs, changed):
                self._reconfigure(specs, changed)
            case Shutdown():
                return self._shutdown()
        for name in [n for n, m in self.models.items() if m.retired and m.state is State.ABSENT]:
            m = self.models.pop(name)
            error = ModelNotFound(f"the model {name!r} was removed from the config", "model")
            effects += [Reject(t, error) for t in m.queue]
        return effects + self._schedule(now)

    # -- helpers ---------------------------------------------------------------

    def _measured(self, m: ModelState, measured: int, prefixes: int) -> None:
        if m.state is State.READY:
            m.measured = measured - prefixes
            m.prefixes_used = prefixes
            # Beyond its runner and its requests' KV, what it holds is its
            # weights and working memory: its cost, for its next load too.
            m.cost = max(m.cost, m.measured - m.context - m.reserved)
        elif m.state is State.STOPPING:
            m.held, m.prefixes = min(m.held + m.prefixes, measured), 0

    def _reconfigure(self, specs: Mapping[str, ModelSpec], changed: frozenset[str]) -> None:
        for name, m in self.models.items():
            if name not in specs:
                m.retired = m.stale = True
            elif name in changed or m.retired:  # (retired: added back before it stopped)
                m.spec, m.retired = specs[name], False
                m.failures, m.retry_at = 0, 0.0  # a new config may load
                m.stale = m.state is not State.ABSENT
                if m.state is State.ABSENT:
                    self._absent(m)  # takes the new settings now
        for name, spec in specs.items():
            self.models.setdefault(name, ModelState(spec, context=self.context))

    def _shutdown(self) -> list[Effect]:
        self.stopping = True
        effects: list[Effect] = []
        for name, m in self.models.items():
            error = ShuttingDown("the server is shutting down")
            effects += [Reject(t, error) for t in m.queue]
            m.queue.clear()
            if m.state is State.READY:
                m.stopping()
                effects.append(StopRunner(name, m.runner, "shutdown"))
        return effects

    def _refusal(self, ticket: Ticket) -> MlxdError | None:
        model = ticket.model
        if model not in self.models:  # named before a reload removed it
            return ModelNotFound(f"the model {model!r} was removed from the config", "model")
        m = self.models[model]
        if self.stopping:
            return ShuttingDown("the server is shutting down")
        pinned = sum(o.bytes for name, o in self.models.items() if o.spec.pinned and name != model)
        room = self.budget - pinned
        if m.base + m.kv(ticket) > room:
            return self._too_large(ticket, room, pinned)
        if m.state is State.ABSENT and self.now < m.retry_at and m.load_error is not None:
            return ModelLoadFailed(
                f"{m.load_error.message} (failed {m.failures} time(s) in a row; mlxd tries "
                f"again in {m.retry_at - self.now:.0f} s)",
                param="model",
            )
        if len(m.queue) + len(m.running) >= m.spec.queue_limit + m.spec.max_concurrency:
            full = QueueFull(
                f"model {model!r} has {len(m.running)} requests running and "
                f"{len(m.queue)} waiting, its limit; retry later",
                param="model",
            )
            # Until a slot is likely free: the queue ahead, served max_concurrency at a time.
            turns = (len(m.queue) + 1) / m.spec.max_concurrency
            full.retry_after_s = max(1, min(math.ceil(turns * m.hold_s), RETRY_AFTER_MAX_S))
            return full
        return None

    def _too_large(self, ticket: Ticket, room: int, pinned: int) -> MlxdError:
        """Why ``ticket`` could never run, even with its model alone: a 400 if
        a smaller ``max_tokens`` would fit, else a 503."""
        m = self.models[ticket.model]
        budget = f"the memory budget is {format_bytes(self.budget)} ({self.budget} bytes"
        budget += f", {format_bytes(pinned)} of it held by pinned models)" if pinned else ")"
        kv, base = m.kv(ticket), m.base
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

    def _absent(self, m: ModelState) -> None:
        m.state, m.runner, m.held, m.measured = State.ABSENT, None, 0, 0
        m.context = self.context  # what its next runner will hold before the model
        m.prefixes = m.prefixes_used = 0
        m.running.clear()
        m.keep_alive_s = m.spec.keep_alive_s
        m.unload_asked = m.draining = m.stale = False

    def _stop(self, name: str, reason: str) -> StopRunner:
        m = self.models[name]
        m.stopping()
        return StopRunner(name, m.runner, reason)

    def _schedule(self, now: float) -> list[Effect]:
        if self.stopping:
            return []
        effects: list[Effect] = []
        for name, m in self.models.items():
            while m.queue and m.queue[0].deadline <= now:
                t = m.queue.popleft()
                waited = f"{now - t.since:.0f} s (queue timeout {m.spec.queue_timeout_s:g} s)"
                effects.append(Reject(t, QueueTimeout(f"waited {waited} for model {name!r}")))
            if m.idle and m.stale:
                effects.append(self._stop(name, "manual"))
            elif m.idle and not m.spec.pinned:
                if m.unload_asked:
                    effects.append(self._stop(name, "manual"))
                elif now >= m.expires:
                    effects.append(self._stop(name, "idle" if m.keep_alive_s == 0 else "expired"))
        self._drain(now)
        effects += self._grant(now)
        effects += self._load()
        return effects + self._grant(now)  # into room the load step made

    def waiting_for_memory(self) -> dict[str, int]:
        """Queued tickets per model that wait for memory, not for a slot or a
        load under way."""
        return {
            name: len(self.models[name].queue)
            for name in self._candidates()
            if self.models[name].state is not State.LOADING
        }

    def _grantable(self) -> list[ModelState]:
        """Ready models with a queued ticket and a free slot."""
        return [
            m
            for m in self.models.values()
            if m.state is State.READY
            and not m.draining
            and m.queue
            and len(m.running) < m.spec.max_concurrency
        ]

    def _grant(self, now: float) -> list[Effect]:
        """Step 10: grant queued tickets, oldest first across ready models,
        while each one's KV reservation fits in free memory; the first that
        does not fit stops the rest (it waits for room, step 11)."""
        effects: list[Effect] = []
        while ready := self._grantable():
            m = min(ready, key=lambda m: (m.queue[0].since, m.queue[0].id))
            t = m.queue[0]
            if m.charge(m.kv(t)) - m.bytes > self.free:
                break
            m.queue.popleft()
            m.running.add(t)
            m.last_used = t.granted = now
            if t.keep_alive_s is not None:
                m.keep_alive_s = t.keep_alive_s
            effects.append(Grant(t, m.runner))
        return effects

    def _need(self, name: str) -> int:
        """The bytes a candidate needs: an absent model its base and its
        first ticket's KV (less the spare runner's bytes, which its load
        takes over); a ready one the growth of its charge by that KV."""
        m = self.models[name]
        kv = m.kv(m.queue[0])
        if m.state is State.ABSENT:  # its load takes the spare runner, and its bytes
            return m.base + kv - self.spare
        return m.charge(kv) - m.bytes

    def _candidates(self) -> list[str]:
        """Models waiting for memory, oldest waiting ticket first: absent ones
        with queued tickets, and ready ones whose next ticket did not fit."""
        blocked = {id(m) for m in self._grantable()}  # after a grant pass: no room
        waiting = [
            (m.queue[0].since, m.queue[0].id, name)
            for name, m in self.models.items()
            if m.queue and (m.state is State.ABSENT or id(m) in blocked)
        ]
        return [name for *_, name in sorted(waiting)]

    def _evictable(self) -> list[str]:
        """Idle (or drained) unpinned ready models, in eviction order."""
        names = [
            name
            for name, m in self.models.items()
            if m.state is State.READY
            and not m.spec.pinned
            and not m.running
            and (m.draining or not m.queue)
        ]
        return sorted(names, key=lambda n: (self.models[n].last_used, self.models[n].keep_alive_s))

    def _room(self) -> tuple[int, int]:
        """Free bytes now, and bytes to come: what runners already stopping
        will free, and the prefix-cache reservations of loads (what a load's
        read-ahead leaves unused can be taken back once it is ready)."""
        coming = sum(
            m.bytes + m.prefixes if m.state is State.STOPPING else m.prefixes
            for m in self.models.values()
            if m.state in (State.STOPPING, State.LOADING)
        )
        return self.free, coming

    def _reclaimable(
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

    def _shrink(self, name: str, by: int, dropped: bool) -> PrefixLimit:
        m = self.models[name]
        m.prefixes -= by
        m.prefixes_used = min(m.prefixes_used, m.prefixes)
        return PrefixLimit(name, m.runner, m.prefixes, dropped)

    def _make_room(
        self,
        need: int,
        unused: bool = True,
        held: bool = True,
        spare: tuple[str, ...] = (),
        loading: bool = False,
    ) -> tuple[list[Effect], int]:
        """Free up to ``need`` bytes of prefix-cache reservations: ``unused``
        ones first (``loading``: loads' read-ahead too, whose runners hear
        their limit once ready), then the ``held`` cached prefixes of idle
        models other than those in ``spare`` (models being evicted, whose
        prefixes go to disk with them). Returns the effects and the bytes freed."""
        limits: dict[str, PrefixLimit] = {}  # one effect per model: its last limit
        freed = 0
        free_unused, free_held = self._reclaimable(loading)
        steps = [(free_unused, False)] * unused + [(free_held, True)] * held
        for amounts, dropped in steps:
            for name, size in amounts:
                if freed >= need:
                    break
                if name not in spare:
                    if self.models[name].state is State.LOADING:  # keep what it may read
                        size = min(size, need - freed)
                    limits[name] = self._shrink(name, size, dropped)
                    freed += size
        return [e for e in limits.values() if e.runner is not None], freed

    def _grow(self) -> list[Effect]:
        """Give free memory to prefix caches below their limit (step 12),
        once no load or unload is under way (a model loading gets its share
        when it is ready)."""
        effects: list[Effect] = []
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

    def _load(self) -> list[Effect]:
        effects: list[Effect] = []
        stopping = sum(
            m.bytes + m.prefixes for m in self.models.values() if m.state is State.STOPPING
        )
        over = self.used - self.budget - stopping  # not counting runners on their way out
        if over > 0:  # measured use grew past the budget
            more, freed = self._make_room(over, loading=True)
            effects += more
            over -= freed
        for v in self._evictable():
            if over <= 0:
                break
            effects.append(self._stop(v, "memory"))
            over -= self.models[v].bytes + self.models[v].prefixes
        free, incoming = self._room()
        candidates = self._candidates()
        for name in candidates:
            m = self.models[name]
            cost = self._need(name)
            if cost > free + incoming:
                unused, held = self._reclaimable()
                short = cost - free - incoming
                enough = short <= sum(b for _, b in unused) + sum(b for _, b in held)
                more, freed = self._make_room(short, held=enough)
                effects += more
                free += freed
            if cost <= free:
                free -= cost  # a ready model's next ticket takes it in the next grant
                if m.state is State.ABSENT:
                    m.state, m.held, self.spare = State.LOADING, m.base, 0
                    effects.append(StartRunner(name, 0, m.queue[0].prompt))
                continue
            if cost > free + incoming:
                victims, reclaim = [], 0
                for v in self._evictable():
                    if free + incoming + reclaim >= cost:
                        break
                    victims.append(v)
                    reclaim += self.models[v].bytes + self.models[v].prefixes
                short = cost - free - incoming - reclaim
                _, held = self._reclaimable()
                if short > sum(b for n, b in held if n not in victims):
                    break  # busy models hold the memory: later candidates wait too
                if short > 0:  # pinned models' cached prefixes make up the rest
                    more, freed = self._make_room(short, unused=False, spare=tuple(victims))
                    effects += more
                    free += freed
                effects += [self._stop(v, "memory") for v in victims]
                incoming += reclaim
            # Wait for the stopping runners to exit; claim their bytes so that
            # later candidates do not take them.
            incoming -= cost - free
            free = 0
        if not [n for n in candidates if self.models[n].state is not State.LOADING]:
            # Nobody waits for memory: loads may read a cached prefix into it.
            effects = [self._read_ahead(e) if isinstance(e, StartRunner) else e for e in effects]
            effects += self._grow()
        return effects

    def _read_ahead(self, start: StartRunner) -> StartRunner:
        """Give a starting load's prefix cache free memory (up to its
        ``prefix_cache``) when it has a prompt to read a cached prefix for."""
        m = self.models[start.model]
        if not start.prompt:
            return start
        m.prefixes = max(0, min(m.spec.prefix_cache, self.free))
        return attrs.evolve(start, prefixes=m.prefixes)

    def _blocked(self) -> tuple[str, int] | None:
        """The first load candidate that idle models cannot make room for, and
        the bytes it lacks."""
        free, incoming = self._room()
        unused, held = self._reclaimable()
        evictable = sum(self.models[v].bytes + self.models[v].prefixes for v in self._evictable())
        spare = free + incoming + evictable + sum(b for _, b in unused)
        spare += sum(b for n, b in held if self.models[n].spec.pinned)
        for name in self._candidates():
            cost = self._need(name)
            if cost > spare:
                return name, cost - spare
            spare -= cost
        return None

    def _drain(self, now: float) -> None:
        """Let busy models hold the memory a waiting model needs for at most
        ``max_turn_s`` of its wait; then they take no new requests."""
        for m in self.models.values():
            m.draining = False
        blocked = self._blocked()
        if blocked is None:
            return
        name, need = blocked
        if now - self.models[name].queue[0].since < self.max_turn_s:
            return
        busy = [
            n
            for n, m in self.models.items()
            if m.state is State.READY and not m.spec.pinned and (m.running or m.queue) and n != name
        ]
        for n in sorted(busy, key=lambda n: self.models[n].last_used):
            if need <= 0:
                break
            self.models[n].draining = True
            need -= self.models[n].bytes + self.models[n].prefixes
