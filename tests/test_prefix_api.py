"""Prefix reuse as clients see it: the official client, a real daemon, the
bundled SmolLM2 (its answers, unlike a random model's, do not hang on rounding)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from openai.types.chat import ChatCompletionMessageParam

from config.settings import ModelConfig
from tests.conftest import TLS, Daemon, running, serving, settings_for
from tests.test_pool import pool_where, resident

SYSTEM = {"role": "system", "content": "You answer in one short sentence. " * 6}
QUESTIONS = ("Name a colour.", "Name a fruit.", "Name a city.")


@pytest.fixture
async def smol(smollm2_dir: Path, tmp_path: Path) -> Any:
    """A daemon of the test's own, whose ``smol`` keeps prefixes."""
    settings = settings_for(tmp_path, ModelConfig("smol", str(smollm2_dir), keep_alive_s=600))
    async with running(settings) as daemon:
        yield daemon


@pytest.fixture(scope="module")
def plain(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """The same model without a prefix cache, in a daemon the module shares
    (it keeps nothing from one request to the next)."""
    work = tmp_path_factory.mktemp("plain")
    model = ModelConfig("plain", str(smollm2_dir), prefix_cache_bytes=0)
    with serving(settings_for(work, model)) as daemon:
        yield daemon


async def turn(daemon: Daemon, model: str, messages: list[dict[str, Any]]) -> tuple[str, int]:
    """A streamed chat turn: its text and the prompt tokens it reused."""
    async with daemon.client(timeout=120) as client:
        stream = await client.chat.completions.create(
            model=model,
            messages=cast("list[ChatCompletionMessageParam]", messages),
            temperature=0,
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            usage = chunk.usage or usage
    assert usage is not None and usage.prompt_tokens_details is not None
    return text, usage.prompt_tokens_details.cached_tokens or 0


async def pool(daemon: Daemon) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=60, verify=TLS) as http:
        reply = await http.get(f"{daemon.url}/api/ps")
    reply.raise_for_status()
    return {m["model"]: m for m in reply.json()["models"]}


async def test_a_conversation_reports_growing_cached_tokens_and_says_the_same(
    smol: Daemon, plain: Daemon, caplog: pytest.LogCaptureFixture
) -> None:
    messages: list[dict[str, Any]] = [SYSTEM]
    cached = []
    with caplog.at_level(logging.INFO, logger="mlxd.request"):
        for question in QUESTIONS:
            messages.append({"role": "user", "content": question})
            text, reused = await turn(smol, "smol", messages)
            assert (text, 0) == await turn(plain, "plain", messages)
            cached.append(reused)
            messages.append({"role": "assistant", "content": text})
    assert cached[0] == 0 < cached[1] < cached[2]
    assert f"cached_tokens={cached[2]}" in caplog.text
    assert (await pool(smol))["smol"]["prefix_cache"]["bytes"] > 0
    assert (await pool(plain))["plain"]["prefix_cache"]["bytes"] == 0

    async with smol.client(timeout=120) as client:  # the Responses API reports it too
        reply = await client.responses.create(
            model="smol",
            input=messages,  # type: ignore[arg-type]
            temperature=0,
            max_output_tokens=4,
        )
    assert reply.usage is not None
    assert reply.usage.input_tokens_details.cached_tokens >= cached[2]


async def test_after_an_unload_a_follow_up_reads_its_prefix_from_disk(
    smol: Daemon, plain: Daemon, capfd: pytest.CaptureFixture[str]
) -> None:
    messages: list[dict[str, Any]] = [SYSTEM, {"role": "user", "content": QUESTIONS[0]}]
    text, _ = await turn(smol, "smol", messages)
    async with httpx.AsyncClient(timeout=60, verify=TLS) as http:
        (await http.post(f"{smol.url}/api/unload", json={"model": "smol"})).raise_for_status()
        await pool_where(smol, lambda ps: "smol" not in resident(ps), "smol unloaded")
        models = await pool(smol)
        assert models["smol"]["prefix_cache"]["disk_bytes"] > 0  # written on the way out
        messages += [{"role": "assistant", "content": text}, {"role": "user", "content": "More?"}]
        again, reused = await turn(smol, "smol", messages)
        assert reused > len(SYSTEM["content"]) // 8  # at least the system prompt, from disk
        assert "while the weights loaded" in capfd.readouterr().err  # the load read it
        assert (again, 0) == await turn(plain, "plain", messages)
        metrics = (await http.get(f"{smol.url}/metrics")).text
    assert 'mlxd_prefix_cache_hits_total{model="smol"} 1.0' in metrics
    assert 'mlxd_prefix_cache_misses_total{model="smol"} 1.0' in metrics
    assert f'mlxd_prefix_cache_tokens_total{{model="smol"}} {float(reused)}' in metrics
    # What the unload wrote is counted, and taken from the hour's write bound.
    written = sample(metrics, 'mlxd_prefix_cache_disk_written_bytes_total{model="smol"}')
    assert written > 0
    left = sample(metrics, "mlxd_prefix_cache_disk_write_budget_bytes")
    assert left == smol.settings.prefix_disk_writes - written


def sample(metrics: str, name: str) -> float:
    """The value of the sample ``name`` (with its labels) in an exposition."""
    (line,) = [line for line in metrics.splitlines() if line.startswith(name + " ")]
    return float(line.split()[-1])
