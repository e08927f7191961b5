"""Anthropic's Messages API through the official anthropic client: the tiny
model for text, a scripted agent model for thinking and tool use."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import pytest
from anthropic.types import Message, TextBlock, ToolUseBlock

from config.settings import ModelConfig
from tests.conftest import TLS, Daemon, running, serving, settings_for
from tests.scripted import scripted_model, talking_model

THOUGHT = "The user wants the weather."
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
WEATHER: Any = {
    "name": "get_weather",
    "description": "Current weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}
HI: list[Any] = [{"role": "user", "content": "Tell me about the sea."}]
GREEDY = {"temperature": 0}  # the SDK no longer names sampling settings; the API takes them


def text_of(message: Message) -> str:
    return "".join(b.text for b in message.content if isinstance(b, TextBlock))


def uses(message: Message) -> list[ToolUseBlock]:
    return [b for b in message.content if isinstance(b, ToolUseBlock)]


def error_type(e: anthropic.APIStatusError) -> Any:
    body: Any = e.body
    return body["error"]["type"]


def client(daemon: Daemon, key: str = "unused") -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(
        base_url=daemon.url,
        api_key=key,
        max_retries=0,
        timeout=120,
        http_client=anthropic.DefaultAsyncHttpxClient(verify=TLS),
    )


@pytest.fixture(scope="module")
def daemon(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon for the module's tests (they change nothing another could
    see): the tiny model, and scripted agents that think and call tools."""
    work = tmp_path_factory.mktemp("messages")
    agent = scripted_model(tiny_dir, work / "agent", f"<think>{THOUGHT}</think>\n\nOn it.{CALL}")
    twice = scripted_model(tiny_dir, work / "twice", CALL + CALL.replace("Paris", "Oslo"))
    models = {"tiny": tiny_dir, "agent": agent, "twice": twice}
    with serving(settings_for(work, *(ModelConfig(n, str(p)) for n, p in models.items()))) as d:
        yield d


async def test_create_stream_and_count_agree(daemon: Daemon) -> None:
    async with client(daemon) as c:
        whole = await c.messages.create(
            model="tiny", max_tokens=8, messages=HI, extra_body=GREEDY, system="Be brief."
        )
        assert whole.role == "assistant" and whole.type == "message"
        assert whole.stop_reason == "max_tokens" and whole.usage.output_tokens == 8
        (block,) = whole.content
        assert block.type == "text" and block.text

        kinds = []
        async with c.messages.stream(
            model="tiny", max_tokens=8, messages=HI, extra_body=GREEDY, system="Be brief."
        ) as stream:
            async for event in stream:
                kinds.append(event.type)
            streamed = await stream.get_final_message()
        assert text_of(streamed) == block.text
        assert streamed.stop_reason == "max_tokens"
        assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
        assert kinds.index("content_block_start") < kinds.index("content_block_stop")
        assert "message_delta" in kinds

        counted = await c.messages.count_tokens(model="tiny", messages=HI, system="Be brief.")
        u = whole.usage
        read = (
            u.input_tokens + (u.cache_read_input_tokens or 0) + (u.cache_creation_input_tokens or 0)
        )
        assert counted.input_tokens == read > 0


async def test_usage_counts_cache_reads_writes_and_the_rest_as_anthropic_does(
    daemon: Daemon,
) -> None:
    """What a request marks with ``cache_control`` and does not find cached is
    written; what it finds is read; the rest is input. ``message_start`` says
    the same as the end."""
    rules = "Answer in one short line, and never apologise. " * 12
    system: Any = [{"type": "text", "text": rules, "cache_control": {"type": "ephemeral"}}]
    ask: Any = [{"role": "user", "content": "Where do eels spawn?"}]
    async with client(daemon) as c:
        counted = await c.messages.count_tokens(model="tiny", messages=ask, system=system)
        first = await c.messages.create(
            model="tiny", max_tokens=4, messages=ask, system=system, extra_body=GREEDY
        )
        u = first.usage
        read, written = u.cache_read_input_tokens or 0, u.cache_creation_input_tokens or 0
        assert u.input_tokens + read + written == counted.input_tokens
        assert written > 100 and u.input_tokens < 20  # the rules were written, the question not

        async with c.messages.stream(
            model="tiny", max_tokens=4, messages=ask, system=system, extra_body=GREEDY
        ) as stream:
            started = None
            async for event in stream:
                if event.type == "message_start":
                    started = event.message.usage
            again = (await stream.get_final_message()).usage
        assert started is not None
        assert (again.cache_read_input_tokens or 0) >= written  # read back now
        assert again.cache_creation_input_tokens == 0
        for field in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"):
            assert getattr(started, field) == getattr(again, field)

        plain = await c.messages.create(
            model="tiny", max_tokens=4, messages=ask, system=rules, extra_body=GREEDY
        )
        assert plain.usage.cache_creation_input_tokens == 0  # nothing marked: nothing written


