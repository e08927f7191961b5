"""Images benchmark: mlxd beside ``mlx_vlm.server``, the same vision-language
model in each, in one run.

    python -m bench.vision --model DIR [--image 1280x720] [--tokens 64]
        [--streams 8] [--repeat 3] [--json FILE]

For each server, interleaved and repeated (``--repeat``; medians):

- ``first turn``: time to first token for a chat request with one image the
  server has never seen (a screenshot-sized picture of noise, new each run,
  so that no cache of either server holds it);
- ``next turn``: the same conversation's next request (the image, the
  answer, a new question), which either server may answer from its caches;
- ``1 stream`` and ``N streams``: tokens a second over all streams, each
  request with an image of its own (``--streams`` at once); and N streams of
  text alone (a vision model's text requests, which should be no slower).

Prints a table and the targets of issue 28: first turn within 1.1x of
``mlx_vlm.server``'s, next turn at most 0.2x of mlxd's first. Both servers
keep their caches (mlxd's prefix cache and image features, mlx-vlm's prompt
and vision caches): the next turn is what they are for. A random model's
answers are gibberish, but they are as long as ``--tokens`` asks (mlxd
ignores end-of-text; mlx-vlm's server has no such switch, so its tokens
a second count what it made). Use a model from ``python -m
bench.random_model qwen2.5-vl-3b TOKENIZER_DIR OUT --dtype bfloat16`` on the GPU.
"""

from __future__ import annotations

import argparse
import base64
import io
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import trio

from bench import client
from bench.peers import start_mlx_vlm, stop
from bench.serving import mlxd_log, progress, start_mlxd, wait_ready

ASK = "What does this screenshot show? Describe it in detail."
_seeds = itertools.count(1)


def picture(width: int, height: int) -> str:
    """A new PNG of noise, as a data: URI."""
    from PIL import Image

    pixels = np.random.default_rng(next(_seeds)).random((height, width, 3)) * 255
    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def user(url: str, text: str = ASK) -> dict[str, Any]:
    return {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": text},
        ],
    }


class Server:
    def __init__(self, name: str, port: int, model: str, extra: dict[str, Any]) -> None:
        self.name, self.port, self.model, self.extra = name, port, model, extra

    async def chat(self, messages: list[dict[str, Any]], tokens: int) -> dict[str, Any]:
        """One streamed chat: its time to first token, its end, its tokens
        and its text."""
        body = {
            "model": self.model,
            "messages": messages,
            "max_tokens": tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
            **self.extra,
        }
        t0, first, usage, text = time.perf_counter(), None, None, []
        async for event in client.sse_events("127.0.0.1", self.port, "/v1/chat/completions", body):
            usage = event.get("usage") or usage
            choices = event.get("choices") or []
            if choices and (choices[0].get("delta") or {}).get("content"):
                first = first or time.perf_counter()
                text.append(choices[0]["delta"]["content"])
        end = time.perf_counter()
        made = (usage or {}).get("completion_tokens", len(text))
        return {
            "ttft": (first or end) - t0,
            "end": end,
            "tokens": made,
            "text": "".join(text),
        }


async def turns(server: Server, size: tuple[int, int], tokens: int) -> dict[str, float]:
    url = picture(*size)
    first = await server.chat([user(url)], tokens)
    follow = [user(url), {"role": "assistant", "content": first["text"]}]
    follow.append({"role": "user", "content": "And which colours stand out?"})
    nxt = await server.chat(follow, tokens)
    return {"first_turn_s": first["ttft"], "next_turn_s": nxt["ttft"]}


async def streams(server: Server, size: tuple[int, int] | None, tokens: int, n: int) -> float:
    """Tokens a second over ``n`` streams at once, each with a new image
    (``size``), or text alone (each its own, so that no cache helps)."""
    asks = [
        user(picture(*size)) if size else {"role": "user", "content": f"{i}: {ASK}"}
        for i in range(n)
    ]
    runs: list[dict[str, Any]] = []
    t0 = time.perf_counter()

    async def one(message: dict[str, Any]) -> None:
        runs.append(await server.chat([message], tokens))

    async with trio.open_nursery() as nursery:
        for message in asks:
            nursery.start_soon(one, message)
    return sum(r["tokens"] for r in runs) / (max(r["end"] for r in runs) - t0)


