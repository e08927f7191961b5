"""Sharing benchmark: one model, several tools, fair shares and KV that grows.

    python -m bench.share [--model DIR] [--budget 24GiB] [--flood 40] [--slots 2]
        [--agents 6] [--agent-prompt 20000]

Three measurements, each against a fresh ``mlxd serve`` (a child process):

1. **Flood.** A background client (``indexer``) queues ``--flood`` long
   requests on a model that runs ``--slots`` at a time; then the editor
   (``interactive``) sends ``--editor`` short requests one after another. Its
   mean time to first token is set against the same requests on the idle
   server (``backlog_met``: the fewest requests still queued when one of
   its requests was sent; if 0, the flood was too short to tell).
   Once with clients configured (priorities, fair turns, preemption), once
   with none (every request the same anonymous client: first come, first
   served). Also the flood's throughput in both: what sharing costs (target:
   no more than 5% lost).
2. **Agents.** ``--agents`` Claude-Code-sized requests at once (a
   ``--agent-prompt``-token prompt, ``max_tokens`` 32000, each read for
   ``--agent-tokens`` tokens and then left, as an agent's turn ends), under
   ``--budget``: how many run at once (the most ``/api/ps`` showed), and how
   long they take, with KV reserved a step at a time (``kv_step_tokens``
   1024) and with all of ``max_tokens`` reserved up front (0).

Targets (printed): the editor's TTFT in the flood within 3x its idle TTFT
(a few: the pause of a background sequence, then its own prefill);
throughput lost to sharing <= 5%; more agents at once with growth than
without. Each case has a cache folder of its own, so that no case finds
another's prompts in the prefix cache's disk tier. Made for the lent GPU with the 8B
shape (``bench.random_model llama-8b``); on a CPU run it small, e.g.
``--flood 8 --flood-prompt 200 --flood-tokens 32 --agents 3 --agent-prompt 2000
--agent-tokens 8 --budget 2GiB``.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
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

from bench.peers import ROOT, stop
from bench.serving import mlxd_log, progress, wait_ready
from config.settings import BUNDLED, default_cache_dir
from config.units import parse_bytes
from runner import sources

CLIENTS = (
    '[[clients]]\nname = "indexer"\npriority = "background"\n'
    '[[clients]]\nname = "editor"\npriority = "interactive"\n'
    '[[clients]]\nname = "agent"\n'
)


def start(
    model: Path, port: int, work: Path, slots: int, budget: int, settings: str, clients: bool
) -> subprocess.Popen[bytes]:
    config = work / "mlxd.toml"
    config.write_text(
        f'port = {port}\ncache_dir = "{work}"\nmemory_budget = {budget}\n{settings}'
        + (CLIENTS if clients else "")
        + f'[[models]]\nname = "bench"\npath = "{model}"\nmax_concurrency = {slots}\n'
        "queue_limit = 256\nmax_context = 65536\n"
    )
    cmd = [sys.executable, "-m", "daemon.cli", "serve", "--config", str(config)]
    log = mlxd_log(work, port).open("wb")
    return subprocess.Popen([*cmd, "--log-level", "warning"], cwd=ROOT, stderr=log)


class Server:
    def __init__(self, http: httpx.AsyncClient, port: int) -> None:
        self.http, self.url = http, f"http://127.0.0.1:{port}"

    async def stream(
        self, prompt: list[int], max_tokens: int, client: str | None, read: int | None = None
    ) -> tuple[float, int]:
        """Time to first token and tokens read; ``read``: leave after that many."""
        body = {
            "model": "bench",
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        headers = {"X-Mlxd-Client": client} if client else {}
        sent, first, tokens = time.perf_counter(), None, 0
        url = f"{self.url}/v1/completions"
        async with self.http.stream("POST", url, json=body, headers=headers) as reply:
            if reply.status_code != 200:
                raise RuntimeError(f"{reply.status_code}: {(await reply.aread())[:300]!r}")
            async for line in reply.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                if json.loads(line[6:])["choices"]:
                    first = first or time.perf_counter()
                    tokens += 1
                    if read is not None and tokens >= read:
                        break
        return (first or time.perf_counter()) - sent, tokens

    async def pool(self) -> dict[str, Any]:
        (m,) = (await self.http.get(f"{self.url}/api/ps")).json()["models"]
        return dict(m)


def prompts(n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)  # distinct prompts: nothing found in the prefix cache
    return [[rng.randrange(1000, 20000) for _ in range(length)] for _ in range(n)]


async def editor_ttfts(
    server: Server, args: argparse.Namespace, client: str | None, seed: int
) -> tuple[list[float], int]:
    """The editor's requests one after another: their times to first token,
    and the fewest requests queued when one was sent (the backlog it met)."""
    out, backlog = [], 10**9
    for p in prompts(args.editor, 32, seed):
        backlog = min(backlog, (await server.pool())["queued"])
        ttft, _ = await server.stream(p, 8, client)
        out.append(ttft)
    return out, backlog


async def flood(server: Server, args: argparse.Namespace, fair: bool) -> dict[str, Any]:
    """The flood, and the editor's requests once it is queued."""
    editor = "editor" if fair else None
    alone, _ = await editor_ttfts(server, args, editor, seed=3)
    made: list[int] = []
    result: dict[str, Any] = {"editor_alone_ttft_s": statistics.mean(alone)}

    async def one(p: list[int]) -> None:
        _, n = await server.stream(p, args.flood_tokens, "indexer" if fair else None)
        made.append(n)

    began = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for p in prompts(args.flood, args.flood_prompt, seed=1):
            nursery.start_soon(one, p)
        await queued(server, args.flood - args.slots)
        during, backlog = await editor_ttfts(server, args, editor, seed=4)
        result["editor_flood_ttft_s"] = statistics.mean(during)
        result["backlog_met"] = backlog
    result["flood_tok_s"] = sum(made) / (time.perf_counter() - began)
    return result


