"""The HTTP API against real runners on a tiny random-weight model.

Tests that only send requests and read answers share one daemon
(``shared_tiny``); the one that counts its runner's cancellations has its own
(``tiny``), and the one that kills its runner its own with a scripted model
(``talker``)."""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import httpx
import openai
import pytest
import trio
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import TLS, Daemon
from tests.waiting import eventually

CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say something."}]


async def ps(daemon: Daemon, model: str = "tiny") -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=120, verify=TLS) as http:
        body = (await http.get(f"{daemon.url}/api/ps")).json()
    (entry,) = [m for m in body["models"] if m["model"] == model]
    return entry


async def runner_stats(daemon: Daemon, after: float = 0.0, **want: int) -> dict[str, Any]:
    """The model's runner counters in ``/api/ps`` once the pool has measured
    them after ``after`` (Unix time) with the values in ``want``."""

    async def measured() -> dict[str, Any] | None:
        stats: dict[str, Any] | None = (await ps(daemon))["runner"]
        if stats is None or stats["at"] <= after:
            return None
        return stats if all(stats[k] == v for k, v in want.items()) else None

    return await eventually(measured, what=f"runner counters {want} measured after {after}")


async def test_models_lists_configured(shared_tiny: Daemon) -> None:
    async with shared_tiny.client() as client:
        models = await client.models.list()
        assert [m.id for m in models.data] == ["tiny"]
        assert (await client.models.retrieve("tiny")).id == "tiny"


async def test_max_tokens_gives_length_and_exact_usage(shared_tiny: Daemon) -> None:
    async with shared_tiny.client() as client:
        reply = await client.chat.completions.create(
            model="tiny", messages=CHAT, max_tokens=12, temperature=0
        )
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 12


async def test_completions_stream_and_not_agree_greedy(shared_tiny: Daemon) -> None:
    async with shared_tiny.client() as client:
        whole = await client.completions.create(
            model="tiny", prompt="Once upon a time", max_tokens=16, temperature=0
        )
        stream = await client.completions.create(
            model="tiny", prompt="Once upon a time", max_tokens=16, temperature=0, stream=True
        )
        pieces = [c.choices[0].text async for c in stream]
    assert "".join(pieces) == whole.choices[0].text
    assert whole.choices[0].finish_reason == "length"


async def test_stop_string_never_leaks(shared_tiny: Daemon) -> None:
    async with shared_tiny.client() as client:
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


async def test_seed_makes_sampling_reproducible(shared_tiny: Daemon) -> None:
    async with shared_tiny.client() as client:
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


async def test_ten_concurrent_requests_are_batched(shared_tiny: Daemon) -> None:
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

    async with shared_tiny.client() as client, trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(one, client, i)
    assert len(results) == 10
    stats = await runner_stats(shared_tiny, time.time(), active=0)
    assert stats["max_batch"] > 1


async def test_disconnect_cancels_generation_in_runner(tiny: Daemon) -> None:
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 400, "stream": True}
    async with httpx.AsyncClient(timeout=30, verify=TLS) as http:
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


LONG: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "word " * 600}
]  # more than the tiny model's 512 tokens


async def test_max_tokens_past_the_context_get_the_room_there_is(shared_tiny: Daemon) -> None:
    """Agents ask for more than a context leaves (Claude Code: 32,000 on every
    turn): the answer gets the room there is and ends with ``length``."""
    async with shared_tiny.client() as client:
        reply = await client.chat.completions.create(
            model="tiny", messages=CHAT, max_tokens=32_000, temperature=0, logit_bias={"2": -100}
        )
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None
    assert reply.usage.prompt_tokens + reply.usage.completion_tokens == 512


async def test_bad_requests_get_openai_errors_and_the_daemon_serves_on(shared_tiny: Daemon) -> None:
    """A refusal reaches the client as OpenAI's error object, from every
    endpoint (each field's checks are in ``test_requests.py``); the refusals
    that need the model's tokenizer (its vocabulary, its context) are tried
    here, as is an unknown model."""
    chat = {"model": "tiny", "messages": CHAT}
    cases: list[tuple[str, dict[str, Any], int, str, str]] = [
        ("/v1/chat/completions", chat | {"temperature": 7}, 400, "temperature", "[0, 2]"),
        ("/v1/completions", {"model": "tiny", "prompt": ""}, 400, "prompt", "empty"),
        ("/v1/chat/completions", {"messages": CHAT}, 400, "model", "required"),
        ("/v1/chat/completions", chat | {"model": "nope"}, 404, "model", "nope"),
        ("/v1/chat/completions", chat | {"top_k": 10**6}, 400, "top_k", "tokens"),
        ("/v1/chat/completions", chat | {"top_k": 49152}, 400, "top_k", "must be fewer"),
        ("/v1/chat/completions", {"model": "tiny", "messages": LONG}, 400, "messages", "512"),
        ("/v1/completions", {"model": "tiny", "prompt": [1, 10**6]}, 400, "prompt", "vocabulary"),
        ("/v1/completions", {"model": "tiny", "prompt": "Hi"} | {"logit_bias": {"99999": 1}},
         400, "logit_bias", "vocabulary"),
    ]  # fmt: skip
    async with httpx.AsyncClient(timeout=120, verify=TLS) as http:
        for path, body, status, param, fragment in cases:
            resp = await http.post(f"{shared_tiny.url}{path}", json=body)
            assert resp.status_code == status, (body, resp.text)
            error = resp.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["type"] == "invalid_request_error"
            assert error["param"] == param and fragment in error["message"], (body, error)
        # The daemon serves on.
        ok = await http.post(
            f"{shared_tiny.url}/v1/chat/completions", json=chat | {"max_tokens": 2}
        )
        assert ok.status_code == 200


async def test_context_overflow_names_both_numbers(shared_tiny: Daemon) -> None:
    async with shared_tiny.client() as client:
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model="tiny", messages=LONG, max_tokens=5)
    err = info.value.body
    assert isinstance(err, dict) and err["code"] == "context_length_exceeded"
    assert "512 tokens" in err["message"] and "631 tokens" in err["message"]


async def test_malformed_and_oversized_bodies(shared_tiny: Daemon) -> None:
    async with httpx.AsyncClient(timeout=60, verify=TLS) as http:
        bad = await http.post(
            f"{shared_tiny.url}/v1/chat/completions",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
        huge = json.dumps({"model": "tiny", "messages": CHAT, "pad": "x" * (9 * 1024 * 1024)})
        big = await http.post(
            f"{shared_tiny.url}/v1/chat/completions",
            content=huge,
            headers={"content-type": "application/json"},
        )
        assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
        missing = await http.get(f"{shared_tiny.url}/v1/nothing")
        assert missing.status_code == 404 and "error" in missing.json()


async def test_runner_killed_mid_stream_ends_the_stream_with_an_error(talker: Daemon) -> None:
    async with talker.client() as client:
        await client.completions.create(model="tiny", prompt="Go", max_tokens=1)
        pid = (await ps(talker))["pid"]
        # Frozen before the stream opens, so the kill lands while it is under
        # way (the tiny model could otherwise send all 400 tokens before the
        # client read the first).
        os.kill(pid, signal.SIGSTOP)
        try:
            stream = await client.completions.create(
                model="tiny", prompt="Go", max_tokens=400, stream=True
            )
        finally:
            os.kill(pid, signal.SIGKILL)
        with pytest.raises(openai.APIError, match="exited"):
            async for _ in stream:
                pass
        # The next request loads the model again and is answered.
        reply = await client.completions.create(model="tiny", prompt="Go", max_tokens=3)
    assert reply.choices[0].finish_reason == "length"
