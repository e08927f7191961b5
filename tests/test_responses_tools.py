"""What Codex sends to /v1/responses, through the official client: namespace
and custom tools, hosted tools left out, reasoning kept by the client
(encrypted_content), and what Codex sends besides."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from config.settings import ModelConfig
from tests.conftest import TLS, Daemon, serving, settings_for
from tests.scripted import RECALLING, scripted_model

THOUGHT = "The user wants the agent closed."


def call(name: str, arguments: dict[str, Any]) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


def dict_without_none(d: dict[str, Any]) -> Any:
    return {k: v for k, v in d.items() if v is not None}


CLOSE = call("multi_agent_v1.close_agent", {"target": "a1"})
EXEC = call("exec", {"input": 'text("hi")\n'})
NAMESPACE: Any = {
    "type": "namespace",
    "name": "multi_agent_v1",
    "description": "Sub-agents.",
    "tools": [
        {
            "type": "function",
            "name": "close_agent",
            "parameters": {"type": "object", "properties": {"target": {"type": "string"}}},
        }
    ],
}
CUSTOM: Any = {
    "type": "custom",
    "name": "exec",
    "description": "Run JavaScript.",
    "format": {"type": "grammar", "syntax": "lark", "definition": "start: /[\\s\\S]+/"},
}
ASK: Any = [{"role": "user", "content": "Close agent a1."}]


@pytest.fixture(scope="module")
def daemon(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    work = tmp_path_factory.mktemp("codex")
    models = {
        "closer": scripted_model(tiny_dir, work / "closer", f"<think>{THOUGHT}</think>{CLOSE}"),
        "coder": scripted_model(tiny_dir, work / "coder", EXEC),
        "recaller": scripted_model(
            tiny_dir, work / "recaller", f"<think>{THOUGHT}</think>{CLOSE}", template=RECALLING
        ),
    }
    with serving(settings_for(work, *(ModelConfig(n, str(p)) for n, p in models.items()))) as d:
        yield d


async def test_a_namespaced_function_is_called_and_read_back_under_its_group(
    daemon: Daemon,
) -> None:
    async with daemon.client() as client:
        reply = await client.responses.create(
            model="closer", input=ASK, tools=[NAMESPACE, {"type": "web_search"}]
        )
        (fn,) = [item for item in reply.output if item.type == "function_call"]
        assert (fn.name, fn.namespace) == ("close_agent", "multi_agent_v1")
        assert json.loads(fn.arguments) == {"target": "a1"}

        streamed = await client.responses.create(
            model="closer", input=ASK, tools=[NAMESPACE], stream=True
        )
        done = [e.item async for e in streamed if e.type == "response.output_item.done"]
        assert [(i.type, getattr(i, "namespace", None)) for i in done][-1] == (
            "function_call",
            "multi_agent_v1",
        )

        # Sent back with its namespace, the call is written into the prompt
        # under the name it was offered by: the same prompt as the joined name.
        result: Any = {"type": "function_call_output", "call_id": fn.call_id, "output": "closed"}
        item: Any = {
            k: getattr(fn, k) for k in ("type", "call_id", "name", "namespace", "arguments")
        }
        joined = item | {"name": "multi_agent_v1.close_agent", "namespace": None}
        counts = [
            await client.responses.input_tokens.count(
                model="closer", input=[*ASK, sent, result], tools=[NAMESPACE]
            )
            for sent in (item, dict_without_none(joined))
        ]
        assert counts[0].input_tokens == counts[1].input_tokens


async def test_a_custom_tool_is_called_with_free_text(daemon: Daemon) -> None:
    async with daemon.client() as client:
        reply = await client.responses.create(model="coder", input=ASK, tools=[CUSTOM])
        (use,) = reply.output
        assert use.type == "custom_tool_call"
        assert (use.name, use.input) == ("exec", 'text("hi")\n')
        follow: list[Any] = [
            *ASK,
            {"type": "custom_tool_call", "call_id": use.call_id, "name": "exec", "input": "x"},
            {"type": "custom_tool_call_output", "call_id": use.call_id, "output": "hi"},
        ]
        again = await client.responses.create(model="coder", input=follow, tools=[CUSTOM])
        assert again.status == "completed"

        stream = await client.responses.create(
            model="coder", input=ASK, tools=[CUSTOM], stream=True
        )
        kinds = [e.type async for e in stream]
        assert "response.custom_tool_call_input.done" in kinds

        bad = CUSTOM | {"format": {"type": "grammar", "syntax": "lark", "definition": "%import x"}}
        with pytest.raises(openai.BadRequestError, match="exec"):
            await client.responses.create(model="coder", input=ASK, tools=[bad])


async def test_reasoning_kept_by_the_client_comes_back_sealed_or_not_at_all(
    daemon: Daemon,
) -> None:
    """Codex's ``store: false`` turns: the reasoning goes out sealed and comes
    back into the prompt where the template writes it; a forged blob is ignored."""
    codex: Any = {
        "store": False,
        "include": ["reasoning.encrypted_content"],
        "reasoning": {"summary": "auto"},
        "prompt_cache_key": "k",
        "safety_identifier": "u",
        "service_tier": "auto",
        "truncation": "auto",
        "text": {"verbosity": "low"},
        "parallel_tool_calls": True,
        "extra_body": {"client_metadata": {"session_id": "s"}},  # newer than this SDK
    }
    async with daemon.client() as client:
        reply = await client.responses.create(
            model="recaller", input=ASK, tools=[NAMESPACE], **codex
        )
        reasoning, fn = reply.output
        assert reasoning.type == "reasoning" and reasoning.encrypted_content
        assert THOUGHT not in reasoning.encrypted_content
        assert fn.type == "function_call"
        result: Any = {"type": "function_call_output", "call_id": fn.call_id, "output": "closed"}

        async def prompt_tokens(blob: str | None) -> int:
            kept: Any = {"type": "reasoning", "id": reasoning.id, "summary": []}
            if blob is not None:
                kept["encrypted_content"] = blob
            sent: Any = fn.model_dump(exclude_none=True)
            again = await client.responses.create(
                model="recaller", input=[*ASK, kept, sent, result], tools=[NAMESPACE], **codex
            )
            assert again.usage is not None
            return again.usage.input_tokens

        sealed = await prompt_tokens(reasoning.encrypted_content)
        forged = await prompt_tokens(reasoning.encrypted_content[:-8] + "AAAAAAA=")
        dropped = await prompt_tokens(None)
        assert forged == dropped < sealed  # the thought is in the prompt only when it opens


async def test_hosted_tools_are_left_out_and_named_in_the_log(
    daemon: Daemon, caplog: pytest.LogCaptureFixture
) -> None:
    hosted: Any = [
        {"type": "web_search", "external_web_access": False},
        {"type": "file_search", "vector_store_ids": ["vs_1"]},
        {"type": "code_interpreter", "container": {"type": "auto"}},
        {"type": "image_generation"},
        {"type": "computer_use_preview", "display_width": 1, "display_height": 1},
        {"type": "mcp", "server_label": "x", "server_url": "https://example.com"},
    ]
    caplog.set_level(logging.INFO, logger="mlxd.api")
    async with httpx.AsyncClient(timeout=60, verify=TLS) as http:
        with_them = await http.post(
            f"{daemon.url}/v1/responses/input_tokens",
            json={"model": "closer", "input": ASK, "tools": [NAMESPACE, *hosted]},
        )
        without = await http.post(
            f"{daemon.url}/v1/responses/input_tokens",
            json={"model": "closer", "input": ASK, "tools": [NAMESPACE]},
        )
    assert with_them.status_code == 200, with_them.text
    assert with_them.json()["input_tokens"] == without.json()["input_tokens"]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for tool in hosted:
        assert f"({tool['type']}" in logged