async def queued(server: Server, n: int) -> None:
    """Until ``n`` requests wait in the model's queue (the pool is polled:
    nothing here can be told)."""
    while True:
        if (await server.pool())["queued"] >= n:
            return
        await trio.sleep(0.05)


async def agents(server: Server, args: argparse.Namespace) -> dict[str, Any]:
    """Claude-Code-sized turns at once: how many run together."""
    most, done = 0, trio.Event()

    async def watch() -> None:
        nonlocal most
        while not done.is_set():
            most = max(most, (await server.pool())["running"])
            await trio.sleep(0.1)

    began = time.perf_counter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        async with trio.open_nursery() as turns:
            for p in prompts(args.agents, args.agent_prompt, seed=2):
                turns.start_soon(server.stream, p, 32_000, "agent", args.agent_tokens)
        done.set()
    return {"agents_at_once": most, "agents_s": time.perf_counter() - began}


async def measure(
    model: Path,
    args: argparse.Namespace,
    case: tuple[str, bool, int],
    work: Path,
    run: Callable[[Server], Awaitable[dict[str, Any]]],
) -> dict[str, Any]:
    """Start mlxd for ``case`` (its top-level settings, whether clients are
    configured, the model's slots), wait for it, and ``run`` against it."""
    settings, clients, slots = case
    proc = start(model, args.port, work, slots, parse_bytes(args.budget), settings, clients)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(exited, proc, nursery.cancel_scope)
            url = f"http://127.0.0.1:{args.port}"
            log = mlxd_log(work, args.port)
            wait = functools.partial(wait_ready, url, 900, "bench", log)
            await trio.to_thread.run_sync(wait, abandon_on_cancel=True)
            nursery.cancel_scope.cancel()
        if proc.poll() is not None:
            text = await trio.Path(log).read_text(errors="replace")
            raise RuntimeError(f"mlxd exited ({proc.returncode}):\n{text[-2000:]}")
        async with httpx.AsyncClient(timeout=args.timeout) as http:
            server = Server(http, args.port)
            with trio.fail_after(args.timeout):
                return await run(server)
    finally:
        stop(proc)


async def exited(proc: subprocess.Popen[bytes], scope: trio.CancelScope) -> None:
    """Cancel ``scope`` if ``proc`` exits (a config it refused, say)."""
    await trio.to_thread.run_sync(proc.wait, abandon_on_cancel=True)
    scope.cancel()


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    model = Path(args.model) if args.model else await sources.resolve(BUNDLED, default_cache_dir())
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        Run = Callable[[Server], Awaitable[dict[str, Any]]]
        cases: list[tuple[str, tuple[str, bool, int], Run]] = [
            ("fair", ("", True, args.slots), lambda s: flood(s, args, fair=True)),
            ("fifo", ("", False, args.slots), lambda s: flood(s, args, fair=False)),
            ("growth", ("", True, args.agents), lambda s: agents(s, args)),
            ("up front", ("kv_step_tokens = 0\n", True, args.agents), lambda s: agents(s, args)),
        ]
        for name, case, run in cases:
            progress(f"{name}: starting")
            here = work / name.replace(" ", "-")  # a cache of its own: no prefix found on disk
            here.mkdir()
            results[name] = await measure(model, args, case, here, run)
            progress(f"{name}: {results[name]}")
    return results


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    fair, fifo = results["fair"], results["fifo"]
    print(
        f"\nflood of {args.flood} ({args.flood_prompt}-token prompts, "
        f"{args.flood_tokens} tokens each)"
    )
    print(f"{'':28}{'fair':>12}{'fifo':>12}")
    for key in ("editor_alone_ttft_s", "editor_flood_ttft_s", "backlog_met", "flood_tok_s"):
        print(f"{key:28}{fair[key]:12.3f}{fifo[key]:12.3f}")
    print(f"\n{args.agents} agents ({args.agent_prompt}-token prompts), budget {args.budget}")
    for name in ("growth", "up front"):
        r = results[name]
        print(f"{name:28}{r['agents_at_once']:>6} at once {r['agents_s']:8.2f} s")
    lost = 1 - fair["flood_tok_s"] / fifo["flood_tok_s"]
    checks = {
        "editor TTFT in the flood <= 3x alone": fair["editor_flood_ttft_s"]
        <= 3 * fair["editor_alone_ttft_s"],
        f"throughput lost to sharing {lost:.1%} <= 5%": lost <= 0.05,
        "more agents at once with growth": results["growth"]["agents_at_once"]
        > results["up front"]["agents_at_once"],
    }
    for what, ok in checks.items():
        print(f"{what:50} {'ok' if ok else 'MISSED'}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="MLX model directory (default: bundled SmolLM2)")
    parser.add_argument("--budget", default="24GiB", help="mlxd's memory_budget")
    parser.add_argument("--flood", type=int, default=40, help="background requests")
    parser.add_argument("--flood-prompt", type=int, default=2000)
    parser.add_argument("--flood-tokens", type=int, default=256)
    parser.add_argument("--slots", type=int, default=2, help="max_concurrency in the flood")
    parser.add_argument("--editor", type=int, default=5, help="the editor's requests")
    parser.add_argument("--agents", type=int, default=6)
    parser.add_argument("--agent-prompt", type=int, default=20_000)
    parser.add_argument("--agent-tokens", type=int, default=128, help="read, then left")
    parser.add_argument("--port", type=int, default=8790)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds a case may take")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    results = trio.run(main_async, args)
    report(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
