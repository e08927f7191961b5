"""Serving benchmark: raw mlx-lm against the same model through mlxd over HTTP,
with ``mlx_lm.server`` and the bare HTTP stack beside them.

    python -m bench.serving [--model DIR] [--tokens 256] [--streams 8]
        [--arrivals burst|stagger|poisson] [--gap-ms 5] [--rate 50] [--peers]

Compares, in one process tree on one machine, these columns:

- ``raw mlx-lm``: ``stream_generate`` and ``BatchGenerator`` (``bench/raw.py``,
  a child process), every prompt at once: the ceiling;
- ``runner``: mlxd's runner process alone, driven through its protocol client
  (what the runner costs before any HTTP);
- ``mlxd``: ``mlxd serve`` (another child) over HTTP with a lean h11 client
  (``bench/client.py``: the server's cost alone);
- ``mlxd+httpx``: the same server driven by httpx (what a typical Python
  client adds);
- with ``--base DIR``: ``mlxd@base``, the mlxd of another checkout (an
  earlier commit), served the same way, for an A/B in one run;
- with ``--peers``: ``mlx_lm.server`` (its defaults, but for a prompt cache
  that keeps nothing, as mlxd's is off here) and ``http floor``, Hypercorn and
  Quart-trio answering at once with no model (``bench/bare.py``): what the
  stack itself takes for that many requests.

Clients arrive as ``--arrivals`` says: all at once (``burst``), one every
``--gap-ms`` (``stagger``), or at random at ``--rate`` a second (``poisson``,
the same draws for every column); each has a connection of its own, and its
time to first token counts from its own start.

All columns are started first and their runs interleaved (each column's single
stream, then each column's batch, ``--repeat`` times), so that the lent GPU's
drift in speed from minute to minute falls on every column alike. Prints a
table and the ratios the project targets, taken with the lean client:

- one stream through mlxd >= 0.95x raw single-stream decode speed
- N streams >= 0.90x raw BatchGenerator throughput (and >= 1.5x mlx_lm.server's)
- mean time to first token at N streams <= 1.3x (raw's + the HTTP floor's)

Every mlxd and raw stream ignores end-of-text so all make the same number of
tokens (``mlx_lm.server`` has no such switch: its end-of-text tokens get a
logit bias of -100). Without ``--model`` it uses the bundled
SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import trio

from api.texts import Texts
from bench import client
from bench.peers import ROOT, start_mlx_lm, stop
from config.settings import BUNDLED, default_cache_dir
from runner import sources
from runner.client import RunnerProcess, RunnerSpec
from runner.protocol import Generate, Sampling

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


Metrics = dict[str, float]
Stream = Callable[[list[int]], Awaitable[dict[str, float]]]
Column = tuple[Callable[[], Awaitable[Metrics]], Callable[[], Awaitable[Metrics]]]


class RawChild:
    """``bench/raw.py`` in a child process, asked for one run at a time."""

    def __init__(self, model_dir: Path, tokens: int, ps: list[list[int]]) -> None:
        cmd = [sys.executable, "-m", "bench.raw", str(model_dir), "--tokens", str(tokens)]
        cmd += ["--prompt", json.dumps(ps)]
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.device = ""

    def _ask(self, what: str | None) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if what is not None:
            self.proc.stdin.write(what + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("bench.raw exited")
        return dict(json.loads(line))

    async def ready(self) -> None:
        self.device = (await trio.to_thread.run_sync(self._ask, None))["device"]

    # abandoned on cancel: a run timeout (``measure``) kills the child after
    async def single(self) -> Metrics:
        return await trio.to_thread.run_sync(self._ask, "single", abandon_on_cancel=True)

    async def batch(self) -> Metrics:
        return await trio.to_thread.run_sync(self._ask, "batch", abandon_on_cancel=True)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def completion_body(prompt: list[int], tokens: int) -> dict[str, Any]:
    return {
        "model": "bench",
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }


def timed(t0: float, stamps: list[float], usage: dict[str, Any] | None, tokens: int) -> dict:
    assert usage is not None and usage["completion_tokens"] == tokens, usage
    return {"t0": t0, "first": stamps[0], "last": stamps[-1], "tokens": tokens}


async def stream_h11(port: int, prompt: list[int], tokens: int) -> dict:
    t0, stamps, usage = time.perf_counter(), [], None
    body = completion_body(prompt, tokens)
    async for event in client.sse_events("127.0.0.1", port, "/v1/completions", body):
        usage = event.get("usage") or usage
        if event["choices"] and event["choices"][0]["text"]:
            stamps.append(time.perf_counter())
    return timed(t0, stamps, usage, tokens)


async def stream_httpx(http: httpx.AsyncClient, port: int, prompt: list[int], tokens: int) -> dict:
    t0, stamps, usage = time.perf_counter(), [], None
    url = f"http://127.0.0.1:{port}/v1/completions"
    async with http.stream("POST", url, json=completion_body(prompt, tokens)) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
            if event["choices"] and event["choices"][0]["text"]:
                stamps.append(time.perf_counter())
    return timed(t0, stamps, usage, tokens)


async def stream_runner(runner: RunnerProcess, prompt: list[int], tokens: int) -> dict:
    t0, stamps = time.perf_counter(), []
    async with runner.generate(Generate(prompt, tokens, Sampling(temperature=0.0))) as chunks:
        async for chunk in chunks:
            if chunk.token is not None:  # not the first, which only says what was cached
                stamps.append(time.perf_counter())
            if chunk.finish or chunk.error:
                break
    return {"t0": t0, "first": stamps[0], "last": stamps[-1], "tokens": len(stamps)}


async def stream_plain(port: int, body: dict[str, Any]) -> dict:
    """A stream from a server that is not mlxd (mlx_lm.server, the HTTP floor):
    every event with text is a token."""
    t0, stamps = time.perf_counter(), []
    async for event in client.sse_events("127.0.0.1", port, "/v1/completions", body):
        if event.get("choices") and event["choices"][0].get("text"):
            stamps.append(time.perf_counter())
    return {"t0": t0, "first": stamps[0], "last": stamps[-1], "tokens": len(stamps)}


def arrivals(args: argparse.Namespace) -> list[float]:
    """When each of the batch's clients starts, in seconds from the first."""
    n = args.streams
    if args.arrivals == "stagger":
        return [i * args.gap_ms / 1000 for i in range(n)]
    if args.arrivals == "poisson":
        draws = random.Random(0)
        gaps = [0.0] + [draws.expovariate(args.rate) for _ in range(n - 1)]
        return list(itertools.accumulate(gaps))
    return [0.0] * n


