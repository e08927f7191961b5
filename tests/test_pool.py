"""The pool end to end: real runners, real HTTP; real tiny MLX models where
memory is measured, scripted ones (``tests/scripted.py``) where the pool's
bookkeeping is the point."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio

from config.settings import ModelConfig
from daemon.cli import main
from scheduler import memory
from tests.conftest import TLS, Daemon, running, settings_for
from tests.scripted import talking_model
from tests.waiting import eventually

NAMES = ("a", "b", "c")


async def ps(daemon: Daemon) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=60, verify=TLS) as http:
        reply = await http.get(f"{daemon.url}/api/ps")
    reply.raise_for_status()
    return dict(reply.json())


async def pool_where(
    daemon: Daemon, check: Callable[[dict[str, Any]], bool], what: str
) -> dict[str, Any]:
    """The lifecycle API's answer, once ``check`` holds for it."""

    async def poll() -> dict[str, Any] | None:
        pool = await ps(daemon)
        return pool if check(pool) else None

    return await eventually(poll, what=what)


def resident(pool: dict[str, Any]) -> list[str]:
    return [m["model"] for m in pool["models"] if m["state"] in {"loading", "ready", "stopping"}]


def check_budget(pool: dict[str, Any]) -> None:
    """At most two resident, charged and measured bytes under the budget."""
    assert len(resident(pool)) <= 2, pool
    assert pool["used"] <= pool["budget"]
    measured = sum(m["memory"].get("active", 0) for m in pool["models"])
    assert measured <= pool["budget"]


@asynccontextmanager
async def three_models(tiny_dir: Path, tmp_path: Path, spare: bool) -> AsyncIterator[Daemon]:
    """Three copies of the tiny model under a budget that fits two."""
    models = [
        ModelConfig(n, str(tiny_dir), max_concurrency=1, queue_limit=1, keep_alive_s=600)
        for n in NAMES
    ]
    cost = memory.estimate(tiny_dir, models[0]).bytes
    settings = settings_for(tmp_path, *models, memory_budget=int(cost * 2.5), spare_runner=spare)
    async with running(settings) as daemon:
        yield daemon


@pytest.fixture
async def three(tiny_dir: Path, tmp_path: Path) -> AsyncIterator[Daemon]:
    """Three scripted models in the tiny model's 512-token context, a token
    every 20 ms, one request at a time and one more waiting."""
    talker = talking_model(tiny_dir, tmp_path / "talker", step_s=0.02, context=512)
    models = [
        ModelConfig(n, str(talker), max_concurrency=1, queue_limit=1, keep_alive_s=600)
        for n in NAMES
    ]
    async with running(settings_for(tmp_path, *models)) as daemon:
        yield daemon


async def test_three_models_take_turns_under_a_budget_for_two(
    tiny_dir: Path, tmp_path: Path
) -> None:
    turns = (*NAMES, "a")  # c evicts a, then a evicts b: each time the least recently used
    async with (
        three_models(tiny_dir, tmp_path, spare=True) as three,  # the budget holds a spare too
        three.client() as client,
    ):
        for i, name in enumerate(turns):
            reply = await client.completions.create(model=name, prompt="Hi", max_tokens=3)
            assert reply.choices[0].finish_reason == "length"
            pool = await ps(three)
            check_budget(pool)
            # Each swap evicted the least recently used model.
            assert set(resident(pool)) == set(turns[max(0, i - 1) : i + 1])


async def test_an_over_long_prompt_is_refused_before_anything_loads(three: Daemon) -> None:
    before = await ps(three)
    assert resident(before) == []
    async with three.client() as client:
        with pytest.raises(openai.BadRequestError) as info:
            await client.completions.create(model="a", prompt="word " * 600, max_tokens=8)
    assert info.value.code == "context_length_exceeded"
    assert "512" in info.value.message
    assert resident(await ps(three)) == []


async def test_one_more_request_than_the_queue_holds_gets_429(three: Daemon) -> None:
    body = {"model": "a", "prompt": "Go", "max_tokens": 300, "ignore_eos": True, "stream": True}
    async with httpx.AsyncClient(timeout=60, verify=TLS) as http:
        started = trio.Event()

        async def long_stream() -> None:
            async with http.stream("POST", f"{three.url}/v1/completions", json=body) as r:
                assert r.status_code == 200
                async for _ in r.aiter_lines():
                    started.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(long_stream)  # runs (max_concurrency 1)
            await started.wait()
            nursery.start_soon(long_stream)  # waits (queue_limit 1)
            await pool_where(three, lambda pool: pool["models"][0]["queued"] == 1, "one queued")
            extra = await http.post(f"{three.url}/v1/completions", json=body)
            nursery.cancel_scope.cancel()
    assert extra.status_code == 429
    assert extra.headers["Retry-After"] == "1"
    assert extra.json()["error"]["code"] == "queue_full"


