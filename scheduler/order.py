"""Who goes next among queued requests: the policy's ordering hook.

The policy (``scheduler/policy.py``) asks an ``Order`` which ticket a model
serves next (``first``), which model's next ticket goes first across models,
for slots and for memory alike (``rank``, lowest first), and tells it whom it
granted (``granted``). ``Arrival`` is first come, first served. ``Fair`` is
what clients sharing the pool get:

- **priority** first: interactive, then normal, then background; a
  background request that has waited ``lift_after_s`` counts as normal from
  then on, so none waits for ever;
- then **turns between clients**: each client's next request is due one turn
  (``1 / weight`` of a grant) after its last grant, so a client with a
  backlog of forty is served once, then another's next, then its own again:
  no client's backlog delays another's next request by more than one of its
  own (by its weight);
- then the oldest.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from scheduler.events import BACKGROUND, NORMAL, Ticket


class Order(Protocol):
    def first(self, queue: Sequence[Ticket], now: float) -> Ticket: ...
    def rank(self, ticket: Ticket, now: float) -> tuple[float, ...]: ...
    def granted(self, ticket: Ticket) -> None: ...


class Arrival:
    """Oldest first, within a model and across models."""

    def first(self, queue: Sequence[Ticket], now: float) -> Ticket:
        return queue[0]

    def rank(self, ticket: Ticket, now: float) -> tuple[float, ...]:
        return ticket.since, ticket.id

    def granted(self, ticket: Ticket) -> None:
        pass


class Fair:
    """Priority, then turns between clients by weight (start-time fair
    queueing: a client's next turn starts where its last one finished, or at
    the pool's current turn if that is later, so a client that was away
    gets no burst of turns on its return), then age."""

    def __init__(self, lift_after_s: float = 120.0) -> None:
        self.lift_after_s = lift_after_s
        self._now = 0.0  # the start of the turn last granted
        self._finish: dict[str, float] = {}  # where each client's last turn ended

    def priority(self, ticket: Ticket, now: float) -> int:
        """Its priority now: a background ticket waiting long enough is lifted."""
        if ticket.priority == BACKGROUND and now - ticket.since >= self.lift_after_s:
            return NORMAL
        return ticket.priority

    def _start(self, ticket: Ticket) -> float:
        return max(self._now, self._finish.get(ticket.client, 0.0))

    def rank(self, ticket: Ticket, now: float) -> tuple[float, ...]:
        return self.priority(ticket, now), self._start(ticket), ticket.since, ticket.id

    def first(self, queue: Sequence[Ticket], now: float) -> Ticket:
        return min(queue, key=lambda t: self.rank(t, now))

    def granted(self, ticket: Ticket) -> None:
        start = self._start(ticket)
        self._finish[ticket.client] = start + 1.0 / ticket.weight
        self._now = start
