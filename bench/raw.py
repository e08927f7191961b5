"""Raw mlx-lm baselines in their own process, driven one run at a time.

    python -m bench.raw MODEL_DIR --prompt JSON [--tokens 256]

Loads the model, prints its device as a JSON line, then answers each line on stdin with one
JSON line: ``single`` times one ``stream_generate`` run on the first prompt,
``batch`` one ``BatchGenerator`` run over all prompts together. End of text is
ignored on both paths so every stream makes exactly ``--tokens`` tokens.
``bench/serving.py`` interleaves these runs with the same runs through mlxd,
so that drift in the machine's speed falls on both sides alike.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from runner.__main__ import preload_blas


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--prompt", required=True, help="JSON list of prompts (token id lists)")
    args = parser.parse_args()
    preload_blas()

    import mlx.core as mx
    from mlx_lm import load, stream_generate
    from mlx_lm.generate import BatchGenerator

    prompts: list[list[int]] = json.loads(args.prompt)
    model, tokenizer = load(args.model_dir)[:2]
    tokenizer._eos_token_ids = set()  # run to max_tokens, as the server runs are asked to

    def single() -> dict[str, float]:
        stamps = []
        t0 = time.perf_counter()
        for _ in stream_generate(model, tokenizer, prompts[0], max_tokens=args.tokens):
            stamps.append(time.perf_counter())
        return {
            "ttft_s": stamps[0] - t0,
            "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
        }

    def batch() -> dict[str, float]:
        n = len(prompts)
        gen = BatchGenerator(model, completion_batch_size=max(n, 8), prefill_batch_size=max(n, 8))
        t0 = time.perf_counter()
        uids = gen.insert(prompts, max_tokens=[args.tokens] * n)
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
        }

    runs = {"single": single, "batch": batch}
    print(json.dumps({"device": str(mx.default_device())}), flush=True)
    for line in sys.stdin:
        print(json.dumps(runs[line.strip()]()), flush=True)


if __name__ == "__main__":
    main()
