"""The memory ledger end to end: a tiny model that declares a 131k context,
under budgets far below its worst case (every sequence at full context),
served by real runners over real HTTP. A request is charged the KV its own
tokens need."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio

from config.settings import ModelConfig
from scheduler import memory
from tests.conftest import LONG_CONTEXT, TLS, running, settings_for
from tests.test_pool import pool_where

BUDGET = 64 * 2**20


def model_in(pool: dict[str, Any], name: str) -> dict[str, Any]:
    (m,) = [m for m in pool["models"] if m["model"] == name]
    return m


async def test_eight_requests_run_together_far_below_the_worst_case(
    long_context: Path, tmp_path: Path
) -> None:
    model = ModelConfig("long", str(long_context), max_concurrency=8)
    size = memory.estimate(long_context, model)
    assert size.bytes + 8 * LONG_CONTEXT * size.kv_per_token > 8 * BUDGET  # the worst case
    settings = settings_for(tmp_path, model, memory_budget=BUDGET)
    async with running(settings) as daemon, daemon.client() as client:
        finished: list[str | None] = []

        async def one(i: int) -> None:
            reply = await client.completions.create(
                model="long", prompt=f"Count to {i}:", max_tokens=16
            )
            finished.append(reply.choices[0].finish_reason)

        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(one, i)
        assert len(finished) == 8
        # 120k tokens of KV could never fit, though the context allows them.
        with pytest.raises(openai.BadRequestError) as info:
            await client.completions.create(model="long", prompt="Hi", max_tokens=120_000)
        assert info.value.code == "request_too_large"
        assert str(BUDGET) in info.value.message and "max_tokens" in info.value.message


async def test_a_long_request_waits_for_a_busy_model_then_evicts_it_once_idle(
    long_context: Path, tmp_path: Path
) -> None:
    models = [
        ModelConfig(name, str(long_context), max_concurrency=2, keep_alive_s=600)
        for name in ("a", "b")
    ]
    # Each request reserves all its max_tokens at once: a long one's whole KV.
    settings = settings_for(tmp_path, *models, memory_budget=BUDGET, kv_step_tokens=0)
    async with running(settings) as daemon, httpx.AsyncClient(timeout=120, verify=TLS) as http:
        for name in ("a", "b"):  # both fit, with room for short requests
            reply = await http.post(
                f"{daemon.url}/v1/completions",
                json={"model": name, "prompt": "Hi", "max_tokens": 2},
            )
            assert reply.status_code == 200
        busy = {"model": "b", "prompt": "Go", "max_tokens": 20_000, "ignore_eos": True}
        # A request whose KV fits beside "a" alone, not beside "b" too.
        size = memory.estimate(long_context, models[0])
        tokens = (BUDGET - 2 * size.bytes) // size.kv_per_token + 4096
        assert size.bytes + tokens * size.kv_per_token < BUDGET - 4096 * size.kv_per_token
        long = {"model": "a", "prompt": "Go", "max_tokens": tokens}
        b_started, a_started = trio.Event(), trio.Event()

        async def stream(body: dict[str, Any], started: trio.Event) -> None:
            url = f"{daemon.url}/v1/completions"
            async with http.stream("POST", url, json=body | {"stream": True}) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                        started.set()

        async with trio.open_nursery() as outer:
            async with trio.open_nursery() as inner:
                inner.start_soon(stream, busy, b_started)
                await b_started.wait()
                outer.start_soon(stream, long, a_started)
                pool = await pool_where(
                    daemon,
                    lambda pool: model_in(pool, "a")["waiting_for_memory"] == 1,
                    "a's request to wait for memory",
                )
                assert model_in(pool, "b")["state"] == "ready" and not a_started.is_set()
                inner.cancel_scope.cancel()  # b's client leaves: b is idle
            with trio.fail_after(60):
                await a_started.wait()
            pool = await pool_where(
                daemon, lambda pool: model_in(pool, "b")["state"] == "absent", "b evicted"
            )
            assert model_in(pool, "a")["kv_reserved"] >= tokens * size.kv_per_token
            assert pool["used"] <= pool["budget"]
            outer.cancel_scope.cancel()


def test_an_embedding_model_is_charged_weights_and_one_batch_no_kv(
    minilm_dir: Path, tiny_dir: Path
) -> None:
    from scheduler.kinds import kind_of_directory

    assert kind_of_directory(minilm_dir) == "embed"  # modules.json, and BertModel
    assert kind_of_directory(tiny_dir) == "chat"
    size = memory.estimate(minilm_dir, ModelConfig("m", str(minilm_dir)))
    weights = (minilm_dir / "model.safetensors").stat().st_size
    assert size.kv_per_token == 0 and size.weights == weights
    # float32 activations (its LayerNorm weights say so) for one batch of 4096 tokens
    assert weights + 200 * 2**20 < size.bytes < weights + 600 * 2**20


def test_a_vision_model_is_charged_its_image_work_and_its_feature_cache(
    tiny_vl_dir: Path, tmp_path: Path
) -> None:
    """Its tower's working memory for the largest image its processor makes
    (more, the larger that is) and the features it keeps; a text model has
    neither."""
    model = ModelConfig("vl", str(tiny_vl_dir))
    size = memory.estimate(tiny_vl_dir, model)
    assert size.images == memory.IMAGE_FEATURES and size.working > 0
    assert size.bytes == size.weights + size.working + size.images

    larger = tmp_path / "larger"
    larger.mkdir()
    for f in tiny_vl_dir.iterdir():
        (larger / f.name).symlink_to(f)
    processor = json.loads((tiny_vl_dir / "preprocessor_config.json").read_text())
    (larger / "preprocessor_config.json").unlink()
    (larger / "preprocessor_config.json").write_text(
        json.dumps(processor | {"max_pixels": processor["max_pixels"] * 4})
    )
    bigger = memory.estimate(larger, model)
    assert bigger.working > size.working and bigger.images == size.images

    text = tmp_path / "text"
    text.mkdir()
    for f in tiny_vl_dir.iterdir():
        if f.name != "config.json":
            (text / f.name).symlink_to(f)
    config = json.loads((tiny_vl_dir / "config.json").read_text())
    del config["vision_config"]
    (text / "config.json").write_text(json.dumps(config))
    plain = memory.estimate(text, model)
    assert plain.images == 0 and plain.working < size.working


async def test_sequences_grow_their_kv_and_one_that_cannot_pauses_and_says_the_same(
    long_context: Path, tmp_path: Path
) -> None:
    """Each request reserves its prompt and a first step of output (256
    tokens here) and grows a step at a time. Under a budget that holds four
    steps, two sequences of 600 tokens cannot both grow: one pauses (its KV
    kept in the prefix cache), the other goes on, and the paused one resumes
    when room comes back. Greedy, each says what it says alone."""
    model = ModelConfig("long", str(long_context), max_concurrency=2)
    size = memory.estimate(long_context, model)
    step = 256 * size.kv_per_token
    budget = size.bytes + 4 * step + step // 2
    settings = settings_for(tmp_path, model, memory_budget=budget, kv_step_tokens=256)
    prompts = ["Count to ten:", "Name the planets:"]
    body = {"model": "long", "max_tokens": 600, "temperature": 0, "ignore_eos": True}
    async with running(settings) as daemon:
        async with httpx.AsyncClient(base_url=daemon.url, timeout=300, verify=TLS) as http:

            async def ask(prompt: str) -> list[int]:
                reply = await http.post(
                    "/v1/completions", json=body | {"prompt": prompt, "logprobs": 0}
                )
                assert reply.status_code == 200, reply.text
                choice = reply.json()["choices"][0]
                assert choice["finish_reason"] == "length"
                return list(choice["logprobs"]["tokens"])

            alone = [await ask(p) for p in prompts]  # one at a time: each grows freely
            together: dict[str, list[int]] = {}

            async def keep(prompt: str) -> None:
                together[prompt] = await ask(prompt)

            async with trio.open_nursery() as nursery:
                for p in prompts:
                    nursery.start_soon(keep, p)
            activity = (await http.get("/api/activity")).json()["latest"]
            pool = (await http.get("/api/ps")).json()
    assert [together[p] for p in prompts] == alone
    paused = [r for r in activity[:2] if r["pauses"]]
    assert paused, activity[:2]  # one of the two had to wait for memory
    assert all(r["paused_s"] > 0 for r in paused)
    assert pool["used"] <= pool["budget"]
