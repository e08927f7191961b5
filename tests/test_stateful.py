"""Stateful Responses through the official client: previous_response_id,
item_reference, retrieve, delete, input items and input token counts."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.responses import Response

from config.settings import ModelConfig
from tests.conftest import TLS, Daemon, running, settings_for
from tests.scripted import scripted_model, talking_model
from tests.waiting import eventually

ASK: dict[str, Any] = {"model": "tiny", "max_output_tokens": 6, "temperature": 0}


async def test_a_follow_up_continues_the_stored_conversation(shared_tiny: Daemon) -> None:
    async with shared_tiny.client() as client:
        first = await client.responses.create(input="Name a colour.", **ASK)
        follow = await client.responses.create(
            previous_response_id=first.id, input="And another?", **ASK
        )
        # The same conversation sent whole: the same prompt, token for token.
        whole = [
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "And another?"},
        ]
        assert follow.previous_response_id == first.id and follow.store
        Response.model_validate(follow.model_dump())  # every field the SDK's types require
        counted = await client.responses.input_tokens.count(model="tiny", input=whole)  # type: ignore[arg-type]
        assert follow.usage is not None
        assert follow.usage.input_tokens == counted.input_tokens
        stateless = await client.responses.create(input=whole, **ASK)  # type: ignore[arg-type]
        assert follow.output_text == stateless.output_text  # greedy: same prompt, same text

        again = await client.responses.retrieve(first.id)
        assert (again.id, again.output_text) == (first.id, first.output_text)
        items = await client.responses.input_items.list(follow.id)
        texts = [part.text for item in items.data for part in item.content]  # type: ignore[union-attr]
        assert texts == ["And another?"]


async def test_an_item_reference_stands_for_the_stored_item(shared_tiny: Daemon) -> None:
    async with shared_tiny.client() as client:
        first = await client.responses.create(input="Say hello.", **ASK)
        message = first.output[-1]
        by_reference = [
            {"type": "item_reference", "id": message.id},
            {"role": "user", "content": "Again."},
        ]
        written_out = [
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "Again."},
        ]
        a = await client.responses.input_tokens.count(model="tiny", input=by_reference)  # type: ignore[arg-type]
        b = await client.responses.input_tokens.count(model="tiny", input=written_out)  # type: ignore[arg-type]
        assert a.input_tokens == b.input_tokens > 0
        reply = await client.responses.create(input=by_reference, **ASK)  # type: ignore[arg-type]
        assert reply.status in ("completed", "incomplete")


async def test_unknown_deleted_and_unstored_responses_are_404(
    shared_tiny: Daemon, caplog: pytest.LogCaptureFixture
) -> None:
    def refusal_logged() -> bool:  # the refusal of the unknown id, with its reason
        refused = [r.getMessage() for r in caplog.records if "status=404" in r.getMessage()]
        return any("no stored response with id 'resp_nonesuch'" in line for line in refused)

    caplog.set_level(logging.INFO, logger="mlxd.request")
    async with shared_tiny.client() as client:
        kept = await client.responses.create(input="Hi", **ASK)
        unkept = await client.responses.create(input="Hi", store=False, **ASK)
        assert not unkept.store
        await client.responses.delete(kept.id)
        for gone in (kept.id, unkept.id, "resp_nonesuch"):
            with pytest.raises(openai.NotFoundError) as e:
                await client.responses.retrieve(gone)
            assert gone in str(e.value)
        await eventually(refusal_logged, what="the 404 in the log")
        with pytest.raises(openai.NotFoundError) as e:
            await client.responses.create(previous_response_id=kept.id, input="Hi", **ASK)
        assert e.value.body["param"] == "previous_response_id"  # type: ignore[index]
        with pytest.raises(openai.NotFoundError):
            await client.responses.create(
                input=[{"type": "item_reference", "id": "msg_nonesuch"}],
                **ASK,
            )


async def test_one_keys_responses_are_invisible_to_another_and_outlive_a_restart(
    tiny_dir: Path, tmp_path: Path
) -> None:
    talker = talking_model(tiny_dir, tmp_path / "talker")  # keys alone
    settings = settings_for(
        tmp_path,
        ModelConfig("tiny", str(talker)),
        api_keys=("key-one", "key-two"),
        persist_responses=True,
    )

    async with running(settings) as daemon:
        async with daemon.client(key="key-one") as one, daemon.client(key="key-two") as two:
            mine = await one.responses.create(input="Hi", stream=False, **ASK)
            with pytest.raises(openai.NotFoundError):
                await two.responses.retrieve(mine.id)
            with pytest.raises(openai.NotFoundError):
                await two.responses.create(previous_response_id=mine.id, input="Hi", **ASK)
    async with running(settings) as daemon:  # stored at shutdown, read back at start
        async with daemon.client(key="key-one") as one, daemon.client(key="key-two") as two:
            assert (await one.responses.retrieve(mine.id)).output_text == mine.output_text
            with pytest.raises(openai.NotFoundError):
                await two.responses.retrieve(mine.id)


async def test_a_streamed_response_is_stored_when_it_ends(shared_tiny: Daemon) -> None:
    async with shared_tiny.client() as client:
        stream = await client.responses.create(input="Hi", stream=True, **ASK)
        done = None
        async for event in stream:
            if event.type in ("response.completed", "response.incomplete"):
                done = event.response
        assert done is not None
        stored = await client.responses.retrieve(done.id)
        assert stored.output_text == done.output_text


async def test_a_vercel_ai_sdk_tool_loop_refers_to_earlier_items_by_id(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """The AI SDK's Responses provider sends earlier assistant output back as
    item references (message, reasoning and call alike) with the tool's result."""
    thought, call = "Check the weather.", '{"name": "get_weather", "arguments": {"city": "Oslo"}}'
    script = f"<think>{thought}</think>\n\nLooking.<tool_call>\n{call}\n</tool_call>"
    agent = scripted_model(tiny_dir, tmp_path / "agent", script)
    tool = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}
    async with running(settings_for(tmp_path, ModelConfig("agent", str(agent)))) as daemon:
        url = f"{daemon.url}/v1/responses"
        async with httpx.AsyncClient(timeout=120, verify=TLS) as http:
            ask = {"role": "user", "content": [{"type": "input_text", "text": "Oslo?"}]}
            first = await http.post(url, json={"model": "agent", "input": [ask], "tools": [tool]})
            assert first.status_code == 200, first.text
            output = first.json()["output"]
            assert [item["type"] for item in output] == ["reasoning", "message", "function_call"]
            fn = output[2]
            follow = {
                "model": "agent",
                "tools": [tool],
                "input": [
                    ask,
                    *({"type": "item_reference", "id": item["id"]} for item in output),
                    {"type": "function_call_output", "call_id": fn["call_id"], "output": "-3 C"},
                ],
            }
            second = await http.post(url, json=follow)
            assert second.status_code == 200, second.text
            # The references stand for the message and the call (the reasoning
            # stays out of the prompt): the same prompt as both written out.
            written = {
                **follow,
                "input": [
                    ask,
                    {"role": "assistant", "content": "Looking."},
                    {k: fn[k] for k in ("type", "call_id", "name", "arguments")},
                    follow["input"][-1],
                ],
            }
            counted = await http.post(f"{url}/input_tokens", json=written)
            assert second.json()["usage"]["input_tokens"] == counted.json()["input_tokens"]
