"""The daemon's own CPU per request, and where it goes.

    python -m bench.cpu [--model DIR] [--requests 300] [--profile]

Starts ``mlxd serve`` (and, beside it, the bare HTTP stack: ``bench/bare.py``)
and sends requests one after another, each asking for one token, so that
what the daemon process spends (its user and system CPU, read from ``/proc``
or ``ps``; the runner is another process) is the per-request work alone:

- ``bare stack``: Hypercorn and Quart-trio answering a streamed completion;
- ``health``: ``GET /health`` through mlxd (its HTTP path, guard, record);
- ``chat``, ``chat stream``: a short chat request, whole and streamed;
- ``agent turn``: a streamed chat request of an agent's size (a 3,000-word
  system prompt, a growing conversation), each turn one message longer,
  as a coding agent sends them;
- ``per streamed token``: 8 streams of 64 tokens at once, the daemon's CPU
  divided by the tokens (a chunk from the runner, decoded, sent as an
  event): what bounds a fast model's throughput at many streams, since the
  daemon's event loop is one thread (with ``--profile``, only with
  ``--per-token``, which profiles it alone).

With ``--profile`` mlxd runs under cProfile, twice: once only started and
stopped, once serving the requests; the difference, split by where it was
spent (the HTTP stack, Quart, JSON, the guard, validation, the chat template,
the tokenizer, the answer, the scheduler's lease, the runner pipe, trio), is
the requests' (cProfile's own overhead inflates every part alike).
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import trio

from bench.peers import ROOT
from bench.serving import wait_ready
from config.settings import BUNDLED, default_cache_dir
from runner import sources

# Where a profiled function's time is counted: the first pattern its file matches.
PARTS = (
    ("hypercorn + h11", ("hypercorn/", "h11/", "wsproto/", "h2/")),
    ("quart + werkzeug", ("quart/", "quart_trio/", "werkzeug/", "flask/")),
    ("json", ("json/",)),
    ("guard + record", ("api/guard.py", "api/record.py", "api/app.py", "api/errors.py")),
    ("validation", ("api/schemas.py", "api/tools.py", "api/http.py", "api/offload.py")),
    ("template", ("jinja2/", "api/texts.py", "transformers/")),
    ("tokenizer", ("tokenizers/", "api/prompt_tokens.py")),
    (
        "answer",
        ("api/generation.py", "api/stream.py", "api/decoder.py", "api/delta.py", "api/openai/"),
    ),
    ("lease", ("scheduler/",)),
    ("runner pipe", ("runner/client.py", "runner/protocol.py")),
    ("trio", ("trio/", "outcome/", "sniffio/")),
)


def cpu_seconds(pid: int) -> float:
    """The process's user + system CPU so far."""
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():
        fields = stat.read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    out = subprocess.run(["ps", "-o", "time=", "-p", str(pid)], capture_output=True, text=True)
    parts = [float(p) for p in out.stdout.strip().replace("-", ":").split(":")]
    return sum(p * 60**i for i, p in enumerate(reversed(parts)))


def agent_turns() -> Iterator[dict[str, Any]]:
    """Chat bodies the way a coding agent sends them: one long system prompt,
    then a conversation that grows by a turn each request (no tools: the
    bundled model's template has no place for them)."""
    system = " ".join(f"Rule {i}: keep edits small and explain each one." for i in range(300))
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}]
    for turn in range(10**6):
        messages.append({"role": "user", "content": f"Step {turn}: look at file {turn}.py"})
        yield {"messages": list(messages)}
        messages.append({"role": "assistant", "content": f"I looked at {turn}.py; it is fine."})


def measure(pid: int, n: int, send: Callable[[int], None]) -> float:
    """Milliseconds of ``pid``'s CPU per request over ``n`` calls of ``send``."""
    send(-1)  # once before: first-use costs (a template compiled, a cache filled)
    before = cpu_seconds(pid)
    for i in range(n):
        send(i)
    time.sleep(0.2)  # the last response's bookkeeping
    return round(1000 * (cpu_seconds(pid) - before) / n, 3)


STREAMS, STREAM_TOKENS = 8, 64


def per_token(pid: int, url: str) -> float:
    """Milliseconds of ``pid``'s CPU per token while ``STREAMS`` streams of
    ``STREAM_TOKENS`` tokens each run at once: a stream's cost beyond its
    request (a chunk from the runner, decoded, sent as an event)."""
    body = {
        "model": "bench",
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_tokens": STREAM_TOKENS,
        "ignore_eos": True,
        "stream": True,
    }

    def stream(_: int) -> None:
        with httpx.Client(timeout=600) as http:
            with http.stream("POST", f"{url}/v1/chat/completions", json=body) as reply:
                reply.raise_for_status()
                for _chunk in reply.iter_bytes():
                    pass

    def together() -> None:
        with ThreadPoolExecutor(STREAMS) as pool:
            list(pool.map(stream, range(STREAMS)))

    together()  # once before: the batch's shapes, first-use costs
    before = cpu_seconds(pid)
    together()
    time.sleep(0.2)
    spent = cpu_seconds(pid) - before
    return round(1000 * spent / (STREAMS * STREAM_TOKENS), 3)