def streamed(one: Stream, ps: list[list[int]], offsets: list[float]) -> Column:
    """A column whose runs are client streams: one on the first prompt, or one
    per prompt, each started at its offset."""

    async def single() -> Metrics:
        s = await one(ps[0])
        return {
            "ttft_s": s["first"] - s["t0"],
            "decode_tok_s": (s["tokens"] - 1) / (s["last"] - s["first"])
            if s["tokens"] > 1
            else math.nan,  # the HTTP floor makes no tokens
        }

    async def batch() -> Metrics:
        t0, runs = time.perf_counter(), []

        async def run_one(p: list[int], at: float) -> None:
            await trio.sleep_until(trio.current_time() + at)
            runs.append(await one(p))

        async with trio.open_nursery() as nursery:
            for p, at in zip(ps, offsets, strict=True):
                nursery.start_soon(run_one, p, at)
        ttfts = [r["first"] - r["t0"] for r in runs]
        return {
            "throughput_tok_s": sum(r["tokens"] for r in runs)
            / (max(r["last"] for r in runs) - t0),
            "ttft_mean_s": sum(ttfts) / len(ttfts),
            "ttft_max_s": max(ttfts),
        }

    return single, batch


async def measure(
    columns: dict[str, Column], repeat: int, run_timeout: float = 300.0
) -> dict[str, dict[str, Any]]:
    """Warm every column up with full-length runs (one single, two batches),
    then interleave ``repeat`` rounds and take each metric's median. A run
    that takes longer than ``run_timeout`` ends the benchmark, naming it.

    Two batch warm-ups, because requests that arrive over HTTP are grouped a
    little differently each time (say 6 then 2 instead of 8), and each new
    grouping compiles kernels once; on the GPU the first few groupings cost
    up to 0.15 s of time to first token."""

    async def timed(what: str, run: Callable[[], Awaitable[Metrics]]) -> Metrics:
        with trio.move_on_after(run_timeout) as scope:
            return await run()
        assert scope.cancelled_caught
        progress(f"{what}: no end after {run_timeout:g} s")
        raise TimeoutError(f"{what} took longer than {run_timeout:g} s (--run-timeout)")

    for name, (single, batch) in columns.items():
        progress(f"{name}: warming up")
        await timed(f"{name} single warm-up", single)
        await timed(f"{name} batch warm-up", batch)
        await timed(f"{name} second batch warm-up", batch)
    runs: dict[str, dict[str, list[Metrics]]] = {c: {"single": [], "batch": []} for c in columns}
    for i in range(repeat):
        for name, (single, _) in columns.items():
            runs[name]["single"].append(await timed(f"{name} single", single))
            progress(f"{name} single, round {i + 1}: {runs[name]['single'][-1]}")
        for name, (_, batch) in columns.items():
            runs[name]["batch"].append(await timed(f"{name} batch", batch))
            progress(f"{name} batch, round {i + 1}: {runs[name]['batch'][-1]}")
    return {
        name: {"single": median(r["single"]), "batch": median(r["batch"]), "runs": r}
        for name, r in runs.items()
    }