async def test_lifecycle_api_load_and_unload(tiny_dir: Path, tmp_path: Path) -> None:
    async with (
        three_models(tiny_dir, tmp_path, spare=True) as three,
        httpx.AsyncClient(timeout=60, verify=TLS) as http,
    ):
        loaded = await http.post(f"{three.url}/api/load", json={"model": "b"})
        assert loaded.json() == {"model": "b", "state": "ready"}
        pool = await ps(three)
        (b,) = [m for m in pool["models"] if m["model"] == "b"]
        assert b["state"] == "ready" and b["bytes"] > 0 and b["memory"]["active"] > 0
        assert b["expires_at"] is not None and b["running"] == b["queued"] == 0
        await http.post(f"{three.url}/api/unload", json={"model": "b"})
        pool = await pool_where(three, lambda pool: not resident(pool), "b unloaded")
        assert pool["used"] == 0
        # the load took the spare runner; a new one is started for the next load
        pool = await pool_where(
            three, lambda pool: pool["spare"]["state"] == "ready", "a new spare runner"
        )
        assert pool["spare"]["pid"] not in (None, b["pid"])
        unknown = await http.post(f"{three.url}/api/load", json={"model": "nope"})
        assert unknown.status_code == 404


async def test_a_killed_runner_fails_only_its_own_stream(three: Daemon) -> None:
    async with three.client() as client:
        await client.completions.create(model="a", prompt="Go", max_tokens=1)
        pool = await ps(three)
        pid = next(m["pid"] for m in pool["models"] if m["model"] == "a")
        other = await client.completions.create(
            model="b", prompt="Go", max_tokens=60, stream=True, extra_body={"ignore_eos": True}
        )
        # Frozen before its stream opens, so that the kill lands while the stream
        # is under way: a tiny model writes its 500 tokens faster than the daemon
        # hands the first to the client, so a kill "at the first token" could
        # come after the runner had sent them all (the stream then ended well).
        os.kill(pid, signal.SIGSTOP)
        try:
            doomed = await client.completions.create(
                model="a", prompt="Go", max_tokens=500, stream=True, extra_body={"ignore_eos": True}
            )
        finally:
            os.kill(pid, signal.SIGKILL)
        with pytest.raises(openai.APIError, match="exited"):
            async for _ in doomed:
                pass
        finish = [c.choices[0].finish_reason async for c in other if c.choices]
        assert finish[-1] == "length"
        await pool_where(
            three,
            lambda pool: next(m for m in pool["models"] if m["model"] == "a")["bytes"] == 0,
            "the killed runner's model to hold nothing",
        )
        again = await client.completions.create(model="a", prompt="Go", max_tokens=3)
    assert again.choices[0].finish_reason == "length"


async def test_cli_ps_watch_redraws_the_view_until_interrupted(three: Daemon) -> None:
    port = str(three.settings.port)
    args = [sys.executable, "-m", "daemon.cli", "ps", "--watch", "0.2", "--port", port]
    watch = await trio.lowlevel.open_process(args, stdout=subprocess.PIPE)
    assert watch.stdout is not None
    seen = b""
    try:
        with trio.fail_after(60):
            while seen.count(b"\x1b[H\x1b[2J") < 3:  # the screen cleared and drawn again
                seen += await watch.stdout.receive_some()
            watch.send_signal(signal.SIGINT)
            assert await watch.wait() == 0
    finally:
        watch.kill()
    frame = seen.split(b"\x1b[H\x1b[2J")[2].decode()
    assert "every 0.2 s (Ctrl-C to stop)" in frame
    assert re.search(r"^a +(absent|ready)", frame, re.M), frame


async def test_keep_alive_zero_in_a_request_unloads_the_model_once_idle(three: Daemon) -> None:
    async with three.client() as client:
        await client.completions.create(model="c", prompt="Hi", max_tokens=2)
        assert "c" in resident(await ps(three))  # its configured keep-alive is 600 s
        await client.completions.create(
            model="c", prompt="Hi", max_tokens=2, extra_body={"keep_alive": 0}
        )
    await pool_where(three, lambda pool: "c" not in resident(pool), "c unloaded once idle")


async def test_cli_ps_load_unload_talk_to_the_daemon(
    three: Daemon, capsys: pytest.CaptureFixture[str]
) -> None:
    port = ["--port", str(three.settings.port)]
    assert await trio.to_thread.run_sync(main, ["load", "a", *port]) == 0
    assert await trio.to_thread.run_sync(main, ["ps", *port]) == 0
    out = capsys.readouterr().out
    assert "a: loaded" in out
    row = next(line for line in out.splitlines() if line.startswith("a "))
    assert "ready" in row and re.search(r"\d\.\d [KMG]iB", row)  # its charge, in human units
    assert "spare runner: off" in out  # (settings_for turns it off)
    assert await trio.to_thread.run_sync(main, ["pin", "a", *port]) == 0
    assert await trio.to_thread.run_sync(main, ["ps", *port]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("a "))
    assert row.endswith("pinned")
    assert await trio.to_thread.run_sync(main, ["unload", "a", *port]) == 0  # unpins it too
    await pool_where(three, lambda pool: not resident(pool), "a unloaded")
    assert await trio.to_thread.run_sync(main, ["load", "nope", *port]) == 1
    assert "does not exist" in capsys.readouterr().err