async def measure(servers: list[Server], args: argparse.Namespace) -> dict[str, Any]:
    size = (args.width, args.height)
    for s in servers:  # new shapes compile kernels at first use: once each, untimed
        progress(f"{s.name}: warming up")
        await turns(s, size, args.tokens)
        await streams(s, size, args.tokens, 1)
        await streams(s, size, args.tokens, args.streams)
        await streams(s, None, args.tokens, args.streams)
    runs: dict[str, list[dict[str, float]]] = {s.name: [] for s in servers}
    for i in range(args.repeat):
        for s in servers:
            run = await turns(s, size, args.tokens)
            run["one_stream_tok_s"] = await streams(s, size, args.tokens, 1)
            run["streams_tok_s"] = await streams(s, size, args.tokens, args.streams)
            run["text_streams_tok_s"] = await streams(s, None, args.tokens, args.streams)
            runs[s.name].append(run)
            progress(f"{s.name}, round {i + 1}: {run}")
    return {
        name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} | {"runs": rs}
        for name, rs in runs.items()
    }


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    keys = [
        ("first_turn_s", "first turn: time to first token (s)"),
        ("next_turn_s", "next turn, same image: time to first token (s)"),
        ("one_stream_tok_s", "1 stream: tok/s"),
        ("streams_tok_s", f"{args.streams} streams: tok/s"),
        ("text_streams_tok_s", f"{args.streams} streams of text alone: tok/s"),
    ]
    names = list(results)
    lines = [
        f"image {args.width}x{args.height}, {args.tokens} tokens an answer, "
        f"medians of {args.repeat}",
        "| | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    for key, label in keys:
        lines.append(f"| {label} | " + " | ".join(f"{results[n][key]:.3f}" for n in names) + " |")
    if "mlxd" in results and "mlx_vlm.server" in results:
        m, v = results["mlxd"], results["mlx_vlm.server"]
        lines += [
            f"first turn against mlx_vlm.server: {m['first_turn_s'] / v['first_turn_s']:.2f}x "
            "(target <= 1.1)",
            f"next turn against mlxd's first: {m['next_turn_s'] / m['first_turn_s']:.2f}x "
            f"(target <= 0.2; mlx_vlm.server's own: {v['next_turn_s'] / v['first_turn_s']:.2f}x)",
            f"{args.streams} streams against mlx_vlm.server: "
            f"{m['streams_tok_s'] / v['streams_tok_s']:.2f}x "
            f"(text alone: {m['text_streams_tok_s'] / v['text_streams_tok_s']:.2f}x)",
        ]
    return "\n".join(lines)


async def run_all(args: argparse.Namespace) -> dict[str, Any]:
    model_dir = args.model.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        mlxd = start_mlxd(model_dir, args.streams, args.port, work, prefix_cache=True)
        vlm = start_mlx_vlm(model_dir, args.port + 1, work)
        try:
            chat = "/v1/chat/completions"
            url = f"http://127.0.0.1:{args.port}"
            log_path = mlxd_log(work, args.port)
            await trio.to_thread.run_sync(wait_ready, url, 600, "bench", log_path, chat)
            url = f"http://127.0.0.1:{args.port + 1}"
            await trio.to_thread.run_sync(
                wait_ready, url, 600, str(model_dir), work / "mlx_vlm.log", chat
            )
            servers = [
                Server("mlxd", args.port, "bench", {"ignore_eos": True}),
                Server("mlx_vlm.server", args.port + 1, str(model_dir), {}),
            ]
            return await measure(servers, args)
        finally:
            for proc in (mlxd, vlm):
                stop(proc)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True, help="a vision-language model")
    parser.add_argument("--image", default="1280x720", help="WIDTHxHEIGHT of each picture")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--port", type=int, default=8941)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.width, args.height = (int(n) for n in args.image.lower().split("x"))
    results = trio.run(run_all, args)
    print(report(results, args))
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {"args": vars(args) | {"model": str(args.model)}, **results}, default=str, indent=2
            )
        )


if __name__ == "__main__":
    main()