def progress(message: str) -> None:
    """A line on stderr as the run goes: a run cut short still says how far
    it got (on the lent GPU, a call's time limit ends it without a word)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def median(runs: list[Metrics]) -> Metrics:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


async def run_all(model_dir: Path, args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    texts = Texts(model_dir, None)
    ps = prompts(texts, args.streams, args.prompt_tokens)
    offsets = arrivals(args)
    raw = RawChild(model_dir, args.tokens, ps)
    peers: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        daemon = start_mlxd(model_dir, args.streams, args.port, Path(tmp))
        base_port = args.port + 3
        if args.base:
            peers.append(start_mlxd(model_dir, args.streams, base_port, Path(tmp), Path(args.base)))
        if args.peers:
            peers += [
                # batching as many as mlxd; a prompt cache that keeps nothing
                # (every run sends the same prompts, and mlxd's is off here)
                start_mlx_lm(
                    model_dir,
                    args.port + 1,
                    Path(tmp),
                    *("--decode-concurrency", str(max(args.streams, 32))),
                    *("--prompt-concurrency", str(args.streams), "--prompt-cache-bytes", "1"),
                ),
                start_floor(args.port + 2),
            ]
        try:
            async with trio.open_nursery() as nursery, httpx.AsyncClient(timeout=600) as http:
                spec = RunnerSpec("bench", model_dir, max(args.streams, 8))
                runner = await nursery.start(RunnerProcess(spec).run)
                await raw.ready()
                await trio.to_thread.run_sync(
                    wait_ready,
                    f"http://127.0.0.1:{args.port}",
                    300,
                    "bench",
                    mlxd_log(Path(tmp), args.port),
                )
                port, tokens = args.port, args.tokens
                columns: dict[str, Column] = {
                    "raw mlx-lm": (raw.single, raw.batch),
                    "runner": streamed(lambda p: stream_runner(runner, p, tokens), ps, offsets),
                    "mlxd": streamed(lambda p: stream_h11(port, p, tokens), ps, offsets),
                }
                if args.httpx:
                    columns["mlxd+httpx"] = streamed(
                        lambda p: stream_httpx(http, port, p, tokens), ps, offsets
                    )
                if args.base:
                    await trio.to_thread.run_sync(
                        wait_ready,
                        f"http://127.0.0.1:{base_port}",
                        300,
                        "bench",
                        mlxd_log(Path(tmp), base_port),
                    )
                    columns["mlxd@base"] = streamed(
                        lambda p: stream_h11(base_port, p, tokens), ps, offsets
                    )
                if args.peers:
                    lm, floor = args.port + 1, args.port + 2
                    await trio.to_thread.run_sync(wait_ready, f"http://127.0.0.1:{lm}", 900, "")
                    await trio.to_thread.run_sync(wait_ready, f"http://127.0.0.1:{floor}", 60, "")
                    eos = {str(t): -100 for t in texts.stop_ids}

                    def lm_body(p: list[int]) -> dict[str, Any]:
                        return {
                            "prompt": texts.backend.decode(p),
                            "max_tokens": tokens,
                            "temperature": 0,
                            "stream": True,
                            "logit_bias": eos,
                        }

                    columns["mlx_lm.server"] = streamed(
                        lambda p: stream_plain(lm, lm_body(p)), ps, offsets
                    )
                    columns["http floor"] = streamed(
                        lambda p: stream_plain(floor, {"max_tokens": 1}), ps, offsets
                    )
                results = await measure(columns, args.repeat, args.run_timeout)
                runner.stop()
        finally:
            raw.close()
            for proc in [daemon, *peers]:
                stop(proc)
    return raw.device, results


def start_floor(port: int) -> subprocess.Popen[bytes]:
    """``bench/bare.py``: the HTTP stack alone."""
    return subprocess.Popen([sys.executable, "-m", "bench.bare", str(port)], cwd=ROOT)


def start_mlxd(
    model_dir: Path,
    streams: int,
    port: int,
    workdir: Path,
    root: Path = ROOT,
    prefix_cache: bool = False,
) -> subprocess.Popen[bytes]:
    """``mlxd serve`` from the checkout at ``root`` (this one, or ``--base``'s),
    logging at info to ``mlxd_log(workdir, port)``; its prefix cache off
    unless asked for (every run sends the same prompts again: with its cache
    mlxd would read them from memory while raw mlx-lm reads them afresh)."""
    config = workdir / f"bench-{port}.toml"
    config.write_text(
        f'port = {port}\ncache_dir = "{workdir}"\n[[models]]\nname = "bench"\n'
        f'path = "{model_dir}"\nmax_concurrency = {max(streams, 8)}\nmax_context = 8192\n'
        + ("" if prefix_cache else "prefix_cache = 0\n")
    )
    log = mlxd_log(workdir, port).open("wb")
    cmd = [sys.executable, "-m", "daemon.cli", "serve", "--config", str(config)]
    return subprocess.Popen([*cmd, "--log-level", "info"], cwd=root, stderr=log)


def mlxd_log(workdir: Path, port: int) -> Path:
    return workdir / f"mlxd-{port}.log"


def wait_ready(
    url: str,
    timeout: float = 900,
    model: str = "bench",
    log: Path | None = None,
    path: str = "/v1/completions",
) -> None:
    """Wait until ``url`` answers a one-token completion (``path``: a chat
    completion, where that is ``/v1/chat/completions``), one request held
    open until the deadline. Meanwhile, every 30 s, it says it is still
    waiting, with the last line of the server's ``log`` and, from mlxd, what
    ``/api/ps`` says of its models and spare; if the wait ends unanswered, it
    prints the log's last lines (on a lent machine, a silent hang cost a whole
    call's time and told nothing)."""
    progress(f"waiting for {url}")
    started = time.monotonic()
    deadline = started + timeout
    body: dict[str, Any] = {"prompt": "hi", "max_tokens": 1}
    if path.endswith("chat/completions"):
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    if model:
        body["model"] = model
    done = threading.Event()

    def report() -> None:
        while not done.wait(30):
            last = _tail(log, 1)
            said = f"still waiting for {url} ({time.monotonic() - started:.0f} s)"
            progress(said + (f": {last}" if last else "") + _pool(url))

    threading.Thread(target=report, daemon=True).start()
    try:
        while (left := deadline - time.monotonic()) > 0:
            try:
                reply = httpx.post(f"{url}{path}", json=body, timeout=left)
            except httpx.TimeoutException:
                break
            except httpx.TransportError:
                time.sleep(0.2)  # not listening yet
                continue
            if reply.status_code == 200:
                progress(f"{url} is ready")
                return
            raise RuntimeError(f"{url} answered {reply.status_code}: {reply.text}")
    finally:
        done.set()
    if log is not None:
        print(f"--- the last lines of {log}:\n{_tail(log, 40)}", file=sys.stderr, flush=True)
    raise TimeoutError(f"{url} did not answer within {timeout:g} s")


def _pool(url: str) -> str:
    """What mlxd's ``/api/ps`` says of its models and its spare, in a line
    (nothing from a server that has no such page)."""
    try:
        pool = httpx.get(f"{url}/api/ps", timeout=5).json()
        models = ", ".join(
            f"{m['model']} {m['state']} running {m['running']} queued {m['queued']}"
            f" waiting for memory {m['waiting_for_memory']}"
            for m in pool["models"]
        )
        return f" [pool: {models}; spare {pool['spare']['state']}; used {pool['used']:,}]"
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return ""


def _tail(log: Path | None, lines: int) -> str:
    try:
        text = log.read_text(errors="replace") if log is not None else ""
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def report(
    device: str, results: dict[str, dict[str, Any]], args: argparse.Namespace
) -> dict[str, Any]:
    """Print the table and the target ratios; ``results`` maps a column name
    ("raw mlx-lm", "runner", "mlxd", "mlxd+httpx") to its measurements; the
    ratios are taken with the lean client (``mlxd``)."""
    n = args.streams
    raw_r, srv = results["raw mlx-lm"], results["mlxd"]
    # The time to first token no server can beat: raw's, plus the HTTP stack's
    # own for these arrivals where it was measured.
    floor = raw_r["batch"]["ttft_mean_s"]
    if "http floor" in results:
        floor += results["http floor"]["batch"]["ttft_mean_s"]
    ratios = {
        "single_decode": srv["single"]["decode_tok_s"] / raw_r["single"]["decode_tok_s"],
        f"throughput_{n}": srv["batch"]["throughput_tok_s"] / raw_r["batch"]["throughput_tok_s"],
        f"ttft_{n}": srv["batch"]["ttft_mean_s"] / floor,
    }
    targets = {
        "single_decode": (">=", 0.95),
        f"throughput_{n}": (">=", 0.90),
        f"ttft_{n}": ("<=", 1.3),
    }
    if "mlx_lm.server" in results:
        lm = results["mlx_lm.server"]["batch"]["throughput_tok_s"]
        ratios[f"throughput_{n}_vs_mlx_lm"] = srv["batch"]["throughput_tok_s"] / lm
        targets[f"throughput_{n}_vs_mlx_lm"] = (">=", 1.5)
    arriving = args.arrivals + (
        f" {args.gap_ms} ms apart"
        if args.arrivals == "stagger"
        else f" at {args.rate}/s"
        if args.arrivals == "poisson"
        else ""
    )
    print(
        f"device: {device}   tokens/stream: {args.tokens}   prompt tokens: {args.prompt_tokens}"
        f"   arrivals: {arriving}"
    )
    print(f"{'':26}" + "".join(f"{name:>15}" for name in results))
    rows = [
        ("1 stream decode tok/s", "single", "decode_tok_s"),
        ("1 stream TTFT s", "single", "ttft_s"),
        (f"{n} streams tok/s", "batch", "throughput_tok_s"),
        (f"{n} streams mean TTFT s", "batch", "ttft_mean_s"),
        (f"{n} streams max TTFT s", "batch", "ttft_max_s"),
    ]
    for label, part, key in rows:
        cells = (r[part].get(key, math.nan) for r in results.values())
        print(f"{label:26}" + "".join(f"{v:15.3f}" for v in cells))
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
    parser.add_argument("--arrivals", choices=("burst", "stagger", "poisson"), default="burst")
    parser.add_argument("--gap-ms", type=float, default=5.0, help="stagger: between clients")
    parser.add_argument("--rate", type=float, default=50.0, help="poisson: clients a second")
    parser.add_argument(
        "--peers", action="store_true", help="also mlx_lm.server and the bare HTTP stack"
    )
    parser.add_argument(
        "--no-httpx", dest="httpx", action="store_false", help="leave out the httpx column"
    )
    parser.add_argument(
        "--base", help="another mlxd checkout, served beside this one (an A/B in one run)"
    )
    parser.add_argument(
        "--run-timeout", type=float, default=300.0, help="seconds one run may take (then it fails)"
    )
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    model_dir = (
        Path(args.model) if args.model else trio.run(sources.resolve, BUNDLED, default_cache_dir())
    )
    device, results = trio.run(run_all, model_dir, args)
    result = report(device, results, args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    main()
