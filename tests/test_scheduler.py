"""The scheduler loop with a fake runner, in trio's virtual time."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from config.settings import ModelConfig
from scheduler.errors import ModelLoadFailed, ShuttingDown
from scheduler.pool import Scheduler


class FakeRunner:
    """Loads in ``load_s`` of (virtual) time; exits when stopped or crashed."""

    def __init__(self, model: str, load_s: float, fail: bool) -> None:
        self.model, self.load_s, self.fail = model, load_s, fail
        self.pid: int | None = None
        self.memory: dict[str, int] = {}
        self.exit = trio.Event()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        await trio.sleep(self.load_s)
        if self.fail:
            raise ModelLoadFailed(f"cannot load {self.model}")
        task_status.started(self)
        await self.exit.wait()

    def stop(self) -> None:
        self.exit.set()


class Factory:
    def __init__(self, load_s: float = 120.0, fail: bool = False) -> None:
        self.load_s, self.fail = load_s, fail
        self.made: list[FakeRunner] = []

    async def __call__(self, model: str) -> FakeRunner:
        runner = FakeRunner(model, self.load_s, self.fail)
        self.made.append(runner)
        return runner


MODELS = [ModelConfig("a", "/a", max_concurrency=2), ModelConfig("b", "/b", max_concurrency=2)]


async def started(nursery: trio.Nursery, factory: Factory) -> Scheduler:
    scheduler = Scheduler(MODELS, factory)
    await nursery.start(scheduler.run)
    return scheduler


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
    assert scheduler.status()[1]["state"] == "loading"


async def test_queued_request_that_gives_up_never_runs(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    factory = Factory()
    scheduler = await started(nursery, factory)
    with trio.move_on_after(10):  # the load takes 120 s
        async with scheduler.lease("a"):
            pytest.fail("granted after withdrawing")
    await trio.testing.wait_all_tasks_blocked()
    assert scheduler.status()[0]["queued"] == 0


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
    assert scheduler.status()[0]["state"] == "absent"
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
