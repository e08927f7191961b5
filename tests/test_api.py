"""The HTTP API against real runners on a tiny random-weight model."""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import openai
import pytest
import trio

from tests.conftest import Daemon

CHAT = [{"role": "user", "content": "Say something."}]


async def ps(daemon: Daemon, model: str = "tiny") -> dict:
    async with httpx.AsyncClient(timeout=120) as http:
        body = (await http.get(f"{daemon.url}/api/ps")).json()
    (entry,) = [m for m in body["models"] if m["model"] == model]
    return entry


async def runner_stats(daemon: Daemon, after: float = 0.0, **want: int) -> dict:
    """The model's runner counters in ``/api/ps`` once the pool has measured
    them after ``after`` (Unix time) with the values in ``want``."""
    with trio.fail_after(60):
        while True:
            stats = (await ps(daemon))["runner"]
            fresh = stats is not None and stats["at"] > after
            if fresh and all(stats[k] == v for k, v in want.items()):
                return stats
            await trio.sleep(0.1)


async def test_models_lists_configured(tiny: Daemon) -> None:
    async with tiny.client() as client:
        models = await client.models.list()
        assert [m.id for m in models.data] == ["tiny"]
        assert (await client.models.retrieve("tiny")).id == "tiny"


async def test_max_tokens_gives_length_and_exact_usage(tiny: Daemon) -> None:
    async with tiny.client() as client:
        reply = await client.chat.completions.create(
            model="tiny", messages=CHAT, max_tokens=12, temperature=0
        )
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 12


async def test_completions_stream_and_not_agree_greedy(tiny: Daemon) -> None:
    async with tiny.client() as client:
        whole = await client.completions.create(
            model="tiny", prompt="Once upon a time", max_tokens=16, temperature=0
        )
        stream = await client.completions.create(
            model="tiny", prompt="Once upon a time", max_tokens=16, temperature=0, stream=True
        )
        pieces = [c.choices[0].text async for c in stream]
    assert "".join(pieces) == whole.choices[0].text
    assert whole.choices[0].finish_reason == "length"


async def test_stop_string_never_leaks(tiny: Daemon) -> None:
    async with tiny.client() as client:
        free = await client.completions.create(
            model="tiny", prompt="Hello", max_tokens=24, temperature=0
        )
        text = free.choices[0].text
        # Stop at a piece from the middle of what the model says unprompted.
        stop = text[len(text) // 2 : len(text) // 2 + 3]
        assert stop.strip(), text
        cut = await client.completions.create(
            model="tiny", prompt="Hello", max_tokens=24, temperature=0, stop=[stop]
        )
        stream = await client.completions.create(
            model="tiny", prompt="Hello", max_tokens=24, temperature=0, stop=stop, stream=True
        )
        streamed = "".join([c.choices[0].text async for c in stream])
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert streamed == cut.choices[0].text


async def test_seed_makes_sampling_reproducible(tiny: Daemon) -> None:
    async with tiny.client() as client:
        runs = [
            (
                await client.completions.create(
                    model="tiny", prompt="Pick", max_tokens=16, temperature=1.0, seed=seed
                )
            )
            .choices[0]
            .text
            for seed in (7, 7, 8)
        ]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


async def test_ten_concurrent_requests_are_batched(tiny: Daemon) -> None:
    results: list[str] = []

    async def one(client: openai.AsyncOpenAI, i: int) -> None:
        reply = await client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": f"Request {i}"}],
            max_tokens=40,
            temperature=0,
        )
        assert reply.choices[0].finish_reason == "length"
        results.append(reply.choices[0].message.content or "")

    async with tiny.client() as client, trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(one, client, i)
    assert len(results) == 10
    stats = await runner_stats(tiny, time.time(), active=0)
    assert stats["max_batch"] > 1


