"""Turns benchmark: an agent's conversation, turn by turn, through mlxd and mlx_lm.server.

    python -m bench.turns [--model DIR] [--system-tokens 10000] [--turns 4] [--repeat 3]

An agent talks to a model in turns: a long system prompt (tool definitions and
documentation), a tool result, a short reply, the next tool result, and so on.
Each turn's prompt is the previous one plus a few hundred tokens, so a server
that keeps the conversation's KV cache (a prefix cache) reads only the new
tokens, and one that does not reads all of it again. mlxd and ``mlx_lm.server``
(its prompt cache at its defaults) run side by side as child processes, both
started before anything is timed, and this measures:

1. Time to first token per turn. Each server holds its own copy of the same
   conversation (same system prompt and tool results, its own replies fed
   back); they take turns (mlxd turn k, then mlx_lm.server turn k, ...) so
   that the device's drift falls on both alike. Each of ``--repeat``
   repetitions starts from a new system prompt, so none finds another's cache
   beyond the chat template's first few tokens, and medians are taken.
   ``usage.prompt_tokens_details.cached_tokens`` is shown where a server
   reports it ("-" where not).
2. A swap, in mlxd only: the model is unloaded, a new conversation as long as
   the next turn is sent (cold: load plus the whole prefill), the model is
   unloaded again, and the original conversation's next turn is sent (load,
   plus whatever mlxd kept of the conversation, e.g. on disk).
3. The longest gap between the tokens of a running stream while another
   request's long prompt (``--long-tokens``, never seen before) is read, from
   the moment that request is sent until its first token, against the running
   stream's median gap before it; and the long request's time to first token
   (on a server that makes it wait for the running stream, that shows there).

Targets, on the GPU with the 8B shape (printed on any device, CPU included):

- mlxd's follow-up turns (median TTFT of turns 2..N) <= 0.15x its turn 1
- mlxd's follow-up turns no slower than mlx_lm.server's (ratio <= 1.0)
- after a swap out and back, the follow-up <= 0.3x the cold conversation

The gap has no target: it is printed in seconds and in multiples of the median
gap. Measured before the prefix cache: on the 8B shape (12.8k tokens, four
turns) mlxd 3.42 s then 1.71-1.73 s a turn, mlx_lm.server 2.89 s then 0.23-0.29 s;
a 7,000-token prompt froze a running stream for 0.84 s (H200, 1B shape).

How a token is seen: every request carries a ``logit_bias`` that forces one
ordinary word (" the"), so each generated token is a chunk with text on both
servers. ``mlx_lm.server`` puts no logprobs in streamed chunks and sends a
chunk only when a token's text is not empty, and a random-weight model
(``bench/random_model.py``) emits ids that spell nothing in mlxd and byte
fragments that mlx-lm's detokenizer holds back, so neither text nor logprobs
would mark every token on both. Forcing the token also makes every reply
exactly ``--reply-tokens`` long on both servers (mlx_lm.server has no
``ignore_eos``). The replies are one word repeated; what is measured, reading
the prompt, does not depend on them. mlxd's opening chunk (role, empty
content) carries no token and is not counted.

Without ``--model`` the bundled SmolLM2-135M-Instruct is used; its context
(8192) is shorter than the default conversation, so mlxd's ``max_context`` is
raised to what the run needs (mlx_lm.server has no limit). A GPU first gets a
warm-up (a two-turn conversation and a gap test on each server, not counted)
for its kernels to compile; a CPU has none to compile and skips it
(``--warm-up``/``--no-warm-up`` decide). On a 2-core CPU run small:
``--system-tokens 1500 --turn-tokens 200 --turns 3 --long-tokens 1500 --repeat 1``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

from api.texts import Texts
from bench.client import sse_events
from bench.peers import ROOT, start_mlx_lm, stop
from bench.swap import load_phases
from config.settings import BUNDLED, default_cache_dir
from runner import sources

MLXD_MODEL = "bench"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
FORCED = " the"  # the word every generated token is forced to be (see the docstring)
LONG_REPLY = 4  # tokens the gap test's long request asks for: only its first one matters

WORDS = """
cache request token stream model prompt server daemon runner queue batch worker config
schema field value index table column row record file path module function method class
object string number integer boolean array list map key timeout retry error status code
response header body client socket port host network buffer memory device kernel layer
weight tensor shape dtype scale group offset length window budget limit policy scheduler
lease ticket event channel nursery task thread process signal handler logger metric
histogram counter gauge label trace span deploy build test lint format check release
version commit branch merge patch diff review issue ticket user session agent tool call
result argument parameter return yield await async lock mutex barrier pool slot page block
prefix suffix trie hash digest checksum snapshot restore evict load unload swap resident
spare warm cold fresh stale valid invalid empty full ready busy idle running waiting done
""".split()


@attrs.frozen
class Server:
    """One server under test: where it listens, the ``model`` its requests
    name, and the fields every generation request to it carries."""

    label: str
    port: int
    model: str
    proc: subprocess.Popen[bytes] = attrs.field(eq=False)
    force: dict[str, float]
    timeout_s: float

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def body(self, fields: dict[str, Any]) -> dict[str, Any]:
        return fields | {
            "model": self.model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": 0,
            "logit_bias": self.force,
        }


@attrs.frozen
class Reply:
    """A streamed reply: when it was sent, when each token arrived, its text
    and the usage the server reported (``{}`` if none)."""

    sent: float
    stamps: tuple[float, ...]
    text: str
    usage: dict[str, Any]

    @property
    def ttft_s(self) -> float:
        return self.stamps[0] - self.sent

    @property
    def cached_tokens(self) -> int | None:
        details = self.usage.get("prompt_tokens_details") or {}
        cached = details.get("cached_tokens")
        return cached if isinstance(cached, int) else None

    def summary(self) -> dict[str, Any]:
        return {
            "ttft_s": self.ttft_s,
            "prompt_tokens": self.usage.get("prompt_tokens"),
            "cached_tokens": self.cached_tokens,
            "completion_tokens": self.usage.get("completion_tokens"),
            "token_chunks": len(self.stamps),
        }


def token_text(event: dict[str, Any]) -> str | None:
    """The text of a streamed chunk that carries a generated token, or None
    for one that does not (mlxd's opening chunk, a finish or usage chunk).
    Logprobs count too, should a request ask for them."""
    choices = event.get("choices") or []
    if not choices:
        return None
    choice, delta = choices[0], choices[0].get("delta") or {}
    text = choice.get("text") or delta.get("content") or delta.get("reasoning_content") or ""
    logprobs = choice.get("logprobs") or {}
    return text if text or logprobs.get("content") or logprobs.get("tokens") else None


async def stream(
    server: Server,
    path: str,
    fields: dict[str, Any],
    on_token: Callable[[float], None] | None = None,
) -> Reply:
    """Send one streaming request and time its tokens; ``on_token`` hears of
    each as it arrives."""
    stamps: list[float] = []
    pieces: list[str] = []
    usage: dict[str, Any] = {}
    body = server.body(fields)
    with trio.fail_after(server.timeout_s):
        sent = time.perf_counter()
        async for event in sse_events("127.0.0.1", server.port, path, body):
            now = time.perf_counter()
            if "error" in event:
                raise RuntimeError(f"{server.label}: {event['error']}")
            usage = event.get("usage") or usage
            piece = token_text(event)
            if piece is not None:
                stamps.append(now)
                pieces.append(piece)
                if on_token is not None:
                    on_token(now)
    if not stamps:
        raise RuntimeError(f"{server.label}: a reply without tokens ({usage})")
    return Reply(sent, tuple(stamps), "".join(pieces), usage)


class Filler:
    """Synthetic agent text of a given length in the model's tokens. Every
    piece starts with a fresh random tag, so no two share more than the chat
    template's first few tokens."""

    def __init__(self, texts: Texts, seed: int) -> None:
        self._texts = texts
        self._rng = random.Random(seed)

    def system(self, tokens: int) -> str:
        head = f"You are a coding agent, session {self._tag()}. Tools and their documentation:\n"
        return self._fill(head, lambda: self._choice(self._tool, self._doc), tokens)

    def tool_result(self, tokens: int) -> str:
        w = self._word
        head = f'Tool result ({self._tag()}): run_command("{w()} --{w()}") printed:\n'
        return self._fill(head, self._log_line, tokens)

    def document(self, tokens: int) -> str:
        return self._fill(f"Document {self._tag()}.\n", self._doc, tokens)

    def short(self) -> str:
        return f"({self._tag()}) Write a long story about a lighthouse keeper and a storm."

    def _fill(self, head: str, piece: Callable[[], str], tokens: int) -> str:
        parts, n = [head], len(self._texts.encode(head))
        while n < tokens:
            parts.append(piece())
            n += len(self._texts.encode(parts[-1]))
        ids = self._texts.encode("\n".join(parts))[:tokens]
        return str(self._texts.tokenizer.decode(ids))

    def _tag(self) -> str:
        return f"{self._rng.getrandbits(64):016x}"

    def _word(self) -> str:
        return self._rng.choice(WORDS)

    def _sentence(self, n: int) -> str:
        words = [self._word() for _ in range(n)]
        return " ".join(words).capitalize() + "."

    def _choice(self, *pieces: Callable[[], str]) -> str:
        return self._rng.choice(pieces)()

    def _tool(self) -> str:
        w, r = self._word, self._rng
        params = {
            f"{w()}_{w()}": {
                "type": r.choice(["string", "integer"]),
                "description": self._sentence(8),
            }
            for _ in range(r.randint(2, 4))
        }
        return json.dumps(
            {
                "name": f"{w()}_{w()}_{r.randint(1, 99)}",
                "description": self._sentence(r.randint(10, 20)),
                "parameters": {"type": "object", "properties": params},
            }
        )

    def _doc(self) -> str:
        return " ".join(self._sentence(self._rng.randint(8, 16)) for _ in range(4))

    def _log_line(self) -> str:
        r, w = self._rng, self._word
        stamp = f"12:{r.randint(0, 59):02d}:{r.randint(0, 59):02d}.{r.randint(0, 999):03d}"
        level = r.choice(["INFO", "INFO", "DEBUG", "WARN"])
        said = self._sentence(r.randint(5, 12))
        return f"{stamp} {level} {w()}.{w()}: {said} ({r.randint(1, 999)} ms)"


def chat(system: str, results: list[str], replies: list[str]) -> list[dict[str, str]]:
    """The conversation so far: the system prompt, then each tool result and
    the reply to it; the last result is not answered yet."""
    messages = [{"role": "system", "content": system}]
    for i, result in enumerate(results):
        messages.append({"role": "user", "content": result})
        if i < len(results) - 1:
            messages.append({"role": "assistant", "content": replies[i]})
    return messages


async def converse(
    servers: list[Server], system: str, results: list[str], turns: int, reply_tokens: int
) -> tuple[dict[str, list[Reply]], dict[str, list[str]]]:
    """``turns`` turns of one conversation on every server, interleaved;
    each server's replies, and the texts it replied."""
    replies: dict[str, list[Reply]] = {s.label: [] for s in servers}
    said: dict[str, list[str]] = {s.label: [] for s in servers}
    for k in range(turns):
        for s in servers:
            messages = chat(system, results[: k + 1], said[s.label])
            reply = await stream(s, CHAT, {"messages": messages, "max_tokens": reply_tokens})
            replies[s.label].append(reply)
            said[s.label].append(reply.text)
    return replies, said


async def pool_until(server: Server, done: Callable[[dict[str, Any]], bool], what: str) -> None:
    """Poll mlxd's ``/api/ps`` until ``done`` says so."""
    async with httpx.AsyncClient(timeout=30) as http:
        with trio.move_on_after(server.timeout_s):
            while True:
                if done((await http.get(server.url("/api/ps"))).json()):
                    return
                await trio.sleep(0.1)
    raise TimeoutError(f"{server.label}: {what} not within {server.timeout_s:g} s")


def spare_ready(pool: dict[str, Any]) -> bool:
    return bool(pool["spare"]["state"] == "ready")


async def unload(server: Server) -> None:
    """Unload the model and wait until it is gone and the spare runner is
    ready (as it is when swaps are further apart than its start-up)."""
    async with httpx.AsyncClient(timeout=30) as http:
        (
            await http.post(server.url("/api/unload"), json={"model": server.model})
        ).raise_for_status()

    def gone(pool: dict[str, Any]) -> bool:
        mine = [m for m in pool["models"] if m["model"] == server.model]
        return all(m["state"] == "absent" for m in mine) and spare_ready(pool)

    await pool_until(server, gone, "the unload")


async def swap(
    mlxd: Server,
    filler: Filler,
    system: str,
    results: list[str],
    said: list[str],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Cold: a new conversation as long as the next turn, after an unload.
    Then the next turn of the measured conversation, after another unload."""
    k = len(said)
    messages = chat(system, results[: k + 1], said)
    cold_messages = [{"role": "system", "content": filler.system(args.system_tokens)}]
    cold_messages += messages[1:]
    body = {"max_tokens": args.reply_tokens}
    await unload(mlxd)
    cold = await stream(mlxd, CHAT, body | {"messages": cold_messages})
    await unload(mlxd)
    follow = await stream(mlxd, CHAT, body | {"messages": messages})
    await pool_until(mlxd, spare_ready, "the spare runner")  # its start-up, off the clock
    return {"cold": cold.summary(), "followup": follow.summary()}


class Watch:
    """A running stream's token arrivals, with a wake-up for each."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self.ended = False
        self._changed = trio.Event()

    def add(self, stamp: float) -> None:
        self.stamps.append(stamp)
        self._wake()

    def end(self) -> None:
        self.ended = True
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def until(self, done: Callable[[], bool]) -> None:
        while not done():
            await self._changed.wait()


async def gap(server: Server, filler: Filler, args: argparse.Namespace) -> dict[str, Any]:
    """A running stream, then, after its ``--lead-tokens`` tokens, a request
    with a long new prompt; the running stream is cut a few tokens after the
    long request's first token."""
    watch = Watch()
    running = {"prompt": filler.short(), "max_tokens": args.stream_tokens}
    long_prompt = {"prompt": filler.document(args.long_tokens), "max_tokens": LONG_REPLY}

    async def run() -> None:
        try:
            await stream(server, COMPLETIONS, running, watch.add)
        finally:
            watch.end()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        with trio.fail_after(server.timeout_s):
            await watch.until(lambda: watch.ended or len(watch.stamps) >= args.lead_tokens)
        if len(watch.stamps) < args.lead_tokens:
            raise RuntimeError(f"{server.label}: the running stream ended early")
        long = await stream(server, COMPLETIONS, long_prompt)
        first = long.stamps[0]
        with trio.move_on_after(server.timeout_s):  # a few tokens show the gap closed
            await watch.until(lambda: watch.ended or sum(t > first for t in watch.stamps) >= 3)
        cut = time.perf_counter()
        nursery.cancel_scope.cancel()
    await trio.sleep(1.0)  # mlx_lm.server drops the cut stream only at its next write
    return gap_metrics(watch.stamps, long, cut) | {
        "waited_for_running": watch.ended and watch.stamps[-1] < first,
        "long_prompt_tokens": long.usage.get("prompt_tokens"),
    }


def gap_metrics(stamps: list[float], long: Reply, cut: float) -> dict[str, Any]:
    """The running stream's median gap before the long request was sent, and
    its longest gap that overlaps [sent, the long request's first token];
    if no token came after that first token, the gap still open at the cut
    counts."""
    sent, first = long.sent, long.stamps[0]
    pairs = list(itertools.pairwise(stamps))
    before = [b - a for a, b in pairs if b <= sent]
    during = [b - a for a, b in pairs if b > sent and a < first]
    if stamps[-1] < first:
        during.append(cut - stamps[-1])
    return {
        "median_gap_s": statistics.median(before),
        "longest_gap_s": max(during, default=math.nan),
        "tokens_during": sum(sent < t <= first for t in stamps),
        "long_ttft_s": long.ttft_s,
    }


async def repetition(
    servers: list[Server], filler: Filler, args: argparse.Namespace, measured: bool = True
) -> dict[str, Any]:
    """One conversation on every server, then (if ``measured``) the swap on
    mlxd, then the gap test on every server."""
    turns = args.turns if measured else 2
    system = filler.system(args.system_tokens)
    results = [filler.tool_result(args.turn_tokens) for _ in range(turns + 1)]
    replies, said = await converse(servers, system, results, turns, args.reply_tokens)
    out: dict[str, Any] = {
        "turns": {label: [r.summary() for r in rs] for label, rs in replies.items()}
    }
    mlxd = servers[0]
    if measured:
        out["swap"] = await swap(mlxd, filler, system, results, said[mlxd.label], args)
    out["gap"] = {s.label: await gap(s, filler, args) for s in servers}
    return out


async def answering(server: Server) -> None:
    """Wait until ``server`` answers a one-token completion."""
    body = {"model": server.model, "prompt": "hi", "max_tokens": 1}
    async with httpx.AsyncClient(timeout=server.timeout_s) as http:
        with trio.move_on_after(server.timeout_s):
            while True:
                if server.proc.poll() is not None:
                    raise RuntimeError(f"{server.label} exited ({server.proc.returncode})")
                try:
                    if (await http.post(server.url(COMPLETIONS), json=body)).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await trio.sleep(0.2)
    raise TimeoutError(f"{server.label} did not answer within {server.timeout_s:g} s")


async def measure(
    servers: list[Server], filler: Filler, args: argparse.Namespace
) -> list[dict[str, Any]]:
    async with trio.open_nursery() as nursery:
        for s in servers:
            nursery.start_soon(answering, s)
    await pool_until(servers[0], spare_ready, "the spare runner")
    if args.warm_up:
        # Not counted: a two-turn conversation and a gap test on each server,
        # so that a GPU has compiled its kernels for these shapes.
        await repetition(servers, filler, args, measured=False)
    return [await repetition(servers, filler, args) for _ in range(args.repeat)]


def median_of(values: list[Any]) -> float | None:
    """The median of the numbers among ``values``; None if there are none."""
    numbers = [v for v in values if isinstance(v, (int, float))]
    return statistics.median(numbers) if numbers else None


GAP_ROWS = {  # key: (row name, format)
    "median_gap_s": ("median gap before, s", "14.3f"),
    "longest_gap_s": ("longest gap, s", "14.3f"),
    "tokens_during": ("running tokens meanwhile", "14.0f"),
    "long_ttft_s": ("long request TTFT, s", "14.3f"),
}


def summarize(runs: list[dict[str, Any]], labels: list[str]) -> dict[str, Any]:
    """Medians over the repetitions: per turn and server, the swap, the gaps."""

    def turn(label: str, k: int) -> dict[str, Any]:
        got = [run["turns"][label][k] for run in runs]
        return {
            "ttft_s": statistics.median(g["ttft_s"] for g in got),
            "prompt_tokens": median_of([g["prompt_tokens"] for g in got]),
            "cached_tokens": median_of([g["cached_tokens"] for g in got]),
        }

    turns = {
        label: [turn(label, k) for k in range(len(runs[0]["turns"][label]))] for label in labels
    }
    followup = {label: statistics.median(t["ttft_s"] for t in turns[label][1:]) for label in labels}
    swap = {
        part: {key: median_of([run["swap"][part][key] for run in runs]) for key in keys}
        for part, keys in (
            ("cold", ("ttft_s", "prompt_tokens")),
            ("followup", ("ttft_s", "prompt_tokens", "cached_tokens")),
        )
    }
    gap = {
        label: {key: median_of([run["gap"][label][key] for run in runs]) for key in GAP_ROWS}
        | {"waited_for_running": any(run["gap"][label]["waited_for_running"] for run in runs)}
        for label in labels
    }
    return {"turns": turns, "followup_ttft_s": followup, "swap": swap, "gap": gap}


def cell(value: float | None, fmt: str) -> str:
    return "-" if value is None or math.isnan(value) else format(value, fmt)


def report(
    summary: dict[str, Any], labels: list[str], args: argparse.Namespace, device: str
) -> dict[str, float]:
    """Print the tables and the target ratios; returns the ratios."""
    mlxd, other = labels
    turns, followup, swap, gaps = (summary[k] for k in ("turns", "followup_ttft_s", "swap", "gap"))
    print(
        f"device: {device}   system {args.system_tokens} tokens, {args.turns} turns of "
        f"{args.turn_tokens} (replies {args.reply_tokens}), medians of {args.repeat} run(s)"
    )
    columns = "".join(f"{x:>14}{'cached':>8}" for x in labels)
    print(f"{'time to first token, s':28}{columns}{f'{mlxd}/{other[:6]}':>14}")
    for k in range(args.turns):
        name = f"turn {k + 1} ({cell(turns[mlxd][k]['prompt_tokens'], '.0f')} tokens)"
        cells = "".join(
            f"{cell(turns[x][k]['ttft_s'], '14.3f')}{cell(turns[x][k]['cached_tokens'], '>8.0f')}"
            for x in labels
        )
        ratio = turns[mlxd][k]["ttft_s"] / turns[other][k]["ttft_s"]
        print(f"{name:28}{cells}{ratio:14.3f}")
    print(
        f"{'follow-up turns (median)':28}"
        + "".join(f"{followup[x]:14.3f}{'':8}" for x in labels)
        + f"{followup[mlxd] / followup[other]:14.3f}"
    )
    print(
        f"{'follow-up / turn 1':28}"
        + "".join(f"{followup[x] / turns[x][0]['ttft_s']:14.3f}{'':8}" for x in labels)
    )
    cold, follow = swap["cold"], swap["followup"]
    print(
        f"swap out and back ({mlxd}): cold {cell(cold['ttft_s'], '.3f')} s "
        f"({cell(cold['prompt_tokens'], '.0f')} tokens), follow-up "
        f"{cell(follow['ttft_s'], '.3f')} s (cached {cell(follow['cached_tokens'], '.0f')})"
    )
    print(f"running stream while a {args.long_tokens}-token prompt is read:")
    print(f"{'':28}" + "".join(f"{x:>14}" for x in labels))
    for key, (name, fmt) in GAP_ROWS.items():
        print(f"{name:28}" + "".join(cell(gaps[x][key], fmt) for x in labels))
    print(
        f"{'longest / median gap':28}"
        + "".join(
            cell(ratio_of(gaps[x]["longest_gap_s"], gaps[x]["median_gap_s"]), "14.1f")
            for x in labels
        )
    )
    for x in labels:
        if gaps[x]["waited_for_running"]:
            print(f"  {x}: the long request waited until the running stream had finished")
    ratios = {
        "followup_vs_turn1": followup[mlxd] / turns[mlxd][0]["ttft_s"],
        "followup_vs_mlx_lm": followup[mlxd] / followup[other],
        "swap_followup_vs_cold": ratio_of(follow["ttft_s"], cold["ttft_s"]),
    }
    for key, bound in (
        ("followup_vs_turn1", 0.15),
        ("followup_vs_mlx_lm", 1.0),
        ("swap_followup_vs_cold", 0.3),
    ):
        value = ratios[key]
        verdict = "ok" if value <= bound else "MISSED"
        print(f"ratio {key:22} {value:6.3f}  (target <= {bound})  {verdict}")
    return ratios


def ratio_of(a: float | None, b: float | None) -> float:
    return a / b if a is not None and b else math.nan


def start_mlxd(
    model_dir: Path, port: int, workdir: Path, max_context: int | None
) -> subprocess.Popen[bytes]:
    """mlxd with the model kept resident (``keep_alive = "forever"``), its
    cache and log in ``workdir``."""
    config = workdir / "turns.toml"
    context = f"max_context = {max_context}\n" if max_context else ""
    config.write_text(
        f'port = {port}\ncache_dir = "{workdir}"\n[[models]]\nname = "{MLXD_MODEL}"\n'
        f'path = "{model_dir}"\nkeep_alive = "forever"\n{context}'
    )
    cmd = [sys.executable, "-m", "daemon.cli", "serve", "--config", str(config)]
    with (workdir / "mlxd.log").open("wb") as log:
        return subprocess.Popen([*cmd, "--log-level", "info"], cwd=ROOT, stderr=log)


def forced_token(texts: Texts) -> int:
    (token,) = texts.encode(FORCED)  # one token in the vocabularies these models use
    return token


def context_needed(args: argparse.Namespace) -> int:
    """The longest prompt plus reply the run sends, with room for the chat
    template (a generous 64 tokens a message)."""
    turn = args.turn_tokens + args.reply_tokens + 2 * 64
    conversation = args.system_tokens + 64 + (args.turns + 1) * turn
    return max(conversation, args.long_tokens + 64 + LONG_REPLY, 64 + args.stream_tokens)


def device_name() -> str:
    code = "import mlx.core as mx; print(mx.default_device())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="MLX model directory (default: bundled SmolLM2)")
    parser.add_argument("--system-tokens", type=int, default=10000)
    parser.add_argument("--turns", type=int, default=4, help="turns timed (at least 2)")
    parser.add_argument("--turn-tokens", type=int, default=700, help="each tool result")
    parser.add_argument("--reply-tokens", type=int, default=32)
    parser.add_argument("--long-tokens", type=int, default=7000, help="the gap test's prompt")
    parser.add_argument(
        "--stream-tokens", type=int, default=2000, help="the running stream's max_tokens"
    )
    parser.add_argument(
        "--lead-tokens", type=int, default=20, help="running tokens before the long request"
    )
    parser.add_argument("--repeat", type=int, default=3, help="conversations (medians)")
    parser.add_argument(
        "--warm-up",
        action=argparse.BooleanOptionalAction,
        help="a conversation and a gap test first, not counted (default: unless on the CPU)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=8767, help="mlxd; mlx_lm.server on +1")
    parser.add_argument("--timeout", type=float, default=900, help="seconds any one wait may take")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--logs", help="keep both servers' logs in this directory")
    args = parser.parse_args()
    if args.turns < 2 or args.repeat < 1 or args.lead_tokens < 3:
        parser.error("--turns must be >= 2, --repeat >= 1 and --lead-tokens >= 3")

    model_dir = (
        Path(args.model) if args.model else trio.run(sources.resolve, BUNDLED, default_cache_dir())
    )
    texts = Texts(model_dir, None)
    force = {str(forced_token(texts)): 100.0}
    needed = context_needed(args)
    max_context = None
    if texts.max_context < needed:
        max_context = -(-needed // 1024) * 1024
        print(f"mlxd max_context: {max_context} (the model's own is {texts.max_context})")
    device = device_name()
    if args.warm_up is None:
        args.warm_up = "cpu" not in device  # a CPU has no kernels to compile
    filler = Filler(texts, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        procs = [
            start_mlxd(model_dir, args.port, workdir, max_context),
            start_mlx_lm(model_dir, args.port + 1, workdir),
        ]
        servers = [
            Server("mlxd", args.port, MLXD_MODEL, procs[0], force, args.timeout),
            # mlx_lm.server serves its --model under this name; any other is a path to load
            Server("mlx_lm.server", args.port + 1, "default_model", procs[1], force, args.timeout),
        ]
        try:
            runs = trio.run(measure, servers, filler, args)
        finally:
            for proc in procs:
                stop(proc)
            if args.logs:
                Path(args.logs).mkdir(parents=True, exist_ok=True)
                for name in ("mlxd.log", "mlx_lm.log"):
                    shutil.copy(workdir / name, Path(args.logs) / name)
        phases = load_phases(workdir / "mlxd.log")
    labels = [s.label for s in servers]
    summary = summarize(runs, labels)
    ratios = report(summary, labels, args, device)
    if "bench" in phases:
        print("mlxd loads: " + ", ".join(f"{k} {v:.3f}" for k, v in phases["bench"].items()))
    if args.json:
        result = summary | {"ratios": ratios, "load_phases_s": phases, "runs": runs}
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    main()
