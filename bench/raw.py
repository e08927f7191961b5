"""Raw mlx-lm baselines, run in their own process: ``python -m bench.raw MODEL_DIR ...``.

Prints one JSON object: single-stream decode speed with ``stream_generate`` and
throughput / time to first token for a batch with ``BatchGenerator``. End of
text is ignored on both paths so every stream makes exactly ``--tokens`` tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from runner.__main__ import preload_blas


def median(runs: list[dict[str, float]]) -> dict[str, float]:
    """Each metric's median over repeated runs (one stall does not decide)."""
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--prompt", required=True, help="JSON list of prompts (token id lists)")
    args = parser.parse_args()
    preload_blas()

    import mlx.core as mx
    from mlx_lm import load, stream_generate
    from mlx_lm.generate import BatchGenerator

    prompts: list[list[int]] = json.loads(args.prompt)
    model, tokenizer = load(args.model_dir)
    tokenizer._eos_token_ids = set()  # run to max_tokens, as the server runs are asked to

    def single() -> dict[str, float]:
        stamps = []
        t0 = time.perf_counter()
        for _ in stream_generate(model, tokenizer, prompts[0], max_tokens=args.tokens):
            stamps.append(time.perf_counter())
        return {
            "ttft_s": stamps[0] - t0,
            "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
            "tokens": len(stamps),
        }

    def batch(n: int) -> dict[str, float]:
        gen = BatchGenerator(model, completion_batch_size=max(n, 8), prefill_batch_size=max(n, 8))
        t0 = time.perf_counter()
        uids = gen.insert(
            [prompts[i % len(prompts)] for i in range(n)], max_tokens=[args.tokens] * n
        )
        first: dict[int, float] = {}
        total = 0
        live = set(uids)
        while live:
            for r in gen.next_generated():
                total += 1
                first.setdefault(r.uid, time.perf_counter())
                if r.finish_reason is not None:
                    live.discard(r.uid)
        wall = time.perf_counter() - t0
        gen.close()
        ttfts = [first[u] - t0 for u in uids]
        return {
            "throughput_tok_s": total / wall,
            "ttft_mean_s": sum(ttfts) / n,
            "ttft_max_s": max(ttfts),
            "tokens": total,
        }

    single()  # warm-up: kernels compile on first use
    batch(args.streams)
    result = {
        "single": median([single() for _ in range(args.repeat)]),
        "batch": median([batch(args.streams) for _ in range(args.repeat)]),
        "device": str(mx.default_device()),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