def run(args: argparse.Namespace, work: Path, requests: int) -> dict[str, Any]:
    """Serve, send ``requests`` of each case (none: only start and stop)."""
    model = (
        Path(args.model) if args.model else trio.run(sources.resolve, BUNDLED, default_cache_dir())
    )
    port, floor_port = args.port, args.port + 1
    config = work / "cpu.toml"
    config.write_text(
        f'port = {port}\ncache_dir = "{work}"\nspare_runner = false\n'
        f'[[models]]\nname = "bench"\npath = "{model}"\nmax_context = 32768\n'
    )
    profile = work / f"mlxd-{requests}.prof"
    prefix = (
        [sys.executable, "-m", "cProfile", "-o", str(profile)] if args.profile else [sys.executable]
    )
    cmd = [*prefix, "-m", "daemon.cli", "serve", "--config", str(config), "--log-level", "warning"]
    with (work / "mlxd.log").open("wb") as log:
        mlxd = subprocess.Popen(cmd, cwd=ROOT, stderr=log)
    floor = subprocess.Popen([sys.executable, "-m", "bench.bare", str(floor_port)], cwd=ROOT)
    results: dict[str, Any] = {}
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, 600)
        wait_ready(f"http://127.0.0.1:{floor_port}", 60, model="")
        with httpx.Client(timeout=120) as http:
            one = {"model": "bench", "max_tokens": 1, "temperature": 0}
            chat = one | {"messages": [{"role": "user", "content": "Say hi."}]}
            turns = agent_turns()

            def post(where: str, body: dict[str, Any]) -> None:
                reply = http.post(where, json=body)
                if reply.status_code != 200:
                    raise RuntimeError(f"{where}: {reply.status_code} {reply.text[:300]}")

            def post_or_get(where: str) -> None:
                http.get(where).raise_for_status()

            cases: dict[str, tuple[int, Callable[[int], None]]] = {
                "bare stack": (
                    floor.pid,
                    lambda _: post(
                        f"http://127.0.0.1:{floor_port}/v1/completions", {"max_tokens": 1}
                    ),
                ),
                "health": (mlxd.pid, lambda _: post_or_get(f"{url}/health")),
                "chat": (mlxd.pid, lambda _: post(f"{url}/v1/chat/completions", chat)),
                "chat stream": (
                    mlxd.pid,
                    lambda _: post(f"{url}/v1/chat/completions", chat | {"stream": True}),
                ),
                "agent turn": (
                    mlxd.pid,
                    lambda _: post(
                        f"{url}/v1/chat/completions", one | next(turns) | {"stream": True}
                    ),
                ),
            }
            for name, (pid, send) in cases.items() if requests and not args.per_token else ():
                results[name] = measure(pid, requests, send)
                print(f"{name:>12}: {results[name]:.3f} ms of CPU a request", flush=True)
            if requests and (args.per_token or not args.profile):  # profiled apart
                results["per streamed token"] = per_token(mlxd.pid, url)
                print(
                    f"per streamed token ({STREAMS} streams): "
                    f"{results['per streamed token']:.3f} ms of CPU",
                    flush=True,
                )
    finally:
        floor.send_signal(signal.SIGTERM)
        mlxd.send_signal(signal.SIGTERM)
        mlxd.wait(timeout=120)
        floor.wait(timeout=60)
    return results


def parts(served: Path, idle: Path, requests: int) -> dict[str, Any]:
    """Own time (``tottime``) by part in ms per request: what the profile
    ``served`` spent beyond ``idle`` (start and stop), waiting aside."""
    totals: dict[str, float] = {}
    functions: dict[str, float] = {}
    spent: Any = getattr(pstats.Stats(str(served)), "stats")  # noqa: B009 (untyped)
    before: Any = getattr(pstats.Stats(str(idle)), "stats")  # noqa: B009
    for key, (_, ncalls, tottime, _, _) in spent.items():
        file, _, name = key
        if file == "~" and any(w in name for w in ("poll", "select", "sleep", "acquire")):
            continue  # waiting for the next event, not work
        own = tottime - (before[key][2] if key in before else 0.0)
        where = next((part for part, pats in PARTS if any(p in file for p in pats)), "other")
        totals[where] = totals.get(where, 0.0) + own
        calls = ncalls - (before[key][1] if key in before else 0)
        functions[f"{file.split('site-packages/')[-1]}:{name} x{calls / requests:.1f}"] = own
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])
    top = sorted(functions.items(), key=lambda kv: -kv[1])[:25]
    return {
        **{part: round(1000 * t / requests, 3) for part, t in ranked},
        "top functions": {f: round(1000 * t / requests, 3) for f, t in top},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="MLX model directory (default: bundled SmolLM2)")
    parser.add_argument("--requests", type=int, default=300, help="per case")
    parser.add_argument("--profile", action="store_true", help="run mlxd under cProfile")
    parser.add_argument(
        "--per-token", action="store_true", help="only the streamed tokens (profiled: per token)"
    )
    parser.add_argument("--port", type=int, default=8770)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = run(args, Path(tmp), args.requests)
        if args.profile:
            run(args, Path(tmp), 0)
            served, idle = Path(tmp) / f"mlxd-{args.requests}.prof", Path(tmp) / "mlxd-0.prof"
            if args.per_token:  # two rounds of streams: the warm-up's and the measured
                tokens = 2 * STREAMS * STREAM_TOKENS
                results["profile_ms_per_token"] = parts(served, idle, tokens)
            else:
                mlxd_requests = args.requests * (len(results) - 1)  # the bare stack's aside
                results["profile_ms_per_request"] = parts(served, idle, mlxd_requests)
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    main()
