"""What the pool decides, as a pure state machine: events in, effects out.

``Policy.handle(event)`` never blocks, sleeps or does I/O, and takes the time
from the event, so every decision is tested by calling it directly. One task
(``scheduler/pool.py``) owns the policy, carries out its effects and wakes it
at ``next_deadline()``; nothing else touches its state. The events and
effects themselves are plain values in ``scheduler/events.py``.

What each model is charged against the budget, and the arithmetic of room,
is the ledger's (``scheduler/ledger.py``); the policy decides and asks it
what a decision costs. A model's prefix-cache reservation is up to its
``prefix_cache`` bytes, out of memory nobody else is waiting for; the part a
model is not using goes back as soon as a load needs it, the cached prefixes
of idle models next, before any model is evicted.

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
7. ``Unload``: unpin the model and unload it once it is idle. ``Pin`` pins
   or unpins it until the config changes it (a pinned model is never
   evicted or expired).
8. ``Shutdown``: reject queued tickets, stop every runner, accept nothing new.

Then, at every event (``Tick`` only does this):

9.  Queued tickets past their deadline are rejected (``QueueTimeout``); idle
    unpinned models are stopped when asked to (``Unload``) or when their
    keep-alive has run out.
10. Running sequences waiting to grow their reservation (``Grow``) get it
    while it fits in free memory (``Grown``), which unused prefix-cache
    reservations and idle models' cached prefixes give way to; while one waits, no new request
    is granted (it pauses itself if it reaches the end of what it holds, and
    comes back as a queued request). Then ready models grant queued tickets,
    oldest first across models, up to
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
13. A sequence that cannot grow has the lowest-priority, newest sequence
    below it that can go on later paused (``Pause``); an interactive request
    still waiting for a slot or for memory, the newest background one (on
    its own model if that one is full, else on any); one at a time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from scheduler.errors import (
    MlxdError,
    ModelLoadFailed,
    ModelNotFound,
    QueueFull,
    QueueTimeout,
    ShuttingDown,
)
from scheduler.events import (
    BACKGROUND,
    FOREVER,
    INTERACTIVE,
    Effect,
    Event,
    Grant,
    Grow,
    Grown,
    Loaded,
    LoadFailed,
    Measured,
    ModelSpec,
    Pause,
    Pin,
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
from scheduler.ledger import Ledger, ModelState, State
from scheduler.order import Arrival, Order

LOAD_BACKOFF_S = 5.0  # after a failed load, doubling with each failure in a row
LOAD_BACKOFF_MAX_S = 300.0
RETRY_AFTER_MAX_S = 600


class Policy:
    def __init__(
        self,
        specs: Mapping[str, ModelSpec],
        budget: int,
        max_turn_s: float = 10.0,
        order: Order | None = None,
    ):
        self.models = {name: ModelState(spec) for name, spec in specs.items()}
        self.ledger = Ledger(self.models, budget)  # what each is charged; the budget
        self.order = order or Arrival()
        self.max_turn_s = max_turn_s
        self.stopping = False
        self.now = 0.0
        self.pausing: set[Ticket] = set()  # asked to pause (``Pause``), not yet let go

    @property
    def budget(self) -> int:
        return self.ledger.budget

    @property
    def used(self) -> int:
        return self.ledger.used

    def spare_fits(self) -> bool:
        """Whether a spare runner may start: nobody waits for memory, and
        there is room for what a runner holds."""
        return (
            not self.stopping and not self._candidates() and self.ledger.free >= self.ledger.context
        )

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
            turn = self._next(blocked[0]).since + self.max_turn_s
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
                if not ticket.resumes:  # (a paused sequence keeps its place: its arrival)
                    ticket.since = now
                ticket.deadline = now + self.models[ticket.model].spec.queue_timeout_s
                self.models[ticket.model].queue.append(ticket)
            case Withdrawn(ticket) | Released(ticket):
                m = self.models[ticket.model]
                m.growing.pop(ticket, None)
                self.pausing.discard(ticket)
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
                self.ledger.measured(self.models[model], measured, prefixes)
            case SpareHeld(held):
                self.ledger.spare = self.ledger.context if held is None else held
                if held:
                    self.ledger.context = held
                    for m in self.models.values():
                        if m.state is State.ABSENT:  # a running one's measurement covers it
                            m.context = held
            case Unload(model):
                self.models[model].unload_asked = True
                self.models[model].pinned = False
            case Grow(ticket, reserve):
                m = self.models[ticket.model]
                if ticket in m.running and min(reserve, ticket.max_tokens) > ticket.reserved:
                    m.growing[ticket] = min(reserve, ticket.max_tokens)
            case Pin(model, pinned):
                self.models[model].pinned = pinned
                self.models[model].unload_asked = False
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

    def _reconfigure(self, specs: Mapping[str, ModelSpec], changed: frozenset[str]) -> None:
        for name, m in self.models.items():
            if name not in specs:
                m.retired = m.stale = True
            elif name in changed or m.retired:  # (retired: added back before it stopped)
                m.spec, m.retired, m.pinned = specs[name], False, specs[name].pinned
                m.failures, m.retry_at = 0, 0.0  # a new config may load
                m.stale = m.state is not State.ABSENT
                if m.state is State.ABSENT:
                    self._absent(m)  # takes the new settings now
        for name, spec in specs.items():
            self.models.setdefault(name, ModelState(spec, context=self.ledger.context))

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
        pinned = sum(o.bytes for name, o in self.models.items() if o.pinned and name != model)
        room = self.ledger.budget - pinned
        if m.base + m.kv(ticket, ticket.max_tokens) > room:  # all it may write, alone
            return self.ledger.too_large(ticket, room, pinned)
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

    def _absent(self, m: ModelState) -> None:
        m.state, m.runner, m.held, m.measured = State.ABSENT, None, 0, 0
        m.context = self.ledger.context  # what its next runner will hold before the model
        m.prefixes = m.prefixes_used = 0
        m.running.clear()
        m.growing.clear()
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
            for t in [t for t in m.queue if t.deadline <= now]:
                m.queue.remove(t)
                waited = f"{now - t.since:.0f} s (queue timeout {m.spec.queue_timeout_s:g} s)"
                effects.append(Reject(t, QueueTimeout(f"waited {waited} for model {name!r}")))
            if m.idle and m.stale:
                effects.append(self._stop(name, "manual"))
            elif m.idle and not m.pinned:
                if m.unload_asked:
                    effects.append(self._stop(name, "manual"))
                elif now >= m.expires:
                    effects.append(self._stop(name, "idle" if m.keep_alive_s == 0 else "expired"))
        self._drain(now)
        effects += self._grow()
        effects += self._grant(now)
        effects += self._load()
        effects += self._grant(now)  # into room the load step made
        return effects + self._preempt()

    def _next(self, name: str) -> Ticket:
        """The queued ticket model ``name`` serves next (it has one)."""
        return self.order.first(self.models[name].queue, self.now)

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

    def _grow(self) -> list[Effect]:
        """Step 10a: running sequences grow their reservations, oldest first,
        while the growth fits in free memory, taking back prefix-cache
        reservations nobody uses and idle models' cached prefixes for it."""
        effects: list[Effect] = []
        for m in self.models.values():
            for t, reserve in sorted(m.growing.items(), key=lambda tr: tr[0].since):
                need = m.growth(m.kv(t, reserve) - m.kv(t))
                if need > self.ledger.free:
                    more, _ = self.ledger.make_room(need - self.ledger.free)
                    effects += more
                if need > self.ledger.free:
                    return effects  # the rest wait too
                del m.growing[t]
                t.reserve = reserve
                effects.append(Grown(t))
        return effects

    def _grant(self, now: float) -> list[Effect]:
        """Step 10: grant queued tickets, in the order's rank across ready models,
        while each one's KV reservation fits in free memory; the first that
        does not fit stops the rest (it waits for room, step 11). A running
        sequence waiting to grow (10a) goes before any new request."""
        effects: list[Effect] = []
        if any(m.growing for m in self.models.values()):
            return effects
        while ready := self._grantable():
            m, t = min(
                ((m, self.order.first(m.queue, now)) for m in ready),
                key=lambda mt: self.order.rank(mt[1], now),
            )
            if m.growth(m.kv(t)) > self.ledger.free:
                break
            m.queue.remove(t)
            m.running.add(t)
            m.last_used = t.granted = now
            self.order.granted(t)
            if t.keep_alive_s is not None:
                m.keep_alive_s = t.keep_alive_s
            effects.append(Grant(t, m.runner))
        return effects

    def _preempt(self) -> list[Effect]:
        """Step 13: a sequence that cannot grow has the lowest-priority, newest
        sequence below it that can pause paused (a lower priority, or the same
        and newer); else an interactive request still waiting (for a slot, or
        for memory) has the newest background one paused: on its own model if
        that model is full, else on any. One at a time: the next only once
        that one has let go."""
        if self.pausing:
            return []
        pausable = [t for m in self.models.values() for t in m.running if t.reserve is not None]
        for m in self.models.values():
            for t in m.growing:  # (growth that did not fit: step 10a)
                below = [v for v in pausable if (v.priority, v.granted) > (t.priority, t.granted)]
                if below:
                    victim = max(below, key=lambda v: (v.priority, v.granted or 0.0, v.id))
                    self.pausing.add(victim)
                    return [Pause(victim)]
        short = self.waiting_for_memory()
        for name, m in self.models.items():
            if not m.queue or self._next(name).priority != INTERACTIVE:
                continue
            full = m.state is State.READY and len(m.running) >= m.spec.max_concurrency
            if not full and name not in short:
                continue  # it waits for its load, not for what others hold
            holders = [m] if full else list(self.models.values())
            victims = [
                t
                for o in holders
                for t in o.running
                if t.priority == BACKGROUND and t.reserve is not None  # (it can go on later)
            ]
            if victims:
                victim = max(victims, key=lambda t: (t.granted or 0.0, t.id))
                self.pausing.add(victim)
                return [Pause(victim)]
        return []

    def _candidates(self) -> list[str]:
        """Models waiting for memory, in the order's rank of their next
        tickets (oldest first by default): absent ones with queued tickets,
        and ready ones whose next ticket did not fit."""
        blocked = {id(m) for m in self._grantable()}  # after a grant pass: no room
        waiting = [
            name
            for name, m in self.models.items()
            if m.queue and (m.state is State.ABSENT or id(m) in blocked)
        ]
        return sorted(waiting, key=lambda n: (self.order.rank(self._next(n), self.now), n))

    def _evictable(self) -> list[str]:
        """Idle (or drained) unpinned ready models, in eviction order."""
        names = [
            name
            for name, m in self.models.items()
            if m.state is State.READY
            and not m.pinned
            and not m.running
            and (m.draining or not m.queue)
        ]
        return sorted(names, key=lambda n: (self.models[n].last_used, self.models[n].keep_alive_s))

    def _load(self) -> list[Effect]:
        effects: list[Effect] = []
        stopping = sum(m.charged for m in self.models.values() if m.state is State.STOPPING)
        over = (
            self.ledger.used - self.ledger.budget - stopping
        )  # not counting runners on their way out
        if over > 0:  # measured use grew past the budget
            more, freed = self.ledger.make_room(over, loading=True)
            effects += more
            over -= freed
        for v in self._evictable():
            if over <= 0:
                break
            effects.append(self._stop(v, "memory"))
            over -= self.models[v].charged
        free, incoming = self.ledger.room()
        candidates = self._candidates()
        for name in candidates:
            m = self.models[name]
            cost = self.ledger.need(name, self._next(name))
            if cost > free + incoming:
                unused, held = self.ledger.reclaimable()
                short = cost - free - incoming
                enough = short <= sum(b for _, b in unused) + sum(b for _, b in held)
                more, freed = self.ledger.make_room(short, held=enough)
                effects += more
                free += freed
            if cost <= free:
                free -= cost  # a ready model's next ticket takes it in the next grant
                if m.state is State.ABSENT:
                    m.state, m.held, self.ledger.spare = State.LOADING, m.base, 0
                    effects.append(StartRunner(name, 0, self._next(name).prompt))
                continue
            if cost > free + incoming:
                victims, reclaim = [], 0
                for v in self._evictable():
                    if free + incoming + reclaim >= cost:
                        break
                    victims.append(v)
                    reclaim += self.models[v].charged
                short = cost - free - incoming - reclaim
                _, held = self.ledger.reclaimable()
                if short > sum(b for n, b in held if n not in victims):
                    break  # busy models hold the memory: later candidates wait too
                if short > 0:  # pinned models' cached prefixes make up the rest
                    more, freed = self.ledger.make_room(short, unused=False, spare=tuple(victims))
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
            effects = [
                self.ledger.read_ahead(e) if isinstance(e, StartRunner) else e for e in effects
            ]
            effects += self.ledger.grow()
        return effects

    def _blocked(self) -> tuple[str, int] | None:
        """The first load candidate that idle models cannot make room for, and
        the bytes it lacks."""
        free, incoming = self.ledger.room()
        unused, held = self.ledger.reclaimable()
        evictable = sum(self.models[v].charged for v in self._evictable())
        spare = free + incoming + evictable + sum(b for _, b in unused)
        spare += sum(b for n, b in held if self.models[n].pinned)
        for name in self._candidates():
            cost = self.ledger.need(name, self._next(name))
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
        if now - self._next(name).since < self.max_turn_s:
            return
        busy = [
            n
            for n, m in self.models.items()
            if m.state is State.READY and not m.pinned and (m.running or m.queue) and n != name
        ]
        for n in sorted(busy, key=lambda n: self.models[n].last_used):
            if need <= 0:
                break
            self.models[n].draining = True
            need -= self.models[n].charged
