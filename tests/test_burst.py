"""Requests that arrive together are read together: the daemon's intake
says when others follow, and an idle runner waits for them that long."""

from __future__ import annotations

import queue
from collections.abc import Callable

import pytest

from api import record
from api.record import Intake, Record
from runner import __main__ as runner_main
from runner.protocol import Generate, Sampling
from scheduler.metrics import Metrics

Burst = Callable[["Arrivals"], list[int]]


class Arrivals:
    """A command queue whose messages arrive ``gap`` seconds after the one
    before, on a clock of its own: ``get`` returns the next one if it arrives
    within the timeout."""

    def __init__(self, *arrivals: tuple[float, Generate]) -> None:
        self.arrivals = list(arrivals)
        self.now = 0.0

    def get(self, timeout: float | None = None) -> Generate:
        if self.arrivals and (timeout is None or self.arrivals[0][0] <= timeout):
            gap, msg = self.arrivals.pop(0)
            self.now += gap
            return msg
        self.now += timeout or 0.0
        raise queue.Empty


def generate(n: int, more: bool) -> Generate:
    return Generate([1], 4, Sampling(), id=n, more=more)


@pytest.fixture
def burst(monkeypatch: pytest.MonkeyPatch) -> Callable[[Arrivals], list[int]]:
    """The ids of the next burst the runner reads from a queue."""

    def read(q: Arrivals) -> list[int]:
        monkeypatch.setattr(runner_main.time, "monotonic", lambda: q.now)
        got = runner_main._burst(q, None)  # type: ignore[arg-type]
        return [m.id for m in got if isinstance(m, Generate)]

    return read


def test_an_idle_runner_waits_for_requests_the_daemon_says_follow(burst: Burst) -> None:
    gap = 0.006  # longer than the wait after a lone request, within the one after "more"
    q = Arrivals(
        (0.0, generate(1, more=True)),
        (gap, generate(2, more=True)),
        (gap, generate(3, more=False)),
        (gap, generate(4, more=False)),
    )
    assert burst(q) == [1, 2, 3]  # 3 says nothing follows: 4 is not waited for
    assert burst(q) == [4]


def test_a_lone_request_waits_only_the_short_gap(burst: Burst) -> None:
    q = Arrivals((0.0, generate(1, more=False)), (0.006, generate(2, more=False)))
    assert burst(q) == [1]
    q = Arrivals((0.0, generate(1, more=False)), (0.001, generate(2, more=False)))
    assert burst(q) == [1, 2]  # but two sent within it still go together


def test_the_wait_is_bounded_however_many_follow(burst: Burst) -> None:
    steady = Arrivals(*[(0.009, generate(n, more=True)) for n in range(100)])
    got = burst(steady)
    assert got == list(range(len(got)))
    assert 0.009 * (len(got) - 1) <= runner_main.BURST_MAX_S < 0.009 * len(got)


def a_record(intake: Intake, n: int) -> Record:
    return Record(f"req_{n}", "/v1/completions", Metrics(), intake)


def test_intake_counts_requests_until_they_are_queued_or_finished() -> None:
    intake = Intake()
    first, second = a_record(intake, 1), a_record(intake, 2)
    first.queued()
    assert intake.busy()  # the second is still being read
    second.finish(400)
    assert not intake.busy()
    third = a_record(intake, 3)
    third.queued()
    third.queued()  # twice is harmless
    assert not intake.busy()


def test_a_request_that_never_leaves_the_intake_stops_counting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    intake = Intake()
    a_record(intake, 1)  # its handler was cancelled: it never says it left
    assert intake.busy()
    now = record.time.monotonic()
    monkeypatch.setattr(record.time, "monotonic", lambda: now + Intake.STALE_S + 0.1)
    assert not intake.busy()
