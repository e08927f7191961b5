"""A real embedding runner (all-MiniLM-L6-v2 through mlx-embeddings), driven
through the daemon's client."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
from tokenizers import Tokenizer

from runner.client import RunnerProcess, RunnerSpec
from runner.errors import RunnerGone
from runner.protocol import Generate, Sampling
from tests.waiting import eventually

SENTENCES = [
    "A cat sits on the mat.",
    "Stock prices fell sharply today after the central bank raised rates again.",
    "Hi",
]


def token_ids(model_dir: Path, texts: list[str]) -> list[list[int]]:
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.no_padding()
    return [tokenizer.encode(t).ids for t in texts]


async def test_a_padded_batch_embeds_each_input_as_alone(
    nursery: trio.Nursery, minilm_dir: Path
) -> None:
    spec = RunnerSpec("minilm", minilm_dir, 4, kind="embed")
    runner = await nursery.start(RunnerProcess(spec).run)
    inputs = token_ids(minilm_dir, SENTENCES)
    assert len({len(ids) for ids in inputs}) == 3  # the batch needs padding
    with trio.fail_after(60):
        batch = await runner.embed(inputs)
        alone = np.stack([(await runner.embed([ids]))[0] for ids in inputs])
    assert batch.shape == (3, 384) and batch.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(batch, alone, atol=1e-5)

    # A bad request fails alone; a generate request is refused; the runner serves on.
    with pytest.raises(RunnerGone, match="at least one token"):
        await runner.embed([[101, 102], []])
    async with runner.generate(Generate([101, 102], 4, Sampling())) as chunks:
        chunk = await chunks.receive()
    assert chunk.error is not None and "does not generate" in str(chunk.error)
    again = await runner.embed(inputs[:1])
    np.testing.assert_allclose(again[0], batch[0], atol=1e-5)

    # A runner that dies fails the requests waiting on it, like any request.
    assert runner.pid is not None
    os.kill(runner.pid, signal.SIGKILL)
    with trio.fail_after(30), pytest.raises(RunnerGone, match="exit"):
        await runner.embed(inputs)


@pytest.fixture(scope="module")
def embedder(minilm_dir: Path) -> Any:
    from runner.__main__ import preload_blas

    preload_blas()
    from runner.embedder import Embedder

    return Embedder.load(minilm_dir)


def big_request(model_dir: Path) -> list[list[int]]:
    """17 inputs of 250 tokens: two pieces (at most 4,096 padded tokens each: 16, then 1)."""
    word = token_ids(model_dir, ["word"])[0][1]  # between [CLS] and [SEP]
    return [[101, 1000 + i, *[word] * 247, 102] for i in range(17)]


def test_a_big_request_is_read_in_pieces_others_take_turns_and_a_cancel_stops_it(
    embedder: Any, minilm_dir: Path
) -> None:
    big, small = big_request(minilm_dir), token_ids(minilm_dir, SENTENCES[:1])
    embedder.submit(1, big)
    embedder.submit(2, small)
    answered: dict[int, int] = {}
    for step in range(100):
        embedder.step()
        for req_id, vectors in embedder.answers():
            answered[req_id] = step
            assert vectors.shape[0] == (len(big) if req_id == 1 else 1)
        if len(answered) == 2:
            break
    assert answered[2] < answered[1]  # the small one did not wait for all of the big one
    assert answered[1] == 2  # the big one took two steps, the small one's between them

    embedder.submit(3, big)
    embedder.step()  # a piece of it read
    embedder.cancel(3)  # its client left
    assert embedder.active == 0
    embedder.step()
    assert embedder.answers() == []


async def test_a_client_that_leaves_has_the_runner_drop_the_rest_of_its_request(
    nursery: trio.Nursery, minilm_dir: Path
) -> None:
    spec = RunnerSpec("minilm", minilm_dir, 4, kind="embed")
    runner = await nursery.start(RunnerProcess(spec).run)
    with trio.move_on_after(0.2):  # the client gives up while it is read
        await runner.embed(big_request(minilm_dir) * 4)

    async def dropped() -> bool:
        stats = await runner.stats()
        return stats.counters["cancelled"] == 1 and stats.active == 0

    await eventually(dropped, what="the rest of the request dropped")
    with trio.fail_after(60):
        small = await runner.embed(token_ids(minilm_dir, SENTENCES[:1]))  # it serves on
    assert small.shape == (1, 384)
