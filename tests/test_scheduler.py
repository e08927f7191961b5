"""The scheduler loop with a fake runner, in trio's virtual time."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
import trio
import trio.testing

from config.settings import ModelConfig
from scheduler.errors import ModelLoadFailed, QueueFull, QueueTimeout, ShuttingDown
from scheduler.events import StartRunner
from scheduler.memory import Size
from scheduler.pool import Scheduler


@attrs.frozen
class Measured:
    """A fake runner's stats: its memory, no prefixes."""

    memory: dict[str, int]
    prefix_bytes: int = 0


class FakeRunner:
    """Loads in ``load_s`` of (virtual) time; exits when stopped or crashed."""

    def __init__(self, model: str, load_s: float, fail: bool) -> None:
        self.model, self.takes_s, self.fail = model, load_s, fail
        self.load_s: float | None = load_s  # as a real runner reports it
        self.pid: int | None = None
        self.memory: dict[str, int] = {}
        self.prefix_bytes = 0
        self.exit = trio.Event()
        self.on_saving: Any = None
        self.on_saved: Any = None
        self.prefix_limits: list[int] = []  # what the scheduler let its prefix cache hold
        self.frozen = False  # then it answers nothing
        self.busy = False  # then it answers pings, not stats (one long step)
        self.killed: str | None = None

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with trio.move_on_after(self.takes_s):
            await self.exit.wait()  # killed while loading
        if self.killed is not None:
            raise ModelLoadFailed(self.killed)
        if self.fail:
            raise ModelLoadFailed(f"cannot load {self.model}")
        task_status.started(self)
        await self.exit.wait()

    async def alive(self) -> None:
        if self.frozen:
            await trio.sleep_forever()

    async def stats(self) -> Measured:
        if self.frozen or self.busy:
            await trio.sleep_forever()
        return Measured(self.memory)

    def stop(self) -> None:
        self.exit.set()

    def kill(self, reason: str) -> None:
        self.killed = reason
        self.exit.set()

    def limit_prefixes(self, nbytes: int) -> None:
        self.prefix_limits.append(nbytes)


class Factory:
    def __init__(self, load_s: float = 120.0, fail: bool = False) -> None:
        self.load_s, self.fail = load_s, fail
        self.made: list[FakeRunner] = []
        self.starts: list[StartRunner] = []

    async def __call__(self, start: StartRunner) -> FakeRunner:
        runner = FakeRunner(start.model, self.load_s, self.fail)
        self.made.append(runner)
        self.starts.append(start)
        return runner


MODELS = [ModelConfig("a", "/a", max_concurrency=2), ModelConfig("b", "/b", max_concurrency=2)]
GB = 10**9


async def started(
    nursery: trio.Nursery,
    factory: Factory,
    models: list[ModelConfig] = MODELS,
    budget: int = 100 * GB,
    cost: int = 10 * GB,
    kv_per_token: int = 0,
    **kw: Any,
) -> Scheduler:
    async def size(model: str) -> Size:
        return Size(cost, kv_per_token)

    scheduler = Scheduler(models, factory, budget=budget, size_model=size, **kw)
    await nursery.start(scheduler.run)
    return scheduler


def state(scheduler: Scheduler, model: str) -> dict[str, Any]:
    (m,) = [m for m in scheduler.status()["models"] if m["model"] == model]
    return m


