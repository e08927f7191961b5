"""How the runner's engine spends its steps when requests arrive while
others decode (real MLX, the tiny model; counted in steps and in tokens
read, never in seconds): newcomers start within a step or two of arriving,
however they arrive, and a long prompt never takes more than about a chunk
from between two tokens of a running stream."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from runner.__main__ import preload_blas

preload_blas()  # before MLX is imported

import mlx.core as mx  # noqa: E402
import pytest  # noqa: E402
from mlx_lm.utils import load_model  # noqa: E402

from runner.batch import Batch, Newcomer  # noqa: E402
from runner.engine import Engine, make_request_sampler  # noqa: E402
from runner.protocol import Generate, Sampling  # noqa: E402

CHUNK = 64
_ids = itertools.count(1)


class Counting:
    """The model, noting the prompt tokens each call reads (a decoding step
    feeds one token per sequence; a prompt pass feeds several)."""

    def __init__(self, model: Any) -> None:
        self._model = model
        self.read = 0
        self.calls = 0

    def __call__(self, tokens: mx.array, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if tokens.shape[1] > 1:
            self.read += tokens.shape[0] * tokens.shape[1]
        return self._model(tokens, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


@pytest.fixture(scope="module")
def model(tiny_dir: Path) -> Any:
    return load_model(tiny_dir)[0]


def request(prompt_tokens: int, max_tokens: int = 400) -> Generate:
    prompt = [(7 * i + next(_ids)) % 40000 + 100 for i in range(prompt_tokens)]
    return Generate(prompt, max_tokens, Sampling(temperature=0.0), (), id=next(_ids))


def first_tokens(engine: Engine, arrivals: dict[int, list[Generate]]) -> dict[int, int]:
    """Step the engine, adding each list of requests before the step its key
    names; the step at which each request made its first token."""
    firsts: dict[int, int] = {}
    wanted = {r.id for rs in arrivals.values() for r in rs}
    for step in itertools.count():
        for r in arrivals.get(step, []):
            engine.add(r)
        for req_id, _, _, _ in engine.step():
            firsts.setdefault(req_id, step)
        if wanted <= firsts.keys() or step > 200:
            return firsts
    raise AssertionError("unreachable")


@pytest.mark.parametrize("together", [False, True], ids=["staggered", "burst"])
def test_newcomers_start_within_two_steps_however_they_arrive(model: Any, together: bool) -> None:
    engine = Engine(model, 8, chunk=4 * CHUNK)  # the six prompts fit one step's budget
    running = request(30)
    newcomers = [request(40) for _ in range(6)]
    # Beside a running stream: all six between two steps, or one a step.
    arrivals = {0: [running]}
    for i, r in enumerate(newcomers):
        arrivals.setdefault(5 if together else 5 + i, []).append(r)
    firsts = first_tokens(engine, arrivals)
    waits = [firsts[r.id] - step for step, rs in arrivals.items() for r in rs if r is not running]
    # Read in the step they arrive, which samples their first token; the
    # next step hands it out: never a step more for others arriving.
    assert waits == [1] * len(newcomers)
    if together:
        assert len({firsts[r.id] for r in newcomers}) == 1  # one step for all of them


def test_newcomers_cost_one_prompt_pass_and_decode_in_the_batchs_own_step(model: Any) -> None:
    counting = Counting(model)
    engine = Engine(counting, 8, chunk=4 * CHUNK)
    running = [request(30) for _ in range(2)]
    for r in running:
        engine.add(r)
    for _ in range(3):
        engine.step()  # the two decode in a batch now
    calls = []
    for step in range(4):
        if step == 1:
            for _ in range(6):
                engine.add(request(40))
        before = counting.calls
        engine.step()
        calls.append(counting.calls - before)
    # The step they arrive in reads all six prompts in one pass and feeds
    # their last tokens in the batch's one decoding pass: no pass of their
    # own for a first token, and none later.
    assert calls == [1, 2, 1, 1]


def test_a_long_prompt_takes_at_most_two_chunks_from_between_two_tokens(model: Any) -> None:
    counting = Counting(model)
    engine = Engine(counting, 8, chunk=CHUNK)
    running, long = request(30, max_tokens=2000), request(25 * CHUNK, max_tokens=4)
    engine.add(running)
    engine.step()
    engine.step()  # decoding alone now
    engine.add(long)
    gaps, read_since = [], 0
    for _ in range(200):
        before = counting.read
        made = {req_id for req_id, _, _, _ in engine.step()}
        read_since += counting.read - before
        if running.id in made:
            gaps.append(read_since)
            read_since = 0
        if long.id in made:
            break
    assert long.id in made
    assert sum(gaps) >= len(long.prompt) - 1  # the whole prompt was read meanwhile
    assert max(gaps) <= 2 * CHUNK, gaps


def test_a_prompt_alone_is_read_in_full_steps(model: Any) -> None:
    counting = Counting(model)
    engine = Engine(counting, 8, chunk=CHUNK, full_step=8 * CHUNK)
    alone = request(20 * CHUNK, max_tokens=2)
    firsts = first_tokens(engine, {0: [alone]})
    # 20 chunks' worth in steps of 8 chunks: two steps read, the third reads
    # the rest and makes the first token.
    assert firsts[alone.id] == 2
    assert counting.read >= len(alone.prompt) - 1


def test_rows_with_caches_of_other_lengths_are_padded_only_to_the_longest(model: Any) -> None:
    # A batched cache pads each row on the left up to its longest row: that
    # padding is attended to at every step, and memory no ledger charges.
    greedy = make_request_sampler(Sampling(temperature=0.0))
    batch = Batch(model)
    first = request(30)
    batch.join([Newcomer(first.id, list(first.prompt), 0, None, greedy, [])])
    tokens = list(first.prompt)
    for _ in range(6):
        tokens += [token for _, token, _ in batch.step()]
    ((cache, held),) = batch.leave([first.id]).values()
    assert held == len(tokens)  # the prompt and the five tokens reported
    cold = [request(40), request(12)]
    batch.join(
        [
            Newcomer(first.id, [*tokens, 7], held, cache, greedy, []),
            *(Newcomer(r.id, list(r.prompt), 0, None, greedy, []) for r in cold),
        ]
    )
    batch.step()  # each row has fed its last token: its cache holds all of its tokens
    assert batch.positions == max(len(tokens) + 1, 40)
