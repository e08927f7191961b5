"""Serving benchmark: raw mlx-lm against the same model through mlxd over HTTP.

    python -m bench.serving [--model DIR] [--tokens 256] [--streams 8]

Runs, in one process tree on one machine: raw ``stream_generate`` and
``BatchGenerator`` (``bench/raw.py``, a child process); mlxd's runner process
alone, driven through its protocol client (what the runner costs before any
HTTP); then ``mlxd serve`` (another child) driven over HTTP by this process. Prints a table and the
ratios the project targets:

- one stream through mlxd >= 0.95x raw single-stream decode speed
- N concurrent streams >= 0.90x raw BatchGenerator throughput
- time to first token at N streams <= 1.5x raw

Every stream ignores end-of-text so both sides make the same number of tokens.
Without ``--model`` it uses the bundled SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import trio

from api.texts import Texts
from config.settings import BUNDLED, default_cache_dir
from runner import sources
from runner.client import RunnerProcess, RunnerSpec
from runner.protocol import Sampling

ROOT = Path(__file__).resolve().parent.parent
TEXT = (
    "The history of the printing press begins in the fifteenth century, when movable type "
    "changed how knowledge spread across Europe. Write a long, detailed essay about it. "
)


def prompts(texts: Texts, n: int, prompt_tokens: int) -> list[list[int]]:
    out = []
    for i in range(n):
        ids = texts.chat_prompt([{"role": "user", "content": f"({i}) " + TEXT * 40}])
        out.append(ids[-prompt_tokens:])
    return out


def raw(model_dir: Path, args: argparse.Namespace, ps: list[list[int]]) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "bench.raw",
        str(model_dir),
        "--tokens",
        str(args.tokens),
        "--streams",
        str(args.streams),
        "--repeat",
        str(args.repeat),
        "--prompt",
        json.dumps(ps),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


async def one_stream(http: httpx.AsyncClient, url: str, prompt: list[int], tokens: int) -> dict:
    body = {
        "model": "bench",
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    stamps: list[float] = []
    usage = None
    async with http.stream("POST", f"{url}/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            if event["choices"] and event["choices"][0]["text"]:
                stamps.append(time.perf_counter())
    assert usage is not None and usage["completion_tokens"] == tokens, usage
    return {"t0": t0, "first": stamps[0], "last": stamps[-1], "tokens": tokens}


async def through_mlxd(url: str, args: argparse.Namespace, ps: list[list[int]]) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=600) as http:

        async def single() -> dict[str, float]:
            return await one_stream(http, url, ps[0], args.tokens)

        async def batch() -> list[dict[str, float]]:
            return list(await asyncio.gather(*(one_stream(http, url, p, args.tokens) for p in ps)))

        return await measure(single, batch, args.repeat, time.perf_counter)


async def through_runner(
    model_dir: Path, args: argparse.Namespace, ps: list[list[int]]
) -> dict[str, Any]:
    """The runner process alone, driven through its protocol client: what the
    daemon's runner costs before any HTTP is involved."""
    greedy = Sampling(temperature=0.0)
    async with trio.open_nursery() as nursery:
        spec = RunnerSpec("bench", model_dir, max(args.streams, 8))
        runner = await nursery.start(RunnerProcess(spec).run)

        async def one(prompt: list[int]) -> dict[str, float]:
            t0 = trio.current_time()
            stamps = []
            async with runner.generate(prompt, args.tokens, greedy) as chunks:
                async for chunk in chunks:
                    stamps.append(trio.current_time())
                    if chunk.finish or chunk.error:
                        break
            return {"t0": t0, "first": stamps[0], "last": stamps[-1], "tokens": len(stamps)}

        async def single() -> dict[str, float]:
            return await one(ps[0])

        async def batch() -> list[dict[str, float]]:
            out: list[dict[str, float]] = []

            async def run_one(p: list[int]) -> None:
                out.append(await one(p))

            async with trio.open_nursery() as inner:
                for p in ps:
                    inner.start_soon(run_one, p)
            return out

        result = await measure(single, batch, args.repeat, trio.current_time)
        runner.stop()
    return result


