"""Requests the agent CLIs really sent (recorded from their current releases,
tests/agents/recorded/), replayed against the real tiny model: each CLI's
follow-up turn reads the earlier turn's prompt from the prefix cache.

Each recording is one task ("Write hello into note.txt") done through a tool
(Aider: an edit): the CLI's prompt, the model's call, the tool's result. The
turns are replayed as they were sent, but for the answer's length (a few
tokens, to keep a CPU's time short) and streaming (off, to read the usage
from one object): neither is part of the prompt."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.anthropic import messages as anthropic
from api.openai import responses
from api.schemas import ChatRequest
from api.texts import Texts
from config.settings import ModelConfig
from tests.conftest import TLS, Daemon, serving, settings_for
from tests.scripted import agent_model

RECORDED = Path(__file__).parent / "agents" / "recorded"
LIMITS = {"/v1/messages": "max_tokens", "/v1/responses": "max_output_tokens"}


@pytest.fixture(scope="module")
def daemon(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    work = tmp_path_factory.mktemp("replay")
    agent = agent_model(tiny_dir, work / "agent")  # the tiny model, with a template for tools
    with serving(settings_for(work, ModelConfig("agent", str(agent), max_context=32768))) as d:
        yield d


def usage(path: str, answer: dict[str, Any]) -> tuple[int, int]:
    """Prompt tokens and how many of them were read from the cache."""
    u = answer["usage"]
    if path.startswith("/v1/messages"):
        cached = u["cache_read_input_tokens"]
        return u["input_tokens"] + cached + u["cache_creation_input_tokens"], cached
    if path.startswith("/v1/responses"):
        return u["input_tokens"], u["input_tokens_details"]["cached_tokens"]
    return u["prompt_tokens"], u["prompt_tokens_details"]["cached_tokens"]


async def replay(
    http: httpx.AsyncClient, daemon: Daemon, request: dict[str, Any]
) -> tuple[int, int]:
    path, body = request["path"], dict(request["body"])
    body[LIMITS.get(path.split("?")[0], "max_tokens")] = 4
    body["stream"] = False
    body.pop("stream_options", None)
    resp = await http.post(f"{daemon.url}{path}", json=body, headers=request["headers"])
    assert resp.status_code == 200, resp.text
    return usage(path, resp.json())


def prompt(texts: Texts, request: dict[str, Any]) -> list[int]:
    """The prompt mlxd makes of a recorded request, as its route does."""
    path = request["path"].split("?")[0]
    if path == "/v1/messages":
        req = anthropic.chat_request(request["body"])
    elif path == "/v1/responses":
        req, _ = responses.chat_request(request["body"])
    else:
        req = ChatRequest.from_openai(request["body"])
    return texts.chat_prompt(list(req.messages), req.tools, req.thinking, req.effort)


def shared(a: list[int], b: list[int]) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


# The CLIs whose next turn repeats the last one's prompt and adds to it; Aider
# does not: it writes the files in the chat after the history, so their newer
# contents come before the new message, and only what precedes them is shared.
APPENDING = {"claude", "codex", "opencode"}


@pytest.mark.parametrize("cli", ["claude", "codex", "opencode", "aider"])
async def test_a_follow_up_turn_reuses_the_turn_before_it(daemon: Daemon, cli: str) -> None:
    recorded = json.loads((RECORDED / f"{cli}.json").read_text())
    first, follow = recorded["requests"][-2:]  # the tool loop's two turns
    async with httpx.AsyncClient(timeout=300, verify=TLS) as http:
        before, _ = await replay(http, daemon, first)
        after, cached = await replay(http, daemon, follow)
    (source,) = [m.source for m in daemon.settings.models]
    texts = Texts(Path(source), None)
    common = shared(prompt(texts, first), prompt(texts, follow))
    print(f"{recorded['client']}: turn 1 {before} tokens; turn 2 {after}, {cached} cached")
    assert after > before
    assert cached >= common - 1  # all the turns share (the last token is read again)
    if cli in APPENDING:
        assert cached >= 0.95 * before, f"{recorded['client']}: {cached} of {before} reused"
