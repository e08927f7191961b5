"""Swap benchmark: loading a model on demand, and what a load costs the others.

    python -m bench.swap [--model DIR] [--other DIR] [--repeat 5]

1. Time to first token for a request to a model that is not resident, through
   mlxd over HTTP (the model is configured with ``keep_alive = 0``, so every
   request loads it), against raw ``mlx_lm.load`` plus the prefill of the same
   prompt in a fresh process (imports done before the clock starts).
   Target: <= 1.2x.
2. A resident model's streaming speed while another model loads, against its
   speed alone. Target: >= 0.9x.

``--other`` (default: ``--model``) is the model loaded during (2).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import trio

from api.texts import Texts
from bench.client import sse_events
from bench.serving import ROOT, completion_body, prompts, wait_ready

RAW = """
import json, sys, time
from runner.__main__ import preload_blas
preload_blas()
from mlx_lm import load, stream_generate
model_dir, prompt = sys.argv[1], json.loads(sys.argv[2])
t0 = time.perf_counter()
model, tokenizer = load(model_dir)[:2]
for _ in stream_generate(model, tokenizer, prompt, max_tokens=1):
    break
print(json.dumps({"ttft_s": time.perf_counter() - t0}))
"""


def raw_cold(model_dir: Path, prompt: list[int]) -> float:
    out = subprocess.run(
        [sys.executable, "-c", RAW, str(model_dir), json.dumps(prompt)],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout
    return float(json.loads(out.strip().splitlines()[-1])["ttft_s"])


def start_mlxd(model: Path, other: Path, port: int, workdir: Path) -> subprocess.Popen[bytes]:
    config = workdir / "swap.toml"
    config.write_text(
        f'port = {port}\ncache_dir = "{workdir}"\n'
        f'[[models]]\nname = "resident"\npath = "{model}"\nkeep_alive = "forever"\n'
        f'[[models]]\nname = "cold"\npath = "{model}"\nkeep_alive = 0\n'
        f'[[models]]\nname = "other"\npath = "{other}"\nkeep_alive = 0\n'
    )
    log = (workdir / "mlxd.log").open("wb")
    cmd = [sys.executable, "-m", "daemon.cli", "serve", "--config", str(config)]
    return subprocess.Popen([*cmd, "--log-level", "warning"], cwd=ROOT, stderr=log)


async def stream(port: int, model: str, prompt: list[int], tokens: int) -> list[float]:
    """Start a stream; the time it was sent, then each token's arrival."""
    stamps = [time.perf_counter()]
    body = completion_body(prompt, tokens) | {"model": model}
    async for event in sse_events("127.0.0.1", port, "/v1/completions", body):
        if event["choices"] and event["choices"][0]["text"]:
            stamps.append(time.perf_counter())
    return stamps


async def absent(port: int, model: str, settle_s: float) -> None:
    """Wait until ``model`` has been unloaded, then give the spare runner time
    to finish its imports, as it would have between requests in real use."""
    async with httpx.AsyncClient() as http:
        for _ in range(600):
            pool = (await http.get(f"http://127.0.0.1:{port}/api/ps")).json()
            if all(m["state"] == "absent" for m in pool["models"] if m["model"] == model):
                break
            await trio.sleep(0.1)
    await trio.sleep(settle_s)


def rate(stamps: list[float], start: float, end: float) -> float:
    """Tokens per second among the token ``stamps`` that fall in [start, end]."""
    inside = [t for t in stamps[1:] if start <= t <= end]
    if len(inside) < 3:
        raise RuntimeError("too few tokens in the window: use more --tokens")
    return (len(inside) - 1) / (inside[-1] - inside[0])


async def resident_during_load(port: int, prompt: list[int], tokens: int) -> float:
    """The resident model's rate while the other model loads and answers."""
    resident: list[float] = []
    other: list[float] = []

    async def load_other() -> None:
        await trio.sleep(0.2)  # the resident stream is going by now
        other.extend(await stream(port, "other", prompt, 1))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(load_other)
        resident.extend(await stream(port, "resident", prompt, tokens))
    return rate(resident, other[0], other[1])


async def through_mlxd(port: int, prompt: list[int], args: argparse.Namespace) -> dict[str, Any]:
    cold = []
    await stream(port, "cold", prompt, 1)  # warm-up: kernels compile
    for _ in range(args.repeat):
        await absent(port, "cold", args.settle)
        stamps = await stream(port, "cold", prompt, 1)
        cold.append(stamps[1] - stamps[0])

    await stream(port, "resident", prompt, args.tokens)
    alone, during = [], []
    for _ in range(args.repeat):
        stamps = await stream(port, "resident", prompt, args.tokens)
        alone.append(rate(stamps, stamps[1], stamps[-1]))
        await absent(port, "other", args.settle)
        during.append(await resident_during_load(port, prompt, args.tokens))
    return {
        "cold_ttft_s": statistics.median(cold),
        "resident_alone_tok_s": statistics.median(alone),
        "resident_during_load_tok_s": statistics.median(during),
        "runs": {"cold": cold, "alone": alone, "during": during},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="MLX model directory")
    parser.add_argument("--other", help="the model loaded during the resident's stream")
    parser.add_argument("--tokens", type=int, default=300, help="tokens of the resident stream")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument(
        "--settle", type=float, default=30, help="seconds between loads (the spare's imports)"
    )
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    model = Path(args.model)
    other = Path(args.other or args.model)
    (prompt,) = prompts(Texts(model, None), 1, 128)

    raw_cold(model, prompt)  # warm-up: kernels compile, files enter the page cache
    raw = [raw_cold(model, prompt) for _ in range(args.repeat)]
    with tempfile.TemporaryDirectory() as tmp:
        proc = start_mlxd(model, other, args.port, Path(tmp))
        try:
            wait_ready(f"http://127.0.0.1:{args.port}", model="resident")
            result = trio.run(through_mlxd, args.port, prompt, args)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    result["raw_cold_ttft_s"] = statistics.median(raw)
    result["runs"]["raw"] = raw
    ratios = {
        "cold_ttft": result["cold_ttft_s"] / result["raw_cold_ttft_s"],
        "resident_during_load": result["resident_during_load_tok_s"]
        / result["resident_alone_tok_s"],
    }
    print(f"cold TTFT: raw load+prefill {result['raw_cold_ttft_s']:.3f} s, ", end="")
    print(f"mlxd {result['cold_ttft_s']:.3f} s")
    print(f"resident stream: alone {result['resident_alone_tok_s']:.1f} tok/s, ", end="")
    print(f"while another model loads {result['resident_during_load_tok_s']:.1f} tok/s")
    for key, value, op, bound in (
        ("cold_ttft", ratios["cold_ttft"], "<=", 1.2),
        ("resident_during_load", ratios["resident_during_load"], ">=", 0.9),
    ):
        ok = value <= bound if op == "<=" else value >= bound
        print(f"ratio {key:22} {value:6.3f}  (target {op} {bound})  {'ok' if ok else 'MISSED'}")
    if args.json:
        Path(args.json).write_text(json.dumps(result | {"ratios": ratios}, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    main()