async def measure(
    single: Callable[[], Awaitable[dict[str, float]]],
    batch: Callable[[], Awaitable[list[dict[str, float]]]],
    repeat: int,
    clock: Callable[[], float],
) -> dict[str, Any]:
    """Warm up with one full-length run of each kind (kernels for every shape
    are compiled then), then take each metric's median over ``repeat`` runs."""
    await single()
    await batch()
    singles, batches = [], []
    for _ in range(repeat):
        s = await single()
        singles.append(
            {
                "ttft_s": s["first"] - s["t0"],
                "decode_tok_s": (s["tokens"] - 1) / (s["last"] - s["first"]),
            }
        )
        t0 = clock()
        runs = await batch()
        ttfts = [r["first"] - r["t0"] for r in runs]
        batches.append(
            {
                "throughput_tok_s": sum(r["tokens"] for r in runs)
                / (max(r["last"] for r in runs) - t0),
                "ttft_mean_s": sum(ttfts) / len(ttfts),
                "ttft_max_s": max(ttfts),
            }
        )
    return {"single": median(singles), "batch": median(batches)}


def median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def start_mlxd(model_dir: Path, streams: int, port: int, workdir: Path) -> subprocess.Popen[bytes]:
    config = workdir / "bench.toml"
    config.write_text(
        f'port = {port}\ncache_dir = "{workdir}"\n[[models]]\nname = "bench"\n'
        f'path = "{model_dir}"\nmax_concurrency = {max(streams, 8)}\n'
    )
    log = (workdir / "mlxd.log").open("wb")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "daemon.cli",
            "serve",
            "--config",
            str(config),
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        stderr=log,
    )


def wait_ready(url: str, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    body = {"model": "bench", "prompt": "hi", "max_tokens": 1}
    while time.monotonic() < deadline:
        try:
            if httpx.post(f"{url}/v1/completions", json=body, timeout=600).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError("mlxd did not become ready")


def report(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Print the table and the target ratios; ``results`` maps a column name
    ("raw mlx-lm", "runner", "mlxd") to its measurements."""
    n = args.streams
    raw_r, srv = results["raw mlx-lm"], results["mlxd"]
    ratios = {
        "single_decode": srv["single"]["decode_tok_s"] / raw_r["single"]["decode_tok_s"],
        f"throughput_{n}": srv["batch"]["throughput_tok_s"] / raw_r["batch"]["throughput_tok_s"],
        f"ttft_{n}": srv["batch"]["ttft_mean_s"] / raw_r["batch"]["ttft_mean_s"],
    }
    targets = {
        "single_decode": (">=", 0.95),
        f"throughput_{n}": (">=", 0.90),
        f"ttft_{n}": ("<=", 1.5),
    }
    print(
        f"device: {raw_r['device']}   tokens/stream: {args.tokens}   "
        f"prompt tokens: {args.prompt_tokens}"
    )
    print(f"{'':26}" + "".join(f"{name:>13}" for name in results))
    rows = [
        ("1 stream decode tok/s", "single", "decode_tok_s"),
        ("1 stream TTFT s", "single", "ttft_s"),
        (f"{n} streams tok/s", "batch", "throughput_tok_s"),
        (f"{n} streams mean TTFT s", "batch", "ttft_mean_s"),
        (f"{n} streams max TTFT s", "batch", "ttft_max_s"),
    ]
    for label, part, key in rows:
        print(f"{label:26}" + "".join(f"{r[part][key]:13.3f}" for r in results.values()))
    for key, value in ratios.items():
        op, bound = targets[key]
        ok = value >= bound if op == ">=" else value <= bound
        print(f"ratio {key:20} {value:6.3f}  (target {op} {bound})  {'ok' if ok else 'MISSED'}")
    return {**results, "ratios": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="MLX model directory (default: bundled SmolLM2)")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (median)")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    model_dir = (
        Path(args.model) if args.model else trio.run(sources.resolve, BUNDLED, default_cache_dir())
    )
    texts = Texts(model_dir, None)
    ps = prompts(texts, args.streams, args.prompt_tokens)
    results = {"raw mlx-lm": raw(model_dir, args, ps)}
    results["runner"] = trio.run(through_runner, model_dir, args, ps)

    url = f"http://127.0.0.1:{args.port}"
    with tempfile.TemporaryDirectory() as tmp:
        proc = start_mlxd(model_dir, args.streams, args.port, Path(tmp))
        try:
            wait_ready(url)
            results["mlxd"] = asyncio.run(through_mlxd(url, args, ps))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    result = report(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    main()
