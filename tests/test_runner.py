"""A real runner process, driven through the daemon's client."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import trio

from api.texts import Texts
from runner import commands as cmd
from runner import events as ev
from runner import protocol
from runner.client import RunnerProcess, RunnerSpec
from runner.errors import LoadFailed, RunnerGone
from runner.protocol import Generate, Sampling
from tests.scripted import talking_model

GREEDY = Sampling(temperature=0.0)


async def tokens_of(
    runner: RunnerProcess,
    prompt: list[int],
    n: int,
    started: trio.Event | None = None,
    after: int = 0,
) -> list[int]:
    out: list[int] = []
    async with runner.generate(Generate(prompt, n, GREEDY)) as chunks:
        async for chunk in chunks:
            assert chunk.error is None
            if chunk.token is not None:
                out.append(chunk.token)
            if started is not None and len(out) >= after:
                started.set()
            if chunk.finish:
                return out
    raise AssertionError("stream ended without finishing")


async def test_joining_a_batch_and_leaving_it_keeps_greedy_output(
    nursery: trio.Nursery, smollm2_dir: Path
) -> None:
    texts = Texts(smollm2_dir, None)
    a = texts.chat_prompt([{"role": "user", "content": "List three colours."}])
    b = texts.chat_prompt([{"role": "user", "content": "Name a fruit."}])
    runner = await nursery.start(RunnerProcess(RunnerSpec("smol", smollm2_dir, 4)).run)
    alone = await tokens_of(runner, a, 16)

    joined = trio.Event()
    results: dict[str, list[int]] = {}

    async def first() -> None:
        results["a"] = await tokens_of(runner, a, 16, joined, after=4)

    async def second() -> None:
        await joined.wait()
        results["b"] = await tokens_of(runner, b, 6)

    async with trio.open_nursery() as inner:
        inner.start_soon(first)
        inner.start_soon(second)
    stats = await runner.stats()
    assert (
        stats.counters["max_batch"] == 2 and stats.counters["migrations"] >= 2
    )  # into the batch and out
    assert results["a"] == alone
    assert len(results["b"]) == 6
    runner.stop()


async def test_bad_model_directory_fails_to_load_clearly(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(LoadFailed, match="No safetensors found") as info:
        await RunnerProcess(RunnerSpec("broken", tmp_path, 1)).run()
    assert "'broken' failed to load" in str(info.value)


async def test_killed_runner_fails_its_streams(
    nursery: trio.Nursery, tiny_dir: Path, tmp_path: Path
) -> None:
    # a scripted model (tests/scripted.py), a token every 10 ms: still going when killed
    talker = talking_model(tiny_dir, tmp_path / "talker", step_s=0.01)
    runner = await nursery.start(RunnerProcess(RunnerSpec("tiny", talker, 2)).run)
    assert runner.pid is not None
    errors = []
    async with runner.generate(Generate([1, 2, 3], 10_000, GREEDY)) as chunks:
        async for chunk in chunks:
            if chunk.error is not None:
                errors.append(chunk.error)
                break
            os.kill(runner.pid, signal.SIGKILL)
    assert len(errors) == 1 and isinstance(errors[0], RunnerGone)


def test_kernel_warm_up_leaves_no_memory_behind() -> None:
    """A spare runner warms the GPU's kernels while it waits; the memory that
    took is given back, since nothing in the budget counts a spare."""
    import mlx.core as mx

    from runner.engine import warm_kernels

    mx.eval(mx.random.uniform())  # the random generator's key stays, as it should
    mx.clear_cache()
    before = mx.get_active_memory()
    warm_kernels()
    assert mx.get_peak_memory() > before  # it did run models
    assert mx.get_active_memory() == before
    assert mx.get_cache_memory() == 0


async def test_the_runner_keeps_mlx_freed_buffers_within_its_cache_limit(
    nursery: trio.Nursery, tiny_dir: Path
) -> None:
    """What the pool charges a model beyond its weights bounds the freed
    buffers MLX keeps for reuse, which otherwise grow with every new shape."""
    cached = {}
    for limit in (None, 256 * 1024):
        spec = RunnerSpec("tiny", tiny_dir, 8, cache_limit=limit)
        runner = await nursery.start(RunnerProcess(spec).run)
        with trio.fail_after(120):
            async with trio.open_nursery() as batch:
                for i in range(6):
                    batch.start_soon(tokens_of, runner, list(range(i, 150 + 20 * i)), 16)
        cached[limit] = (await runner.stats()).memory["cache"]
        runner.stop()
    assert cached[256 * 1024] <= 256 * 1024 < cached[None]


@pytest.mark.parametrize(
    "event",
    [
        ev.Spare(12, 1.5, 4096),
        ev.Ready(12, {"active": 1, "peak": 2, "cache": 3}, 0.4, 100),
        ev.Cached(7, 1200, "disk"),
        ev.Tokens([(7, 42, None, None), (8, 2, "stop", {"logprob": -0.5, "top": [[2, -0.5]]})]),
        ev.Embeddings.of(8, np.arange(6, dtype=np.float32).reshape(2, 3)),
        ev.Failed([7, None], "boom"),
        ev.Stats(2, {"active": 1}, {"steps": 9}, 512, {"bytes": 10}),
        ev.Saving({"active": 1}, 10),
        ev.Saved(100, 20),
        ev.Fatal("no weights"),
        ev.Pong(3),
    ],
    ids=lambda e: type(e).__name__,
)
def test_every_runner_event_reads_back_as_it_was_written(event: ev.Event) -> None:
    back = ev.read(protocol.decode(ev.line(event)))
    assert type(back) is type(event)
    if isinstance(event, ev.Embeddings):
        assert isinstance(back, ev.Embeddings)
        assert np.array_equal(back.vectors(), event.vectors())
    elif isinstance(event, ev.Tokens):  # JSON gives lists where tuples went
        assert isinstance(back, ev.Tokens)
        assert [tuple(o) for o in back.out] == event.out
    else:
        assert back == event


def test_a_line_that_is_no_runner_event_is_refused() -> None:
    with pytest.raises(ValueError, match="not a runner event"):
        ev.read({"ev": "gossip"})
    with pytest.raises(ValueError, match="malformed 'cached'"):
        ev.read({"ev": "cached", "tokens": 3})


@pytest.mark.parametrize(
    "command",
    [
        cmd.Load("/models/x", 4, 256, 1 << 20, "/cache/prefixes/ab", 1 << 30, 1 << 29, [1, 2]),
        Generate([1, 2, 3], 16, Sampling(temperature=0.5, top_k=4), (2,), id=7, more=True),
        cmd.Embed(8, [[101, 7592, 102]]),
        cmd.Cancel(7),
        cmd.PrefixLimit(0),
        cmd.Ping(3),
        cmd.AskStats(),
        cmd.Shutdown(),
    ],
    ids=lambda c: type(c).__name__,
)
def test_every_runner_command_reads_back_as_it_was_written(command: cmd.Command) -> None:
    assert cmd.read(protocol.decode(cmd.line(command))) == command


def test_a_malformed_command_is_refused_with_its_kind() -> None:
    with pytest.raises(ValueError, match="malformed 'generate'"):
        cmd.read({"op": "generate", "id": 3})  # no prompt
    with pytest.raises(ValueError, match="not a runner command"):
        cmd.read({"op": "dance"})
