"""The runner's engine against raw mlx-lm, step by step, with no HTTP.

    python -m bench.steps MODEL_DIR [--streams 32] [--tokens 128] [--prompt-tokens 100]
        [--join 1] [--repeat 3]

Four runs, interleaved ``--repeat`` times (the device's speed drifts), each
generating ``--tokens`` tokens for ``--streams`` distinct prompts:

- ``raw burst``: one ``BatchGenerator``, every prompt inserted at once;
- ``raw join``: the same, ``--join`` prompts inserted before each step (the
  way requests that arrive a few milliseconds apart reach a server);
- ``engine burst`` and ``engine join``: mlxd's ``runner/engine.py``, fed the
  same way.

For each: tokens per second, mean time to first token, and where the time
went: steps that read prompts (and how long the slowest took) against steps
that only decode. Both raw and engine pay for joining (a prompt pass for the
newcomers, their caches merged into the batch's); what the engine adds on
top is its own cost. Runs on whatever device MLX has (the lent GPU: see
``../shared/device.md``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runner.__main__ import preload_blas


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=100)
    parser.add_argument("--join", type=int, default=1, help="prompts inserted per step")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    preload_blas()

    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.utils import load_model

    from runner.engine import Engine
    from runner.protocol import Generate, Sampling

    model, _ = load_model(args.model_dir)
    vocab = model.args.vocab_size
    prompts = [
        [(7 + 131 * s + 17 * i) % vocab for i in range(args.prompt_tokens)]
        for s in range(args.streams)
    ]
    ids = iter(range(1, 1 << 30))

    def timeline(
        feed: Callable[[list[int]], None], step: Callable[[], list[tuple[int, bool]]], join: int
    ) -> dict[str, Any]:
        """Feed ``join`` prompts before each step (all at once if 0) and step
        until every stream is done; the step log says the rest."""
        waiting = list(prompts)
        first: dict[int, float] = {}
        steps: list[tuple[float, int, int]] = []  # seconds, newcomers, tokens
        done = total = 0
        t0 = time.perf_counter()
        while done < len(prompts):
            newcomers = waiting[: join or len(waiting)]
            del waiting[: len(newcomers)]
            for p in newcomers:
                feed(p)
            begun = time.perf_counter()
            out = step()
            now = time.perf_counter()
            for uid, finished in out:
                first.setdefault(uid, now)
                total += 1
                done += finished
            steps.append((now - begun, len(newcomers), len(out)))
        wall = time.perf_counter() - t0
        reading = [s for s, n, _ in steps if n]
        decoding = [s for s, n, _ in steps if not n]
        return {
            "tok_s": round(total / wall, 1),
            "ttft_mean_s": round(statistics.mean(t - t0 for t in first.values()), 4),
            "steps": len(steps),
            "reading_steps": len(reading),
            "reading_s": round(sum(reading), 3),
            "slowest_reading_s": round(max(reading, default=0), 4),
            "decoding_step_ms": round(1000 * statistics.median(decoding), 2) if decoding else None,
        }

    def raw(join: int) -> dict[str, Any]:
        gen = BatchGenerator(
            model, completion_batch_size=args.streams, prefill_batch_size=args.streams
        )

        def feed(p: list[int]) -> None:
            gen.insert([p], max_tokens=[args.tokens])

        def step() -> list[tuple[int, bool]]:
            _, responses = gen.next()
            return [(r.uid, r.finish_reason is not None) for r in responses]

        try:
            return timeline(feed, step, join)
        finally:
            gen.close()

    def engine(join: int) -> dict[str, Any]:
        eng = Engine(model, args.streams)

        def feed(p: list[int]) -> None:
            eng.add(Generate(p, args.tokens, Sampling(temperature=0.0), id=next(ids)))

        def step() -> list[tuple[int, bool]]:
            return [(rid, finish is not None) for rid, _, finish, _ in eng.step()]

        return timeline(feed, step, join)

    runs = {
        "raw burst": lambda: raw(0),
        "raw join": lambda: raw(args.join),
        "engine burst": lambda: engine(0),
        "engine join": lambda: engine(args.join),
    }
    first = {}
    for name, run in runs.items():  # warm-up: shapes compile once
        first[name] = run()
        print(f"{name:>13} (first run): {json.dumps(first[name])}", flush=True)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in runs}
    for i in range(args.repeat):
        for name, run in runs.items():
            results[name].append(run())
            print(f"{name:>13} (run {i + 1}): {json.dumps(results[name][-1])}", flush=True)
            mx.clear_cache()
    summary = {
        name: {
            k: statistics.median(r[k] for r in rs) if rs[0][k] is not None else None for k in rs[0]
        }
        for name, rs in results.items()
    }
    print(
        json.dumps(
            {"device": str(mx.default_device()), **vars(args), "model_dir": str(args.model_dir)}
        )
    )
    for name, row in summary.items():
        print(f"{name:>13}: {json.dumps(row)}")


if __name__ == "__main__":
    main()
