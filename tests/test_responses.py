"""The Responses API through the official client, on the tiny model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from api.texts import Texts
from tests.conftest import TLS, Daemon

ORDER = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]


@pytest.fixture(scope="module")
def tiny(shared_tiny: Daemon) -> Daemon:
    """One daemon for this module: its tests only send requests and read answers."""
    return shared_tiny


async def test_create_with_instructions_and_a_token_limit(tiny: Daemon, tiny_dir: Path) -> None:
    async with tiny.client() as client:
        plain = await client.responses.create(model="tiny", input="Hi", max_output_tokens=5)
        told = await client.responses.create(
            model="tiny",
            instructions="Answer in French.",
            input=[{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}],
            max_output_tokens=5,
        )
    for reply in (plain, told):
        assert reply.status == "incomplete"
        assert reply.incomplete_details is not None
        assert reply.incomplete_details.reason == "max_output_tokens"
        assert reply.usage is not None and reply.usage.output_tokens == 5
        assert reply.usage.output_tokens_details.reasoning_tokens == 0
        assert reply.output[0].type == "message"
    # The instructions are the system message of the chat template.
    chat = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi"}]
    assert told.usage is not None
    assert told.usage.input_tokens == len(Texts(tiny_dir, None).chat_prompt(chat))


async def test_stream_events_in_order_with_sequence_numbers(tiny: Daemon) -> None:
    types: list[str] = []
    numbers: list[int] = []
    deltas: list[str] = []
    async with tiny.client() as client:
        async with client.responses.stream(
            model="tiny", input="Hello there", max_output_tokens=12, temperature=0
        ) as stream:
            async for event in stream:
                types.append(event.type)
                numbers.append(event.sequence_number)
                if event.type == "response.output_text.delta":
                    deltas.append(event.delta)
                if event.type == "response.incomplete":
                    # As OpenAI's API does, a response cut by max_output_tokens ends
                    # with response.incomplete (the SDK's get_final_response wants
                    # response.completed, so it is read from the event).
                    final = event.response
    collapsed = [t for i, t in enumerate(types) if i == 0 or types[i - 1] != t]
    assert collapsed == [*ORDER, "response.incomplete"]
    assert numbers == list(range(len(types)))
    assert final.output_text == "".join(deltas) and len(deltas) > 1
    assert final.usage is not None and final.usage.output_tokens == 12


async def test_stream_and_create_agree(tiny: Daemon) -> None:
    args: dict[str, Any] = {"model": "tiny", "input": "Tell me", "max_output_tokens": 8}
    async with tiny.client() as client:
        once = await client.responses.create(**args, temperature=0)
        stream = await client.responses.create(**args, temperature=0, stream=True)
        text = "".join([e.delta async for e in stream if e.type == "response.output_text.delta"])
    assert once.output_text == text


async def test_bad_requests_get_openai_errors(tiny: Daemon) -> None:
    """The Responses API's refusals in OpenAI's shape, with its own field names
    (each field's checks are in ``test_requests.py``)."""
    async with httpx.AsyncClient(timeout=120, verify=TLS) as http:
        reply = await http.post(
            f"{tiny.url}/v1/responses",
            json={"model": "tiny", "input": "x", "max_output_tokens": 0},
        )
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == "max_output_tokens"
    async with tiny.client() as client:
        with pytest.raises(openai.NotFoundError):
            await client.responses.create(model="nope", input="x")
