"""Soak test: many careless clients against one daemon for a while.

    python -m bench.soak [--minutes 5] [--clients 12] [--models 3] [--json FILE]

Starts ``mlxd serve`` with ``--models`` tiny random-weight models (built from
the bundled SmolLM2's tokenizer) and the bundled embedding model under a
memory budget that holds only two of the tiny ones, so that requests keep
swapping models; stored responses are persisted. Clients then loop, each step
one of: a chat request (streamed or not) to a random model; a stream dropped
after a few events; a malformed request; a request whose client gives up
while it waits; an Anthropic Messages request (streamed or not); a batch of
embeddings; a stored Response and its follow-up (``previous_response_id``).
Every 20 s one runner is killed with SIGKILL; every 10 s the cache folder is
damaged (a prefix file cut short or overwritten, a folder or a FIFO named
like a prefix file, the write ledger garbled). Each second the pool's ledger
is read and the daemon's memory sampled.

Reports requests by outcome, and the three numbers that must stay at zero:
budget overruns (the ledger charging more than the budget), unanswered
requests (no response within 120 s), and server errors that were not a
killed runner's (5xx other than 502 runner_crashed). Not part of CI.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
import trio

from bench.peers import ROOT
from bench.random_model import write
from bench.serving import wait_ready
from config.settings import BUNDLED, BUNDLED_EMBED, ModelConfig, Settings, default_cache_dir
from daemon.launcher import Launcher
from runner import sources

CHAT = [{"role": "user", "content": "Tell me a story."}]
EMBED = "minilm"
MALFORMED: list[Any] = [
    {"messages": [{"role": ["user"], "content": "hi"}]},
    {"messages": CHAT, "top_k": 10**9},
    {"messages": CHAT, "max_tokens": -3},
    {"messages": "hi"},
    {"messages": CHAT, "logit_bias": {"²": 1}},
    {"messages": CHAT * 20_000},
]


class Tally:
    def __init__(self) -> None:
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.unanswered = 0
        self.server_errors: list[str] = []
        self.crashes: collections.Counter[str] = collections.Counter()  # a killed runner's
        self.overruns = 0
        self.overrun_at: list[dict[str, Any]] = []  # the ledger when it was over
        self.rss_mb: list[tuple[float, float]] = []

    def saw(self, resp: httpx.Response, kind: str = "") -> None:
        self.outcomes[f"{kind} {resp.status_code}".strip()] += 1
        if resp.status_code >= 500:
            code = _code(resp)
            if code != "runner_crashed" and "exited" not in resp.text:  # a killed runner's
                self.server_errors.append(f"{resp.status_code} {code}: {resp.text[:200]}")
            else:
                self.crashes[resp.text[:160]] += 1


def _code(resp: httpx.Response) -> str | None:
    try:
        error = resp.json()["error"]
        return str(error.get("code") or error.get("type"))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


KINDS = {  # what a client step does, and how often
    "chat": 4,
    "stream": 4,
    "drop": 2,
    "bad": 1,
    "impatient": 1,
    "messages": 2,
    "embed": 1,
    "stored": 1,
}


async def client(
    http: httpx.AsyncClient, base: str, models: list[str], tally: Tally, end: float
) -> None:
    rng = random.Random()
    url = f"{base}/v1/chat/completions"
    while trio.current_time() < end:
        model = rng.choice(models)
        body = {"model": model, "messages": CHAT, "max_tokens": rng.randint(1, 64)}
        kind = rng.choices(list(KINDS), list(KINDS.values()))[0]
        try:
            with trio.fail_after(120):
                if kind == "messages":
                    stream = rng.random() < 0.5
                    messages = body | {"stream": stream}
                    reply = await http.post(f"{base}/v1/messages", json=messages)
                    tally.saw(reply, kind)
                elif kind == "embed":
                    line = "a line of a file being indexed " * rng.randint(1, 20)
                    inputs = [f"{i}: {line}" for i in range(rng.randint(1, 64))]
                    embed = {"model": EMBED, "input": inputs}
                    tally.saw(await http.post(f"{base}/v1/embeddings", json=embed), kind)
                elif kind == "stored":
                    ask = {"model": model, "input": "Say a word.", "max_output_tokens": 8}
                    first = await http.post(f"{base}/v1/responses", json=ask)
                    tally.saw(first, kind)
                    if first.status_code == 200:
                        more = ask | {"previous_response_id": first.json()["id"]}
                        tally.saw(await http.post(f"{base}/v1/responses", json=more), kind)
                elif kind == "chat":
                    tally.saw(await http.post(url, json=body))
                elif kind in ("stream", "drop"):
                    async with http.stream("POST", url, json=body | {"stream": True}) as resp:
                        events = 0
                        async for line in resp.aiter_lines():
                            events += line.startswith("data: ")
                            if kind == "drop" and events >= 3:
                                break
                        tally.outcomes["dropped" if kind == "drop" else str(resp.status_code)] += 1
                        if resp.status_code >= 500:
                            tally.saw(resp)
                elif kind == "bad":
                    tally.saw(await http.post(url, json={"model": model} | rng.choice(MALFORMED)))
                else:
                    with trio.move_on_after(rng.uniform(0.05, 1.0)) as scope:
                        tally.saw(await http.post(url, json=body))
                    if scope.cancelled_caught:
                        tally.outcomes["gave up"] += 1
        except trio.TooSlowError:
            tally.unanswered += 1
        except httpx.HTTPError as e:
            tally.outcomes[f"transport: {type(e).__name__}"] += 1


async def watch(http: httpx.AsyncClient, base: str, pid: int, tally: Tally, end: float) -> None:
    """Each second: the ledger against the budget, and the daemon's memory;
    every 20 s, kill a runner."""
    started, last_kill = trio.current_time(), trio.current_time()
    while trio.current_time() < end:
        await trio.sleep(1)
        pool = (await http.get(f"{base}/api/ps")).json()
        if pool["used"] > pool["budget"]:
            tally.overruns += 1
            tally.overrun_at.append(
                {"budget": pool["budget"], "used": pool["used"], "spare": pool["spare_bytes"]}
                | {m["model"]: [m["state"], m["bytes"], m["measured"]] for m in pool["models"]}
            )
        tally.rss_mb.append((round(trio.current_time() - started), _rss_mb(pid)))
        if trio.current_time() - last_kill >= 20:
            ready = [m["pid"] for m in pool["models"] if m["state"] == "ready" and m["pid"]]
            if ready:
                os.kill(random.choice(ready), signal.SIGKILL)
                tally.outcomes["runners killed"] += 1
            last_kill = trio.current_time()


async def damage(work: Path, tally: Tally, end: float) -> None:
    """Every 10 s, spoil something in the cache folder, as a crash, a full
    disk or a careless user would."""
    rng = random.Random()
    prefixes = work / "prefixes"
    while trio.current_time() < end:
        await trio.sleep(10)
        files = [f for f in prefixes.rglob("*.safetensors") if f.is_file()]  # not a FIFO
        folders = [f for f in prefixes.glob("*") if f.is_dir()]
        how = rng.choice(["truncate", "overwrite", "folder", "fifo", "ledger"])
        try:
            if how in ("truncate", "overwrite") and files:
                path = rng.choice(files)
                data = path.read_bytes()
                cut = data[: len(data) // 2] if how == "truncate" else data[:-512] + b"\xff" * 512
                path.write_bytes(cut)
            elif how in ("folder", "fifo") and folders:
                odd = rng.choice(folders) / f"{rng.getrandbits(64):032x}-odd.safetensors"
                odd.mkdir() if how == "folder" else os.mkfifo(odd)
            elif how == "ledger":
                prefixes.mkdir(exist_ok=True)
                (prefixes / "writes.json").write_text(rng.choice(["{", "[[1]]", "null"]))
            else:
                tally.outcomes[f"nothing to damage: {how}"] += 1
                continue
        except OSError as e:  # a runner removed it meanwhile
            tally.outcomes[f"not damaged: {how}: {type(e).__name__}"] += 1
            continue
        tally.outcomes[f"damaged: {how}"] += 1


def _rss_mb(pid: int) -> float:
    out = subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True)
    return round(int(out.stdout.strip() or 0) / 1024, 1)


def tiny_models(n: int, where: Path) -> list[Path]:
    bundled = trio.run(sources.resolve, BUNDLED, default_cache_dir())
    return [write("tiny", bundled, where / f"tiny{i}", None, i, "float32") for i in range(n)]


def start_daemon(args: argparse.Namespace, work: Path) -> tuple[subprocess.Popen[bytes], list[str]]:
    """``mlxd serve`` with the tiny models and the embedder, under a budget
    that holds the embedder and two of the tiny ones."""
    dirs = tiny_models(args.models, work)
    launcher = Launcher(Settings(cache_dir=work))
    each = trio.run(launcher.size, ModelConfig("x", str(dirs[0]))).bytes
    embedder = trio.run(launcher.size, ModelConfig(EMBED, BUNDLED_EMBED)).bytes
    budget = int(each * 2.5 + embedder)
    lines = [f"port = {args.port}", f'cache_dir = "{work}"', f"memory_budget = {budget}"]
    lines += ["persist_responses = true"]
    for d in dirs:
        lines += ["[[models]]", f'name = "{d.name}"', f'path = "{d}"', "keep_alive = 5"]
    lines += ["[[models]]", f'name = "{EMBED}"', f'path = "{BUNDLED_EMBED}"', "keep_alive = 5"]
    config = work / "soak.toml"
    config.write_text("\n".join(lines) + "\n")
    cmd = [sys.executable, "-m", "daemon.cli", "serve", "--config", str(config)]
    with (work / "mlxd.log").open("wb") as log:
        return subprocess.Popen(cmd, cwd=ROOT, stderr=log), [d.name for d in dirs]


async def soak(
    args: argparse.Namespace, daemon: subprocess.Popen[bytes], names: list[str]
) -> Tally:
    tally = Tally()
    base = f"http://127.0.0.1:{args.port}"
    url = f"{base}/v1/chat/completions"
    await trio.to_thread.run_sync(wait_ready, base, 300, names[0])
    work = Path(args.work)
    end = trio.current_time() + args.minutes * 60
    headers = {"Content-Type": "application/json"}
    async with httpx.AsyncClient(timeout=150, headers=headers) as http:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch, http, base, daemon.pid, tally, end)
            nursery.start_soon(damage, work, tally, end)
            for _ in range(args.clients):
                nursery.start_soon(client, http, base, names, tally, end)
        last = {"model": names[0], "messages": CHAT, "max_tokens": 2}
        tally.outcomes["served after"] += (await http.post(url, json=last)).status_code == 200
    return tally


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=5)
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        args.work = tmp
        daemon, names = start_daemon(args, Path(tmp))
        try:
            tally = trio.run(soak, args, daemon, names)
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=120)
    rss = [mb for _, mb in tally.rss_mb]
    result = {
        "outcomes": dict(tally.outcomes),
        "budget_overruns": tally.overruns,
        "overrun_ledgers": tally.overrun_at[:5],
        "unanswered": tally.unanswered,
        "server_errors": tally.server_errors[:20],
        "killed_runners_errors": dict(tally.crashes),
        "daemon_rss_mb": {"first": rss[:1], "max": max(rss, default=0), "last": rss[-1:]},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result | {"rss_mb": tally.rss_mb}, indent=2))
    bad = tally.overruns or tally.unanswered or tally.server_errors
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    main()
