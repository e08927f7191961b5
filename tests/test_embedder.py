"""A real embedding runner (all-MiniLM-L6-v2 through mlx-embeddings), driven
through the daemon's client."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import trio
from tokenizers import Tokenizer

from runner.client import RunnerProcess, RunnerSpec
from runner.errors import RunnerGone
from runner.protocol import Generate, Sampling

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
