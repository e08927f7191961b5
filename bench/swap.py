"""Swap benchmark: loading a model on demand, and what a load costs the others.

    python -m bench.swap --model DIR [--other DIR] [--repeat 5]

1. Time to first token for a request to a model that is not resident, through
   mlxd over HTTP (the model is configured with ``keep_alive = 0``, so every
   request loads it), against raw ``mlx_lm.load`` plus the prefill of the same
   prompt in a fresh process (imports done before the clock starts).
   Target: <= 1.2x.
2. A resident model's streaming speed while another model loads and answers,
   against its speed alone: both measured in the same stream (the stretch
   before the other request is sent, and the stretch until that request's
   first token), so that the device's drift between runs cancels out.
   Target: >= 0.9x.

Before each load the benchmark waits until the previous one has been unloaded
and mlxd's spare runner is ready (as it is when swaps are further apart than
the spare's start-up, which mlxd logs); the load phases the runners report are
printed as well. ``--other`` (default: ``--model``) is the model loaded in (2).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
from bench.peers import ROOT
from bench.serving import completion_body, prompts, wait_ready

RAW = """
import json, sys, time
from runner.__main__ import preload_blas
preload_blas()
from mlx_lm import load, stream_generate
model_dir, prompt = sys.argv[1], json.loads(sys.argv[2])
t0 = time.perf_counter()
model, tokenizer = load(model_dir)[:2]
t1 = time.perf_counter()
for _ in stream_generate(model, tokenizer, prompt, max_tokens=1):
    break
t2 = time.perf_counter()
print(json.dumps({"ttft_s": t2 - t0, "load_s": t1 - t0}))
"""


def raw_cold(model_dir: Path, prompt: list[int]) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", RAW, str(model_dir), json.dumps(prompt)],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


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
    return subprocess.Popen([*cmd, "--log-level", "info"], cwd=ROOT, stderr=log)


async def stream(
    port: int, model: str, prompt: list[int], tokens: int, first: trio.Event | None = None
) -> list[float]:
    """Start a stream; the time it was sent, then each token's arrival.
    ``first`` is set when the first token arrives."""
    stamps = [time.perf_counter()]
    body = completion_body(prompt, tokens) | {"model": model}
    async for event in sse_events("127.0.0.1", port, "/v1/completions", body):
        if event["choices"] and event["choices"][0]["text"]:
            stamps.append(time.perf_counter())
            if first is not None:
                first.set()
    return stamps


async def absent(port: int, model: str, timeout_s: float = 300) -> None:
    """Wait until ``model`` has been unloaded and the spare runner is ready."""
    async with httpx.AsyncClient() as http:
        with trio.fail_after(timeout_s):
            while True:
                pool = (await http.get(f"http://127.0.0.1:{port}/api/ps")).json()
                gone = all(m["state"] == "absent" for m in pool["models"] if m["model"] == model)
                if gone and pool["spare"]["state"] == "ready":
                    return
                await trio.sleep(0.1)


def rate(stamps: list[float], start: float, end: float) -> float:
    """Tokens per second among the token ``stamps`` that fall in [start, end]."""
    inside = [t for t in stamps[1:] if start <= t <= end]
    if len(inside) < 3:
        raise RuntimeError("too few tokens in the window: use more --tokens")
    return (len(inside) - 1) / (inside[-1] - inside[0])


async def resident_during_load(
    port: int, prompt: list[int], tokens: int, lead_s: float
) -> tuple[float, float]:
    """The resident stream's rate alone (its first ``lead_s`` seconds), then
    while the other model loads and answers its request."""
    resident: list[float] = []
    other: list[float] = []
    going = trio.Event()

    async def load_other() -> None:
        await going.wait()
        await trio.sleep(lead_s)
        other.extend(await stream(port, "other", prompt, 1))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(load_other)
        resident.extend(await stream(port, "resident", prompt, tokens, going))
    if not other or resident[-1] < other[1]:
        raise RuntimeError("the resident stream ended before the other model answered")
    return rate(resident, resident[1], other[0]), rate(resident, other[0], other[1])


async def through_mlxd(port: int, prompt: list[int], args: argparse.Namespace) -> dict[str, Any]:
    cold = []
    await stream(port, "cold", prompt, 1)  # warm-up: kernels compile
    for _ in range(args.repeat):
        await absent(port, "cold")
        stamps = await stream(port, "cold", prompt, 1)
        cold.append(stamps[1] - stamps[0])

    # Warm-up: the resident's first long stream loads the kernels for longer
    # caches (measured alone, it ran at half speed), and "other" compiles.
    await stream(port, "resident", prompt, args.tokens)
    await stream(port, "other", prompt, 1)
    alone, during = [], []
    for _ in range(args.repeat):
        await absent(port, "other")
        before, while_loading = await resident_during_load(port, prompt, args.tokens, args.lead)
        alone.append(before)
        during.append(while_loading)
    return {
        "cold_ttft_s": statistics.median(cold),
        "resident_alone_tok_s": statistics.median(alone),
        "resident_during_load_tok_s": statistics.median(during),
        "resident_ratio": statistics.median(d / a for d, a in zip(during, alone, strict=True)),
        "runs": {"cold": cold, "alone": alone, "during": during},
    }


def load_phases(log: Path) -> dict[str, dict[str, float]]:
    """Median seconds per load phase, per model, from mlxd's ``load`` log lines
    (and the spare runner's start-up)."""
    seen: dict[str, dict[str, list[float]]] = {}
    for line in log.read_text().splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if " load model=" in line:
            model = fields.pop("model")
        elif " spare runner ready " in line:
            model = "spare"
        else:
            continue
        for key, value in fields.items():
            if key.endswith("_s"):
                seen.setdefault(model, {}).setdefault(key, []).append(float(value))
    return {m: {k: statistics.median(v) for k, v in ks.items()} for m, ks in seen.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="MLX model directory")
    parser.add_argument("--other", help="the model loaded during the resident's stream")
    parser.add_argument(
        "--tokens", type=int, default=1500, help="resident stream tokens (must outlast a load)"
    )
    parser.add_argument(
        "--lead", type=float, default=1.0, help="seconds the resident streams alone first"
    )
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--log", help="keep mlxd's log here")
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
            if args.log:
                shutil.copy(Path(tmp) / "mlxd.log", args.log)
        result["load_phases_s"] = load_phases(Path(tmp) / "mlxd.log")
    result["raw_cold_ttft_s"] = statistics.median(r["ttft_s"] for r in raw)
    result["raw_load_s"] = statistics.median(r["load_s"] for r in raw)
    result["runs"]["raw"] = raw
    ratios = {
        "cold_ttft": result["cold_ttft_s"] / result["raw_cold_ttft_s"],
        "resident_during_load": result["resident_ratio"],
    }
    print(f"cold TTFT: raw load+prefill {result['raw_cold_ttft_s']:.3f} s ", end="")
    print(f"(load {result['raw_load_s']:.3f} s), mlxd {result['cold_ttft_s']:.3f} s")
    for model, phases in result["load_phases_s"].items():
        print(f"  mlxd {model}: " + ", ".join(f"{k} {v:.3f}" for k, v in phases.items()))
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
