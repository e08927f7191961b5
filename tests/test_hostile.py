"""One client's bad request touches nobody else (the findings of the
hardening issue, each tried as a careless or hostile client would)."""

from __future__ import annotations

from pathlib import Path

import httpx
import trio

from runner.client import RunnerProcess, RunnerSpec
from runner.protocol import Sampling
from tests.conftest import Daemon

CHAT = [{"role": "user", "content": "Say something."}]


async def test_a_poison_sampling_value_is_refused_and_the_stream_beside_it_completes(
    tiny: Daemon,
) -> None:
    async with httpx.AsyncClient(timeout=120) as http:
        body = {"model": "tiny", "messages": CHAT, "max_tokens": 64, "temperature": 1.0}
        body |= {"stream": True, "ignore_eos": True}
        async with http.stream("POST", f"{tiny.url}/v1/chat/completions", json=body) as stream:
            assert stream.status_code == 200
            lines = stream.aiter_lines()
            async for line in lines:
                if line.startswith("data: {"):
                    break  # it is running
            for poison in ({"top_k": 10**9}, {"seed": -(2**64)}):
                bad = await http.post(
                    f"{tiny.url}/v1/chat/completions",
                    json={"model": "tiny", "messages": CHAT, "temperature": 1.0, **poison},
                )
                assert bad.status_code == 400, bad.text
            rest = [line async for line in lines if line]
        assert rest[-1] == "data: [DONE]" and not any('"error"' in line for line in rest)
        for seed in (-1, 2**64 - 1, 7):  # as signed or unsigned 64-bit integers
            ok = await http.post(
                f"{tiny.url}/v1/chat/completions",
                json={"model": "tiny", "messages": CHAT, "max_tokens": 4, "seed": seed},
            )
            assert ok.status_code == 200, ok.text


async def test_a_failed_step_fails_its_requests_and_the_runner_samples_on(
    nursery: trio.Nursery, tiny_dir: Path
) -> None:
    """Whatever still fails inside the runner (here a ``top_k`` past the
    vocabulary, sent without the API's checks) fails the requests of that
    step, and the runner goes on sampling for the next ones."""
    runner = await nursery.start(RunnerProcess(RunnerSpec("tiny", tiny_dir, 4)).run)

    async def outcome(sampling: Sampling) -> str:
        async with runner.generate([1, 2, 3], 4, sampling) as chunks:
            async for chunk in chunks:
                if chunk.error is not None:
                    return "error"
                if chunk.finish:
                    return "ok"
        return "unfinished"

    assert await outcome(Sampling(temperature=1.0, top_k=10**9)) == "error"
    assert await outcome(Sampling(temperature=1.0)) == "ok"
    assert await outcome(Sampling(temperature=1.0, seed=3)) == "ok"
    runner.stop()
