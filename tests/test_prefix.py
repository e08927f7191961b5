"""The prefix cache and chunked prefill, in the engine itself (real MLX):
steps are taken by hand, so what happens in each is exact. Greedy text is
compared on the bundled SmolLM2, whose answers do not hang on rounding; the
mechanics run on the tiny random model, which is fast."""

from __future__ import annotations

import itertools
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import attrs

from runner.__main__ import preload_blas

preload_blas()  # before MLX loads, as a runner does: float32 models run far faster

import mlx.core as mx  # noqa: E402
import pytest  # noqa: E402
from mlx_lm.utils import load_model  # noqa: E402

from api.texts import Texts  # noqa: E402
from runner import prefix_disk  # noqa: E402
from runner.engine import Engine  # noqa: E402
from runner.prefix import Disk, PrefixCache  # noqa: E402
from runner.protocol import Generate, Sampling  # noqa: E402

GREEDY = Sampling(temperature=0.0)
SYSTEM = {"role": "system", "content": "You are a careful assistant for a team of engineers. " * 4}
_ids = itertools.count(1)


class Counting:
    """The model, counting the tokens each call feeds it (decode steps feed
    one token per sequence; prefill feeds many)."""

    def __init__(self, model: Any) -> None:
        self._model = model
        self.fed: list[int] = []

    def __call__(self, tokens: mx.array, *args: Any, **kwargs: Any) -> Any:
        self.fed.append(tokens.shape[0] * tokens.shape[1])
        return self._model(tokens, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


@pytest.fixture(scope="module")
def smol(smollm2_dir: Path) -> tuple[Any, Texts]:
    model, _ = load_model(smollm2_dir)
    return model, Texts(smollm2_dir, None)


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> tuple[Any, Texts]:
    model, _ = load_model(tiny_dir)
    return model, Texts(tiny_dir, None)


def request(texts: Texts, prompt: list[int], max_tokens: int = 8) -> Generate:
    return Generate(prompt, max_tokens, GREEDY, tuple(texts.stop_ids), id=next(_ids))


def finish(engine: Engine, rid: int) -> list[int]:
    """Step until request ``rid`` finishes; its tokens."""
    out: list[int] = []
    for _ in range(10_000):
        for req_id, token, done, _ in engine.step():
            if req_id == rid:
                out.append(token)
                if done:
                    return out
    raise AssertionError("the request never finished")


def answer(engine: Engine, texts: Texts, prompt: list[int], beside: bool) -> tuple[list[int], int]:
    """Greedy tokens for ``prompt`` and the prompt tokens it reused. With
    ``beside``, another request is decoding, so both go through the batch."""
    other = None
    if beside:
        other = request(texts, texts.encode("Count slowly to one hundred:"), max_tokens=500)
        engine.add(other)
        engine.step()
        engine.step()  # it decodes alone on the single path now
    req = request(texts, prompt)
    hit = engine.add(req)
    out = finish(engine, req.id)
    if other is not None:
        engine.cancel(other.id)
        assert engine.active == 0
    return out, hit.tokens


@attrs.frozen
class Turn:
    prompt: list[int]
    answer: list[int]  # greedy, with no cache and no other request


@pytest.fixture(scope="module")
def conversation(smol: tuple[Any, Texts]) -> list[Turn]:
    """Three turns of a conversation, each answered with no cache."""
    model, texts = smol
    plain = Engine(model, 4, chunk=64)
    messages: list[dict[str, Any]] = [SYSTEM]
    turns = []
    for question in ("List three colours.", "And three fruits?", "Which is the sweetest?"):
        messages.append({"role": "user", "content": question})
        prompt = texts.chat_prompt(messages)
        out, _ = answer(plain, texts, prompt, beside=False)
        turns.append(Turn(prompt, out))
        reply = texts.tokenizer.decode([t for t in out if t not in texts.stop_ids])
        messages.append({"role": "assistant", "content": reply})
    return turns


@pytest.mark.parametrize("beside", [False, True], ids=["alone", "batched"])
def test_a_conversation_reuses_its_prefix_and_says_the_same(
    smol: tuple[Any, Texts], conversation: list[Turn], beside: bool
) -> None:
    model, texts = smol
    cached = Engine(model, 4, prefixes=PrefixCache(model, 1 << 30), chunk=64)
    reused = []
    for turn in conversation:
        with_cache, hit = answer(cached, texts, turn.prompt, beside)
        assert with_cache == turn.answer  # batched or not, what it says without a cache
        reused.append((hit, len(turn.prompt)))
    assert reused[0][0] == 0
    # Each follow-up reuses the whole earlier conversation, up to the new turn.
    assert reused[0][1] < reused[1][0] < reused[1][1] < reused[2][0] < reused[2][1]


def test_requests_sharing_only_a_system_prompt_share_its_prefix(smol: tuple[Any, Texts]) -> None:
    model, texts = smol
    engine = Engine(model, 4, prefixes=PrefixCache(model, 1 << 30), chunk=64)
    first = texts.chat_prompt([SYSTEM, {"role": "user", "content": "Name a river."}])
    second = texts.chat_prompt([SYSTEM, {"role": "user", "content": "Name a mountain."}])
    system = texts.chat_prompt([SYSTEM])
    answer(engine, texts, first, beside=False)
    out, hit = answer(engine, texts, second, beside=False)
    assert len(system) - 5 <= hit < len(second)  # the template's turn markers may differ
    assert out == answer(Engine(model, 4, chunk=64), texts, second, beside=False)[0]


def test_the_cache_limit_evicts_the_least_recently_used_prefix(tiny: tuple[Any, Texts]) -> None:
    model, texts = tiny
    starts = ("Apples", "Bridges", "Candles")  # nothing shared, not even a first token
    prompts = [texts.encode(f"{word} and more {word.lower()}, " * 8) for word in starts]
    probe = PrefixCache(model, 1 << 30)
    engine = Engine(model, 4, prefixes=probe, chunk=64)
    answer(engine, texts, prompts[0], beside=False)
    one = probe.nbytes
    limited = PrefixCache(model, int(one * 2.5))  # room for two conversations
    engine = Engine(model, 4, prefixes=limited, chunk=64)
    answer(engine, texts, prompts[0], beside=False)
    answer(engine, texts, prompts[1], beside=False)
    assert limited.lookup(prompts[0] + [13]).tokens == len(prompts[0])  # now the most recent
    answer(engine, texts, prompts[2], beside=False)  # evicts 1, the least recently used
    assert limited.nbytes <= limited.limit
    assert limited.lookup(prompts[1] + [13]).tokens == 0
    assert limited.lookup(prompts[0] + [13]).tokens == len(prompts[0])
    assert limited.lookup(prompts[2] + [13]).tokens == len(prompts[2])


def test_a_running_stream_makes_a_token_between_every_chunk_of_a_long_prompt(
    tiny: tuple[Any, Texts],
) -> None:
    model, texts = tiny
    counting = Counting(model)
    chunk = 24
    engine = Engine(counting, 4, chunk=chunk)
    running = request(texts, texts.encode("Count slowly to one hundred:"), max_tokens=500)
    engine.add(running)
    engine.step()
    long = request(texts, texts.encode("A long document to read. " * 50))
    assert len(long.prompt) > 10 * chunk
    engine.add(long)
    steps, missed = 0, 0
    while True:
        counting.fed.clear()
        outputs = {req_id: token for req_id, token, _, _ in engine.step()}
        steps += 1
        # Each step reads at most one chunk of the prompt, and the running
        # stream makes a token in every one of them but the step that moves
        # it from the single path into the batch.
        assert sum(n for n in counting.fed if n > 2) <= chunk
        missed = 0 if running.id in outputs else missed + 1
        assert missed <= 1
        if long.id in outputs:
            break
    assert steps >= len(long.prompt) // chunk
    engine.cancel(running.id)
    engine.cancel(long.id)


def test_a_short_request_is_not_stuck_behind_a_long_prompt_read_alone(
    tiny: tuple[Any, Texts],
) -> None:
    model, texts = tiny
    chunk = 24
    engine = Engine(model, 4, chunk=chunk, full_step=2 * chunk)  # alone: two chunks a step
    long = request(texts, texts.encode("A long document to read. " * 50))
    engine.add(long)
    engine.step()
    engine.step()  # reading it alone, two steps in
    short = request(texts, texts.encode("Hi"), max_tokens=3)
    engine.add(short)
    firsts: dict[int, int] = {}
    for step in itertools.count():
        for req_id, _, _, _ in engine.step():
            firsts.setdefault(req_id, step)
        if short.id in firsts:
            break
    assert long.id not in firsts  # the short one answered while the long one still reads
    assert finish(engine, long.id)


@attrs.frozen
class Saved:
    """A conversation's prefix on disk, as an unload writes it."""

    where: Path  # the prefix directory
    first: list[int]  # the first turn's prompt
    follow: list[int]  # the follow-up's
    expected: list[int]  # the follow-up's greedy answer, with no cache


@pytest.fixture(scope="module")
def written(
    smol: tuple[Any, Texts], conversation: list[Turn], tmp_path_factory: pytest.TempPathFactory
) -> Saved:
    """The conversation's first turn answered with a cache, which an unload
    writes to disk; its second turn is the follow-up."""
    model, texts = smol
    where = tmp_path_factory.mktemp("prefixes") / "model"
    cache = PrefixCache(model, 1 << 30, Disk(where, 1 << 30))
    first, follow = conversation[0], conversation[1]
    out, _ = answer(Engine(model, 4, prefixes=cache, chunk=64), texts, first.prompt, beside=False)
    assert out == first.answer
    assert cache.persist() == 1
    assert cache.nbytes == 0  # written and dropped from memory
    return Saved(where, first.prompt, follow.prompt, follow.answer)


@pytest.fixture
def saved(written: Saved, tmp_path: Path) -> Saved:
    """``written``, with a prefix directory of this test's own to read or damage."""
    shutil.copytree(written.where, tmp_path / "model")
    return attrs.evolve(written, where=tmp_path / "model")


def test_a_prefix_written_at_unload_is_read_back_after_a_reload(
    smol: tuple[Any, Texts], saved: Saved
) -> None:
    model, texts = smol
    disk = Disk(saved.where, 1 << 30)  # a new runner reads the index
    cache = PrefixCache(model, 1 << 30, disk)
    out, hit = answer(Engine(model, 4, prefixes=cache, chunk=64), texts, saved.follow, False)
    assert hit > len(saved.first) - 2 and cache.stats.disk_hits == 1
    assert out == saved.expected


def test_the_first_requests_prefix_is_read_while_the_weights_load(
    smol: tuple[Any, Texts], saved: Saved
) -> None:
    model, texts = smol
    cache = PrefixCache(model, 1 << 30, Disk(saved.where, 1 << 30))
    cache.read_ahead(saved.follow)  # in a thread of its own, as a runner's load does
    mx.eval(model.parameters())
    cache.settle()
    assert cache.nbytes > 0 and cache.stats.disk_hits == 0
    out, hit = answer(Engine(model, 4, prefixes=cache, chunk=64), texts, saved.follow, False)
    assert hit > len(saved.first) - 2 and cache.stats.disk_hits == 1  # reported as a disk hit
    assert out == saved.expected
    # Memory the budget does not give the cache is never read into.
    small = PrefixCache(model, 1 << 10, Disk(saved.where, 1 << 30))
    small.read_ahead(saved.follow)
    small.settle()
    assert small.nbytes == 0


def test_a_prefix_file_is_not_read_for_a_few_shared_tokens(
    smol: tuple[Any, Texts], saved: Saved
) -> None:
    """A file is read whole: reading a long one to reuse its first tokens
    would stall the running streams for nothing."""
    model, texts = smol
    cache = PrefixCache(model, 1 << 30, Disk(saved.where, 1 << 30))
    other = saved.first[:8] + texts.encode(" Something else entirely, please.")
    assert cache.lookup(other).tokens == 0 and cache.stats.disk_hits == 0
    assert cache.lookup([*saved.first, 13]).tokens == len(saved.first)
    assert cache.stats.disk_hits == 1


def test_an_automatic_chunk_follows_the_measured_speed(tiny: tuple[Any, Texts]) -> None:
    model, texts = tiny
    engine = Engine(model, 4)  # no chunk configured
    long = request(texts, texts.encode("A long document to read. " * 100))
    assert len(long.prompt) > 512  # longer than the first chunk, taken before any speed is known
    engine.add(long)
    finish(engine, long.id)
    assert engine.prefill_rate is not None and engine.prefill_rate > 0
    chunk = engine.chunk
    assert 32 <= chunk <= 2048 and chunk & (chunk - 1) == 0  # a power of two
    assert chunk <= max(engine.prefill_rate * 0.2, 32)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_prefix_file_is_skipped_with_a_warning(
    smol: tuple[Any, Texts], saved: Saved, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    model, texts = smol
    (path,) = prefix_disk.files(saved.where)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])  # as if the disk filled up mid-write
    else:  # the header intact, the end of the KV arrays overwritten
        path.write_bytes(data[:-4096] + b"\xff" * 4096)
    with caplog.at_level(logging.WARNING, logger="mlxd.prefix"):
        cache = PrefixCache(model, 1 << 30, Disk(saved.where, 1 << 30))
        out, hit = answer(Engine(model, 4, prefixes=cache, chunk=64), texts, saved.follow, False)
    assert out == saved.expected
    assert hit == 0 and not path.exists()
    why = "partial write" if damage == "truncated" else "do not match its digest"
    assert why in caplog.text