async def test_a_stop_sequence_ends_the_message_and_is_named(daemon: Daemon) -> None:
    async with client(daemon) as c:
        free = await c.messages.create(model="tiny", max_tokens=16, messages=HI, extra_body=GREEDY)
        text = text_of(free)
        stop = text[len(text) // 2 :][:3]
        assert stop.strip(), text
        cut = await c.messages.create(
            model="tiny", max_tokens=16, messages=HI, extra_body=GREEDY, stop_sequences=[stop]
        )
        assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
        assert text_of(cut) == text[: text.index(stop)]


async def test_thinking_and_a_tool_round_trip(daemon: Daemon) -> None:
    async with client(daemon) as c:
        ask: Any = [{"role": "user", "content": "Weather in Paris?"}]
        reply = await c.messages.create(
            model="agent",
            max_tokens=200,
            messages=ask,
            tools=[WEATHER],
        )
        assert reply.stop_reason == "tool_use"
        thinking, text, use = reply.content
        assert thinking.type == "thinking" and thinking.thinking == THOUGHT
        assert text.type == "text" and text.text.strip() == "On it."
        assert use.type == "tool_use" and use.name == "get_weather"
        assert use.input == {"city": "Paris"}

        async with c.messages.stream(
            model="agent",
            max_tokens=200,
            messages=ask,
            tools=[WEATHER],
        ) as stream:
            streamed = await stream.get_final_message()
        assert [b.type for b in streamed.content] == ["thinking", "text", "tool_use"]
        assert [u.input for u in uses(streamed)] == [{"city": "Paris"}]

        result = {"type": "tool_result", "tool_use_id": use.id, "content": "18 C, sunny"}
        follow: Any = [
            *ask,
            {"role": "assistant", "content": reply.content},
            {"role": "user", "content": [result]},
        ]
        again = await c.messages.create(
            model="agent",
            max_tokens=200,
            messages=follow,
            tools=[WEATHER],
        )
        assert again.stop_reason == "tool_use"  # the script answers the same way


async def test_parallel_tool_use_can_be_turned_off(daemon: Daemon) -> None:
    ask: Any = [{"role": "user", "content": "Weather in Paris and Oslo?"}]
    async with client(daemon) as c:
        both = await c.messages.create(model="twice", max_tokens=200, messages=ask, tools=[WEATHER])
        assert [u.input for u in uses(both)] == [{"city": "Paris"}, {"city": "Oslo"}]
        assert len(uses(both)) == len(both.content)
        one = await c.messages.create(
            model="twice",
            max_tokens=200,
            messages=ask,
            tools=[WEATHER],
            tool_choice={"type": "auto", "disable_parallel_tool_use": True},
        )
        assert [u.input for u in uses(one)] == [{"city": "Paris"}]
        assert len(uses(one)) == len(one.content)  # nothing of the second call
        assert one.stop_reason == "tool_use"


async def test_errors_take_anthropics_shape_and_keys_go_in_x_api_key(
    daemon: Daemon, tiny_dir: Path, tmp_path: Path
) -> None:
    async with client(daemon) as c:
        with pytest.raises(anthropic.BadRequestError) as bad:
            await c.messages.create(model="tiny", max_tokens=8, messages=[])
        assert bad.value.body == {
            "type": "error",
            "error": {
                "type": "invalid_request_error",
                "message": "'messages' must be a non-empty list",
            },
        }
        with pytest.raises(anthropic.BadRequestError, match="cannot take tools"):
            await c.messages.create(model="tiny", max_tokens=8, messages=HI, tools=[WEATHER])
        with pytest.raises(anthropic.NotFoundError) as missing:
            await c.messages.create(model="nope", max_tokens=8, messages=HI)
        assert error_type(missing.value) == "not_found_error"
    talker = talking_model(tiny_dir, tmp_path / "talker")  # keys alone
    keyed = settings_for(tmp_path / "keyed", ModelConfig("tiny", str(talker)), api_keys=("k1",))
    async with running(keyed) as d:
        async with client(d, "k1") as good, client(d, "wrong") as bad_key:
            reply = await good.messages.create(model="tiny", max_tokens=2, messages=HI)
            assert reply.usage.output_tokens == 2
            with pytest.raises(anthropic.AuthenticationError) as denied:
                await bad_key.messages.create(model="tiny", max_tokens=2, messages=HI)
            assert error_type(denied.value) == "authentication_error"
