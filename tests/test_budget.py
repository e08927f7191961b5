"""A cap on reasoning (Anthropic's ``thinking.budget_tokens``): the runner
forces the end-of-reasoning marker once the budget is spent, on the tiny
model's real logits, alone and in a batch; the daemon hands it the model's
markers."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from runner.__main__ import preload_blas

preload_blas()  # before MLX is imported

import pytest  # noqa: E402
from mlx_lm.utils import load_model  # noqa: E402

from api.anthropic.messages import chat_request  # noqa: E402
from api.catalog import Catalog  # noqa: E402
from api.generation import prepare  # noqa: E402
from api.record import Record  # noqa: E402
from config.settings import ModelConfig, Settings  # noqa: E402
from runner.engine import Engine  # noqa: E402
from runner.protocol import Generate, Sampling  # noqa: E402
from scheduler.metrics import Metrics  # noqa: E402
from tests.scripted import scripted_model  # noqa: E402

START, END = [100], [200, 201]  # a marker of two tokens, as "</think>" may be
_ids = itertools.count(1)


@pytest.fixture(scope="module")
def model(tiny_dir: Path) -> Any:
    return load_model(tiny_dir)[0]


def request(**kw: Any) -> Generate:
    return Generate([1, 2, 3, 4], 12, Sampling(temperature=0.0), (), id=next(_ids), **kw)


def run(engine: Engine, *reqs: Generate) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {r.id: [] for r in reqs}
    for r in reqs:
        engine.add(r)
    while engine.active:
        for rid, token, _, _ in engine.step():
            out[rid].append(token)
    return out


def budget(tokens: int, opened: bool) -> dict[str, Any]:
    return {"tokens": tokens, "start": START, "end": END, "open": opened}


@pytest.mark.parametrize("together", [1, 3])
def test_reasoning_opened_by_the_prompt_ends_after_its_budget(model: Any, together: int) -> None:
    reqs = [request(reasoning_budget=budget(3, opened=True)) for _ in range(together)]
    for tokens in run(Engine(model, 4), *reqs).values():
        assert tokens[3:5] == END  # three tokens of reasoning, then the marker
        assert len(tokens) == 12


def test_a_block_the_model_opens_is_counted_from_its_start(model: Any) -> None:
    # The bias makes the model open a block on every turn it may.
    opens = request(reasoning_budget=budget(3, opened=False), logit_bias={START[0]: 100.0})
    (tokens,) = run(Engine(model, 4), opens).values()
    assert tokens == [*START, *START * 3, *END, *START, *START * 3, *END]


def test_without_a_budget_nothing_is_forced(model: Any) -> None:
    plain, closed = request(), request(reasoning_budget=budget(3, opened=False))
    out = run(Engine(model, 4), plain)
    assert run(Engine(model, 4), closed)[closed.id] == out[plain.id]  # no block: no change
    assert out[plain.id][3:5] != END  # what the budget forces is not what it says anyway


async def test_a_messages_budget_reaches_the_runner_with_the_models_markers(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """``thinking.budget_tokens`` becomes the runner's option, in the token
    ids of the model's own reasoning markers; a model without them has no
    reasoning to cap."""
    thinker = scripted_model(tiny_dir, tmp_path / "thinker", "Hi.")
    plain = scripted_model(tiny_dir, tmp_path / "plain", "Hi.")
    for name in ("tokenizer.json", "tokenizer_config.json"):  # SmolLM2's: no <think>
        (plain / name).write_text((tiny_dir / name).read_text())
    models = (ModelConfig("thinker", str(thinker)), ModelConfig("plain", str(plain)))
    catalog = Catalog(Settings(models=models, cache_dir=tmp_path), model_dir)
    body = {
        "max_tokens": 100,
        "thinking": {"type": "enabled", "budget_tokens": 50},
        "messages": [{"role": "user", "content": "Think."}],
    }
    job = await prepare(catalog, chat_request(body | {"model": "thinker"}), record())
    texts = await catalog.texts("thinker")
    think, end = (texts.tokenizer.convert_tokens_to_ids(m) for m in ("<think>", "</think>"))
    assert job.request.reasoning_budget == {
        "tokens": 50,
        "start": [think],
        "end": [end],
        "open": False,
    }
    job = await prepare(catalog, chat_request(body | {"model": "plain"}), record())
    assert job.request.reasoning_budget is None


async def model_dir(model: ModelConfig) -> Path:
    return Path(model.source)


def record() -> Record:
    return Record("req_test", "/v1/messages", Metrics())
