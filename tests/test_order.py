"""Who goes next among queued requests (``scheduler/order.py``), alone and
through the policy."""

from __future__ import annotations

from collections import Counter

from scheduler import events as pe
from scheduler import policy as p
from scheduler.order import Fair

GB = 10**9
RUNNER = object()


def ticket(client: str, since: float, priority: int = pe.NORMAL, weight: float = 1.0) -> pe.Ticket:
    return pe.Ticket("m", client=client, priority=priority, weight=weight, since=since)


def serve(order: Fair, queue: list[pe.Ticket], n: int, now: float = 0.0) -> list[str]:
    """The clients of the next ``n`` grants from ``queue``."""
    out = []
    for _ in range(n):
        t = order.first(queue, now)
        queue.remove(t)
        order.granted(t)
        out.append(t.client)
    return out


def test_a_backlog_delays_another_clients_next_request_by_one_of_its_own() -> None:
    order = Fair()
    queue = [ticket("indexer", since=i) for i in range(40)]
    assert serve(order, queue, 5) == ["indexer"] * 5  # alone, it has every turn
    queue += [ticket("editor", since=50 + i) for i in range(3)]  # behind 35 of the indexer's
    turns = ["editor", "indexer", "editor", "indexer", "editor", "indexer"]
    assert serve(order, queue, 6) == turns


def test_weights_share_turns_in_proportion() -> None:
    order = Fair()
    queue = [ticket("heavy", i, weight=2.0) for i in range(100)]
    queue += [ticket("light", i) for i in range(100)]
    got = Counter(serve(order, queue, 60))
    assert got == {"heavy": 40, "light": 20}


def test_priority_comes_first_and_a_long_wait_lifts_background() -> None:
    order = Fair(lift_after_s=120.0)
    old_background = ticket("batch", since=0.0, priority=pe.BACKGROUND)
    normal = ticket("script", since=50.0)
    interactive = ticket("editor", since=100.0, priority=pe.INTERACTIVE)
    queue = [old_background, normal, interactive]
    assert order.first(queue, now=101.0) is interactive
    queue.remove(interactive)
    assert order.first(queue, now=101.0) is normal  # background waits its turn...
    assert order.first(queue, now=121.0) is old_background  # ...but not for ever


def test_through_the_policy_an_interactive_request_passes_a_background_backlog() -> None:
    pol = p.Policy({"m": pe.ModelSpec(cost=GB, max_concurrency=1)}, 10 * GB, order=Fair())
    backlog = [pe.Ticket("m", client="indexer", priority=pe.BACKGROUND) for _ in range(10)]
    for i, t in enumerate(backlog):
        pol.handle(pe.Submitted(t, float(i)))
    assert pol.handle(pe.Loaded("m", RUNNER, 10.0)) == [pe.Grant(backlog[0], RUNNER)]
    typing = pe.Ticket("m", client="editor", priority=pe.INTERACTIVE)
    assert pol.handle(pe.Submitted(typing, 11.0)) == []  # the slot is taken
    assert pol.handle(pe.Released(backlog[0], 12.0)) == [pe.Grant(typing, RUNNER)]