def test_an_unload_writes_the_most_reused_prefix_first_within_the_hourly_bound(
    smol: tuple[Any, Texts], conversation: list[Turn], tmp_path: Path
) -> None:
    """The disk tier's writes are budgeted (an SSD wears with every byte):
    what an unload may write is what the last hour left, and it goes to the
    prefix reused most (a conversation, turn after turn) before a newer one
    seen once."""
    model, texts = smol
    where = tmp_path / "prefixes" / "model"
    unrelated = texts.chat_prompt([{"role": "user", "content": "Spell 'banana'. " * 8}])

    def run(prompts: list[list[int]], per_hour: int) -> PrefixCache:
        cache = PrefixCache(model, 1 << 30, Disk(where, 1 << 30, per_hour))
        engine = Engine(model, 4, prefixes=cache, chunk=64)
        for prompt in prompts:
            answer(engine, texts, prompt, beside=False)
        return cache

    # The conversation's second turn reuses its first; the unrelated prompt comes last.
    cache = run([conversation[0].prompt, conversation[1].prompt, unrelated], 1 << 40)
    assert cache.summary()["entries"] == 2
    per_hour = cache.nbytes - 1  # room for one of the two
    cache.disk = Disk(where, 1 << 30, per_hour)
    assert cache.persist() == 1
    (path,) = prefix_disk.files(where)
    kept = prefix_disk.read_tokens(path)
    assert list(kept[: len(conversation[1].prompt)]) == conversation[1].prompt
    assert cache.stats.disk_skipped_bytes > 0

    # Within the hour, another unload may write only what is left: not enough.
    again = run([unrelated], per_hour)
    assert again.persist() == 0 and again.stats.disk_skipped_bytes > 0
    assert prefix_disk.files(where) == [path]

    # An hour later, the bound is whole again.
    ledger = where.parent / prefix_disk.LEDGER
    records = json.loads(ledger.read_text())
    ledger.write_text(json.dumps([[t - 3601, n, rid] for t, n, rid in records]))
    assert prefix_disk.Writes(where.parent, per_hour).left() == per_hour
    later = run([unrelated], per_hour)
    assert later.persist() == 1 and len(prefix_disk.files(where)) == 2


@pytest.mark.parametrize("text", ["{not json", '{"a": 1}', "[[1, 2]]", "[" * 10_000])
def test_a_damaged_write_ledger_starts_afresh_with_a_warning(
    tmp_path: Path, text: str, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / prefix_disk.LEDGER).write_text(text)
    writes = prefix_disk.Writes(tmp_path, 1000)
    with caplog.at_level(logging.WARNING, logger="mlxd.prefix"):
        assert writes.left() == 1000
    assert "afresh" in caplog.text
    rid, granted = writes.reserve(600)
    assert granted == 600 and writes.reserve(600)[1] == 400
    writes.settle(rid, 100)  # it wrote less than it reserved
    assert writes.left() == 500