async def test_concurrent_first_requests_share_one_load(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    factory = Factory()
    scheduler = await started(nursery, factory)
    got: list[Any] = []

    async def use() -> None:
        async with scheduler.lease("a") as runner:
            got.append(runner)
            await trio.sleep(1)

    async with trio.open_nursery() as inner:
        for _ in range(10):
            inner.start_soon(use)
    assert len(factory.made) == 1
    assert got == [factory.made[0]] * 10


async def test_a_frozen_runner_is_reported_then_killed_and_the_next_request_loads_again(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    factory = Factory(load_s=1)
    scheduler = await started(nursery, factory, runner_timeout_s=60)
    async with scheduler.lease("a"):
        pass
    (runner,) = factory.made
    await trio.sleep(10)
    assert scheduler.unresponsive() == {}  # it answers
    runner.frozen = True
    await trio.sleep(30)
    assert 20 < scheduler.unresponsive()["a"] <= 32
    await trio.sleep(40)
    assert runner.killed is not None and "stopped responding" in runner.killed
    assert state(scheduler, "a")["state"] == "absent" and scheduler.unresponsive() == {}
    async with scheduler.lease("a") as again:
        assert again is not runner and len(factory.made) == 2
    await trio.sleep(130)
    assert not again.killed  # the new one answers: it is left alone


async def test_a_busy_runner_is_not_frozen_and_a_frozen_load_is_ended(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A runner in one long step (a prefill, an embedding batch) answers pings
    but not stats: left alone however long; one that stops answering pings
    while it loads is killed, and its load fails for its requests."""
    factory = Factory(load_s=1)
    scheduler = await started(nursery, factory, runner_timeout_s=60)
    async with scheduler.lease("a"):
        pass
    (busy,) = factory.made
    busy.busy = True
    await trio.sleep(600)
    assert busy.killed is None and scheduler.unresponsive() == {}
    busy.busy = False

    factory.load_s = 300  # a long load: watched too
    loading = nursery.start_soon
    failed: list[BaseException] = []

    async def ask_b() -> None:
        try:
            async with scheduler.lease("b"):
                pass
        except Exception as e:
            failed.append(e)

    loading(ask_b)
    await trio.sleep(100)  # loading, and answering
    frozen = factory.made[1]
    assert frozen.killed is None
    frozen.frozen = True
    await trio.sleep(100)
    assert frozen.killed is not None and "stopped responding" in frozen.killed
    assert failed and "stopped responding" in str(failed[0])


async def test_a_load_reads_ahead_for_its_first_request_in_memory_the_budget_has(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    factory = Factory()
    scheduler = await started(nursery, factory, budget=12 * GB)  # "a" costs 10
    async with scheduler.lease("a", prompt=[5, 6, 7]):
        pass
    (start,) = factory.starts
    assert (start.model, start.prompt, start.prefixes) == ("a", (5, 6, 7), 2 * GB)


async def test_resident_model_serves_while_another_loads(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    factory = Factory(load_s=300.0)
    scheduler = await started(nursery, factory)
    async with scheduler.lease("a"):
        pass  # "a" is now resident
    t0 = trio.current_time()

    async def load_b() -> None:
        async with scheduler.lease("b"):
            pass

    nursery.start_soon(load_b)
    await trio.testing.wait_all_tasks_blocked()
    async with scheduler.lease("a"):
        assert trio.current_time() - t0 < 1  # not behind b's five-minute load
    assert state(scheduler, "b")["state"] == "loading"


async def test_queued_request_that_gives_up_never_runs(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    factory = Factory()
    scheduler = await started(nursery, factory)
    with trio.move_on_after(10):  # the load takes 120 s
        async with scheduler.lease("a"):
            pytest.fail("granted after withdrawing")
    await trio.testing.wait_all_tasks_blocked()
    assert state(scheduler, "a")["queued"] == 0
    assert len(factory.made) == 1  # its load had started; it is not retried either


async def test_extra_requests_wait_for_a_slot(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    scheduler = await started(nursery, Factory(load_s=1))
    order: list[str] = []

    async def use(name: str, hold: float) -> None:
        async with scheduler.lease("a"):
            order.append(f"{name}+")
            await trio.sleep(hold)
            order.append(f"{name}-")

    async with trio.open_nursery() as inner:
        for name, hold in (("x", 5), ("y", 10), ("z", 1)):
            inner.start_soon(use, name, hold)
            await trio.testing.wait_all_tasks_blocked()
    # max_concurrency is 2: z starts only when x finishes.
    assert order.index("z+") > order.index("x-")
    assert order.index("z+") < order.index("y-")


async def test_load_failure_reaches_every_waiter_once(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    factory = Factory(fail=True)
    scheduler = await started(nursery, factory)
    errors: list[Exception] = []

    async def use() -> None:
        try:
            async with scheduler.lease("a"):
                pass
        except ModelLoadFailed as e:
            errors.append(e)

    async with trio.open_nursery() as inner:
        for _ in range(3):
            inner.start_soon(use)
    assert len(errors) == 3 and len(factory.made) == 1
    await trio.sleep(3600)
    assert len(factory.made) == 1  # no retry loop


async def test_crashed_runner_is_loaded_again_on_next_request(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    factory = Factory(load_s=1)
    scheduler = await started(nursery, factory)
    async with scheduler.lease("a"):
        pass
    factory.made[0].exit.set()  # the process dies
    await trio.testing.wait_all_tasks_blocked()
    assert state(scheduler, "a")["state"] == "absent"
    assert scheduler.status()["used"] == 0
    async with scheduler.lease("a") as runner:
        assert runner is factory.made[1]


async def test_shutdown_stops_runners_and_refuses_new_leases(
    autojump_clock: trio.testing.MockClock,
) -> None:
    factory = Factory(load_s=1)
    async with trio.open_nursery() as nursery:
        scheduler = await started(nursery, factory)
        async with scheduler.lease("a"):
            pass
        scheduler.shutdown()
    # run() returned, so the nursery closed: every runner has exited.
    assert factory.made[0].exit.is_set()
    with pytest.raises(ShuttingDown):
        async with scheduler.lease("a"):
            pass


async def test_a_swap_waits_for_in_flight_requests(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    factory = Factory(load_s=5)
    scheduler = await started(nursery, factory, budget=100 * GB, cost=60 * GB)
    events: list[tuple[str, float]] = []

    async def use_a() -> None:
        async with scheduler.lease("a"):
            await trio.sleep(50)
            events.append(("a done", trio.current_time()))

    async def use_b() -> None:
        async with scheduler.lease("b"):
            events.append(("b granted", trio.current_time()))
            assert factory.made[0].exit.is_set()  # a's runner is gone first

    async with trio.open_nursery() as inner:
        inner.start_soon(use_a)
        await trio.sleep(10)
        inner.start_soon(use_b)
    (_, a_done), (_, b_granted) = events
    assert b_granted >= a_done + 5  # after a finished, plus b's own load
    assert evictions(scheduler) == {("a", "memory"): 1}
    assert scheduler.status()["used"] <= 100 * GB


async def test_idle_model_unloads_when_keep_alive_runs_out(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    factory = Factory(load_s=1)
    models = [ModelConfig("a", "/a", keep_alive_s=30)]
    scheduler = await started(nursery, factory, models)
    async with scheduler.lease("a"):
        pass
    await trio.sleep(29)
    assert state(scheduler, "a")["state"] == "ready"
    assert state(scheduler, "a")["expires_at"] is not None
    await trio.sleep(2)
    assert factory.made[0].exit.is_set()
    assert state(scheduler, "a")["state"] == "absent"
    assert evictions(scheduler) == {("a", "expired"): 1}


async def test_queue_limit_and_queue_timeout(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    models = [ModelConfig("a", "/a", max_concurrency=1, queue_limit=1, queue_timeout_s=10)]
    scheduler = await started(nursery, Factory(load_s=1), models)
    holding = trio.Event()

    async def hold() -> None:
        async with scheduler.lease("a"):
            holding.set()
            await trio.sleep(60)

    nursery.start_soon(hold)
    await holding.wait()
    t0 = trio.current_time()
    async with trio.open_nursery() as inner:

        async def wait_in_queue() -> None:
            with pytest.raises(QueueTimeout):
                async with scheduler.lease("a"):
                    pass
            assert trio.current_time() - t0 == pytest.approx(10)

        inner.start_soon(wait_in_queue)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(QueueFull):  # one running, one waiting: full
            async with scheduler.lease("a"):
                pass


async def test_unload_and_preload(autojump_clock: trio.testing.MockClock) -> None:
    factory = Factory(load_s=3)
    models = [ModelConfig("a", "/a", preload=True), ModelConfig("b", "/b")]
    async with trio.open_nursery() as nursery:
        scheduler = await started(nursery, factory, models)
        await trio.sleep(5)
        assert state(scheduler, "a")["state"] == "ready"  # loaded with no request
        assert state(scheduler, "b")["state"] == "absent"
        scheduler.unload("a")
        await trio.testing.wait_all_tasks_blocked()
        assert state(scheduler, "a")["state"] == "absent"
        assert evictions(scheduler) == {("a", "manual"): 1}
        scheduler.shutdown()


def evictions(scheduler: Scheduler) -> dict[tuple[str, str], float]:
    """The eviction counter's samples: (model, reason) -> count."""
    (family,) = [m for m in scheduler.metrics.registry.collect() if m.name == "mlxd_evictions"]
    return {
        (s.labels["model"], s.labels["reason"]): s.value
        for s in family.samples
        if s.name.endswith("_total") and s.value
    }
