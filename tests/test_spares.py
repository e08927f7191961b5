"""The spare runner process: started ahead of need, taken by the next load,
and replaced only once no load is under way."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
import trio

from runner.client import RunnerProcess, RunnerSpec
from runner.protocol import Generate, Sampling
from runner.spares import Spares
from tests.waiting import eventually


async def spare_in(spares: Spares, state: str) -> int | None:
    """Wait until the spare is in ``state``; its pid."""

    def in_state() -> dict[str, Any] | None:
        status = spares.status()
        return status if status["state"] == state else None

    status = await eventually(in_state, what=f"the spare to be {state!r}")
    pid: int | None = status["pid"]
    return pid


async def ready_spare(spares: Spares) -> int:
    pid = await spare_in(spares, "ready")
    assert pid is not None
    return pid


async def started_spares(nursery: trio.Nursery) -> tuple[Spares, int]:
    """A running ``Spares`` and the pid of its first ready spare."""
    spares = Spares()
    await nursery.start(spares.run)
    return spares, await ready_spare(spares)


async def generates(runner: RunnerProcess) -> bool:
    async with runner.generate(Generate([1, 2, 3], 4, Sampling(temperature=0.0))) as chunks:
        async for chunk in chunks:
            if chunk.error is not None:
                return False
            if chunk.finish:
                return True
    return False


async def test_a_load_takes_the_ready_spare_and_a_new_one_follows(
    nursery: trio.Nursery, tiny_dir: Path
) -> None:
    spares, spare = await started_spares(nursery)
    runner = RunnerProcess(RunnerSpec("tiny", tiny_dir, 2), spares=spares)
    await nursery.start(runner.run)
    assert runner.pid == spare
    assert await generates(runner)
    assert await ready_spare(spares) not in (spare, runner.pid)
    runner.stop()


async def test_the_pool_hears_what_a_spare_holds_and_says_when_one_may_start(
    nursery: trio.Nursery,
) -> None:
    held: list[int | None] = []
    asked = trio.Event()
    room = False

    def fits() -> bool:
        asked.set()
        return room

    spares = Spares()
    spares.watch(held.append, fits)
    await nursery.start(spares.run)
    with trio.fail_after(30):
        await asked.wait()
    assert spares.status()["state"] == "none" and held == []  # no room: no spare
    room = True
    spare = await ready_spare(spares)
    assert held[0] is None  # starting: charged what a runner held last time
    assert held[1:] == [spares.status()["bytes"]]  # then what it says it holds
    with spares.loading():  # (so that no new spare starts meanwhile)
        proc = await spares.take()
        assert proc.pid == spare and held[-1] == 0  # the load's now
    proc.kill()
    await proc.wait()


async def test_no_spare_starts_while_a_load_is_under_way(nursery: trio.Nursery) -> None:
    spares, spare = await started_spares(nursery)
    spares.LOOK_S = 0.1
    with spares.loading():
        proc = await spares.take()
        assert proc.pid == spare
        await trio.sleep(0.5)  # not a wait: a spare must not start meanwhile (the keeper
        # looks five times)
        assert spares.status() == {"state": "none", "pid": None, "bytes": 0}
    assert await ready_spare(spares) != spare
    proc.kill()
    await proc.wait()


async def test_a_spare_that_died_is_replaced_by_a_fresh_process(
    nursery: trio.Nursery, tiny_dir: Path
) -> None:
    spares, spare = await started_spares(nursery)
    with spares.loading():  # (so that no new spare starts meanwhile)
        os.kill(spare, signal.SIGKILL)
        await spare_in(spares, "none")
        runner = RunnerProcess(RunnerSpec("tiny", tiny_dir, 2), spares=spares)
        await nursery.start(runner.run)
    assert runner.pid != spare
    assert await generates(runner)
    runner.stop()


async def test_a_spare_stuck_starting_is_killed_and_a_load_gets_another(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    stuck = tmp_path / "python"  # a "python" that never gets to say it is ready
    stuck.write_text("#!/bin/sh\nexec sleep 600\n")
    stuck.chmod(0o755)
    spares = Spares(python=str(stuck))
    spares.START_TIMEOUT_S = 0.5
    await nursery.start(spares.run)
    starting = await spare_in(spares, "starting")
    assert starting is not None
    with spares.loading(), trio.fail_after(30):
        proc = await spares.take()
    assert proc.pid != starting
    with pytest.raises(ProcessLookupError):
        os.kill(starting, 0)  # killed and reaped
    proc.kill()
    await proc.wait()