async def test_disconnect_cancels_generation_in_runner(tiny: Daemon) -> None:
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 400, "stream": True}
    async with httpx.AsyncClient(timeout=30) as http:
        async with http.stream("POST", f"{tiny.url}/v1/chat/completions", json=body) as resp:
            assert resp.status_code == 200
            seen = 0
            async for line in resp.aiter_lines():
                seen += line.startswith("data: ")
                if seen >= 3:
                    break
    stats = await runner_stats(tiny, cancelled=1, active=0)
    generated = stats["tokens"]
    later = await runner_stats(tiny, after=stats["at"] + 0.3)
    assert later["tokens"] == generated  # nothing more is decoded
    assert generated < 400 - 16  # warm-up tokens aside, it stopped early


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "tiny", "messages": []}, 400, "messages"),
        ({"model": "tiny", "messages": CHAT, "max_tokens": -1}, 400, "max_tokens"),
        ({"model": "tiny", "messages": CHAT, "max_tokens": "ten"}, 400, "max_tokens"),
        ({"model": "tiny", "messages": CHAT, "temperature": 7}, 400, "temperature"),
        ({"model": "tiny", "messages": CHAT, "top_p": 0}, 400, "top_p"),
        (
            {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]},
            400,
            "messages[0].role",
        ),
        ({"model": "tiny", "messages": CHAT, "n": 2}, 400, "n"),
        ({"model": "tiny", "messages": CHAT, "presence_penalty": 3}, 400, "presence_penalty"),
        ({"model": "tiny", "messages": CHAT, "logit_bias": {"x": 1}}, 400, "logit_bias"),
        ({"model": "tiny", "messages": CHAT, "logit_bias": {"5": 500}}, 400, "logit_bias"),
        ({"model": "tiny", "messages": CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
        (
            {"model": "tiny", "messages": CHAT, "response_format": {"type": "xml"}},
            400,
            "response_format",
        ),
        (
            {
                "model": "tiny",
                "messages": CHAT,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "objectx"}},
                },
            },
            400,
            "response_format",
        ),
        ({"messages": CHAT}, 400, "model"),
        ({"model": "nope", "messages": CHAT}, 404, "model"),
        ({"model": "tiny", "messages": CHAT, "max_tokens": 10_000}, 400, "messages"),
        ({"model": "tiny", "messages": CHAT, "top_k": 10**6}, 400, "top_k"),
        ({"model": "tiny", "messages": CHAT, "seed": 2**64}, 400, "seed"),
        ({"model": "tiny", "messages": CHAT, "logit_bias": {"²": 1}}, 400, "logit_bias"),
    ],
)
async def test_bad_requests_get_openai_errors(
    tiny: Daemon, body: dict, status: int, param: str
) -> None:
    async with httpx.AsyncClient(timeout=120) as http:
        resp = await http.post(f"{tiny.url}/v1/chat/completions", json=body)
        assert resp.status_code == status
        error = resp.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["param"] == param and error["message"]
        # The daemon keeps serving.
        ok = await http.post(
            f"{tiny.url}/v1/chat/completions",
            json={"model": "tiny", "messages": CHAT, "max_tokens": 2},
        )
        assert ok.status_code == 200


async def test_context_overflow_names_both_numbers(tiny: Daemon) -> None:
    async with tiny.client() as client:
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=500)
    err = info.value.body
    assert isinstance(err, dict) and err["code"] == "context_length_exceeded"
    assert "512" in err["message"] and "500" in err["message"]


async def test_malformed_and_oversized_bodies(tiny: Daemon) -> None:
    async with httpx.AsyncClient(timeout=60) as http:
        bad = await http.post(
            f"{tiny.url}/v1/chat/completions",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
        huge = json.dumps({"model": "tiny", "messages": CHAT, "pad": "x" * (9 * 1024 * 1024)})
        big = await http.post(
            f"{tiny.url}/v1/chat/completions",
            content=huge,
            headers={"content-type": "application/json"},
        )
        assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
        missing = await http.get(f"{tiny.url}/v1/nothing")
        assert missing.status_code == 404 and "error" in missing.json()


async def test_runner_killed_mid_stream_ends_the_stream_with_an_error(tiny: Daemon) -> None:
    async with tiny.client() as client:
        stream = await client.completions.create(
            model="tiny", prompt="Go", max_tokens=400, stream=True
        )
        pid = (await ps(tiny))["pid"]
        with pytest.raises(openai.APIError, match="exited"):
            async for _ in stream:
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                    pid = None
        # The next request loads the model again and is answered.
        reply = await client.completions.create(model="tiny", prompt="Go", max_tokens=3)
    assert reply.choices[0].finish_reason == "length"
