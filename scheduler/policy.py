"""What the pool decides, as a pure state machine: events in, effects out.

``Policy.handle(event)`` never blocks, sleeps or does I/O, so every decision is
tested by calling it directly. One task (``scheduler/pool.py``) owns the policy
and carries out the effects; nothing else touches its state.

Decision steps, for each event:

1. ``Submitted``: if the daemon is stopping, reject with ``ShuttingDown``;
   otherwise append the ticket to its model's queue (FIFO).
2. ``Withdrawn`` (the client gave up while queued): drop it from the queue. If
   it was granted in the same instant, treat it as ``Released``.
3. ``Released``: the request is done; its slot frees up.
4. ``Loaded``: the model's runner is ready.
5. ``LoadFailed``: the model is absent again and every queued ticket is
   rejected with the error. Nothing retries by itself: the next request tries
   again, so a broken model cannot spin in a load loop.
6. ``RunnerExited``: the model is absent. Requests that were running have
   already had their streams failed by the runner handle; if requests are
   queued, a fresh load starts (step 8).
7. ``Shutdown``: reject queued tickets, stop every runner, accept nothing new.

Then, for the model the event concerns:

8. absent with queued tickets → ``StartRunner`` (one load, however many
   requests are waiting: loads are single-flight);
9. ready → ``Grant`` queued tickets in order while fewer than the model's
   ``max_concurrency`` are running.
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from collections.abc import Mapping
from typing import Any

import attrs

from scheduler.errors import MlxdError, ShuttingDown

_ticket_ids = itertools.count(1)


@attrs.define(eq=False)
class Ticket:
    """One request's claim on a model. Compared by identity."""

    model: str
    id: int = attrs.field(factory=lambda: next(_ticket_ids))


# -- events ----------------------------------------------------------------


@attrs.frozen
class Submitted:
    ticket: Ticket


@attrs.frozen
class Withdrawn:
    ticket: Ticket


@attrs.frozen
class Released:
    ticket: Ticket


@attrs.frozen
class Loaded:
    model: str
    runner: Any


@attrs.frozen
class LoadFailed:
    model: str
    error: MlxdError


@attrs.frozen
class RunnerExited:
    model: str


@attrs.frozen
class Shutdown:
    pass


Event = Submitted | Withdrawn | Released | Loaded | LoadFailed | RunnerExited | Shutdown

# -- effects ---------------------------------------------------------------


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
    model: str


@attrs.frozen
class StopRunner:
    model: str
    runner: Any


Effect = Grant | Reject | StartRunner | StopRunner


class State(enum.Enum):
    ABSENT = "absent"
    LOADING = "loading"
    READY = "ready"
    STOPPING = "stopping"


@attrs.define
class ModelState:
    max_concurrency: int
    state: State = State.ABSENT
    runner: Any = None
    queue: deque[Ticket] = attrs.field(factory=deque)
    running: set[Ticket] = attrs.field(factory=set)


class Policy:
    def __init__(self, max_concurrency: Mapping[str, int]) -> None:
        self.models = {name: ModelState(n) for name, n in max_concurrency.items()}
        self.stopping = False

    @property
    def finished(self) -> bool:
        """Stopping, and no runner is left alive."""
        return self.stopping and all(m.state is State.ABSENT for m in self.models.values())

    def handle(self, event: Event) -> list[Effect]:
        effects: list[Effect] = []
        match event:
            case Submitted(ticket):
                if self.stopping:
                    return [Reject(ticket, ShuttingDown("the server is shutting down"))]
                self.models[ticket.model].queue.append(ticket)
                model = ticket.model
            case Withdrawn(ticket) | Released(ticket):
                m = self.models[ticket.model]
                if ticket in m.queue:
                    m.queue.remove(ticket)
                m.running.discard(ticket)
                model = ticket.model
            case Loaded(model, runner):
                m = self.models[model]
                m.runner = runner
                if self.stopping:
                    m.state = State.STOPPING
                    return [StopRunner(model, runner)]
                m.state = State.READY
            case LoadFailed(model, error):
                m = self.models[model]
                m.state, m.runner = State.ABSENT, None
                effects += [Reject(t, error) for t in m.queue]
                m.queue.clear()
                return effects
            case RunnerExited(model):
                m = self.models[model]
                m.state, m.runner = State.ABSENT, None
                m.running.clear()
            case Shutdown():
                self.stopping = True
                for name, m in self.models.items():
                    effects += [
                        Reject(t, ShuttingDown("the server is shutting down")) for t in m.queue
                    ]
                    m.queue.clear()
                    if m.state is State.READY:
                        m.state = State.STOPPING
                        effects.append(StopRunner(name, m.runner))
                return effects
        return effects + self._dispatch(model)

    def _dispatch(self, model: str) -> list[Effect]:
        m = self.models[model]
        if self.stopping:
            return []
        if m.state is State.ABSENT and m.queue:
            m.state = State.LOADING
            return [StartRunner(model)]
        effects: list[Effect] = []
        if m.state is State.READY:
            while m.queue and len(m.running) < m.max_concurrency:
                ticket = m.queue.popleft()
                m.running.add(ticket)
                effects.append(Grant(ticket, m.runner))
        return effects
