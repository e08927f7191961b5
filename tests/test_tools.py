"""Tool calls and reasoning, end to end through real runners and the official
client. Scripted models (``tests/scripted.py``) emit what trained models
emit; a forced call is decoded from the tiny model's real logits."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from openai.types.chat import ChatCompletionFunctionToolParam, ChatCompletionMessageParam
from openai.types.responses import FunctionToolParam, ResponseReasoningItem

from api.texts import Texts
from config.settings import ModelConfig
from tests.conftest import Daemon, serving, settings_for
from tests.scripted import agent_model, scripted_model

THOUGHT = "The user wants the weather."
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
AGENT = f"<think>{THOUGHT}</think>\n\nLet me check.{CALL}"
BROKEN = '<tool_call>\n{"name": get_weather, "arguments": }\n</tool_call> then'

WEATHER: ChatCompletionFunctionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
UNITS: ChatCompletionFunctionToolParam = {
    "type": "function",
    "function": {
        "name": "set_units",
        "parameters": {
            "type": "object",
            "properties": {
                "unit": {"enum": ["celsius", "fahrenheit"]},
                "loud": {"type": "boolean"},
            },
            "required": ["unit", "loud"],
            "additionalProperties": False,
        },
    },
}
QUESTION = {"role": "user", "content": "What's the weather in Paris?"}
ASK: list[ChatCompletionMessageParam] = [{"role": "user", "content": QUESTION["content"]}]


@pytest.fixture(scope="module")
def agents(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon for this module's tests, which only send requests and read answers."""
    work = tmp_path_factory.mktemp("agents")
    models = {
        "agent": scripted_model(tiny_dir, work / "agent", AGENT),
        "broken": scripted_model(tiny_dir, work / "broken", BROKEN),
        "tiny-agent": agent_model(tiny_dir, work / "tiny-agent"),
    }
    with serving(settings_for(work, *(ModelConfig(n, str(p)) for n, p in models.items()))) as d:
        yield d


def extra(obj: Any, key: str) -> Any:
    return (obj.model_extra or {}).get(key)


async def test_chat_splits_reasoning_content_and_a_tool_call(agents: Daemon) -> None:
    async with agents.client() as client:
        reply = await client.chat.completions.create(model="agent", messages=ASK, tools=[WEATHER])
        stream = await client.chat.completions.create(
            model="agent", messages=ASK, tools=[WEATHER], stream=True
        )
        chunks = [c async for c in stream]
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "tool_calls"
    assert extra(message, "reasoning_content") == THOUGHT
    assert message.content == "Let me check."
    assert message.tool_calls is not None and len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    usage = reply.usage
    assert usage is not None and usage.completion_tokens_details is not None
    assert 0 < (usage.completion_tokens_details.reasoning_tokens or 0) < usage.completion_tokens

    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = [extra(d, "reasoning_content") for d in deltas if extra(d, "reasoning_content")]
    assert "".join(reasoning) == THOUGHT and len(reasoning) > 1  # streamed as it comes
    assert "".join(d.content or "" for d in deltas) == "Let me check."
    streamed = [tc for d in deltas for tc in d.tool_calls or []]
    assert len(streamed) == 1 and streamed[0].index == 0 and streamed[0].id
    assert streamed[0].function is not None and streamed[0].function.name == "get_weather"
    assert json.loads(streamed[0].function.arguments or "") == {"city": "Paris"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


async def test_a_call_that_does_not_parse_stays_text(agents: Daemon) -> None:
    async with agents.client() as client:
        reply = await client.chat.completions.create(model="broken", messages=ASK, tools=[WEATHER])
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].message.content == BROKEN
    assert reply.choices[0].finish_reason == "stop"


async def test_tool_choice_none_leaves_tools_out_and_calls_as_text(agents: Daemon) -> None:
    async with agents.client() as client:
        auto = await client.chat.completions.create(model="agent", messages=ASK, tools=[WEATHER])
        none = await client.chat.completions.create(
            model="agent", messages=ASK, tools=[WEATHER], tool_choice="none"
        )
    assert none.choices[0].message.tool_calls is None
    assert none.choices[0].message.content == "Let me check." + CALL
    assert none.choices[0].finish_reason == "stop"
    assert auto.usage is not None and none.usage is not None
    assert none.usage.prompt_tokens < auto.usage.prompt_tokens  # no tools in the prompt


async def test_tool_results_and_the_thinking_switch_reach_the_template(agents: Daemon) -> None:
    conversation: list[Any] = [
        *ASK,
        {
            "role": "assistant",
            "content": f"<think>{THOUGHT}</think>Let me check.",
            "reasoning_content": THOUGHT,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"},
    ]
    async with agents.client() as client:
        answered = await client.chat.completions.create(
            model="agent", messages=conversation, tools=[WEATHER]
        )
        plain = await client.chat.completions.create(model="agent", messages=ASK)
        no_thinking = [
            await client.chat.completions.create(model="agent", messages=ASK, **kwargs)
            for kwargs in (
                {"reasoning_effort": "none"},
                {"extra_body": {"thinking": False}},
                {"extra_body": {"chat_template_kwargs": {"enable_thinking": False}}},
            )
        ]
    (agent,) = [m.source for m in agents.settings.models if m.name == "agent"]
    texts = Texts(Path(agent), None)
    expected = texts.chat_prompt(
        [
            QUESTION,
            {
                "role": "assistant",
                "content": "Let me check.",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"},
        ],
        [dict(WEATHER)],
    )
    prompt = texts.tokenizer.decode(expected)
    assert "18 C and sunny" in prompt and '"city": "Paris"' in prompt and THOUGHT not in prompt
    assert answered.usage is not None and answered.usage.prompt_tokens == len(expected)
    off = len(texts.chat_prompt([QUESTION], thinking=False))
    assert plain.usage is not None and plain.usage.prompt_tokens < off
    assert [r.usage.prompt_tokens for r in no_thinking if r.usage] == [off] * 3


RESPONSE_ORDER = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.reasoning_text.delta",
    "response.reasoning_text.done",
    "response.output_item.done",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.output_item.added",
    "response.function_call_arguments.delta",
    "response.function_call_arguments.done",
    "response.output_item.done",
    "response.completed",
]
FLAT_WEATHER = cast(FunctionToolParam, {"type": "function", **WEATHER["function"]})


async def test_responses_stream_reasoning_text_and_a_call_in_order(agents: Daemon) -> None:
    types: list[str] = []
    async with agents.client() as client:
        async with client.responses.stream(
            model="agent", input="Weather in Paris?", tools=[FLAT_WEATHER]
        ) as stream:
            async for event in stream:
                types.append(event.type)
                assert event.sequence_number == len(types) - 1
            final = await stream.get_final_response()
        created = await client.responses.create(
            model="agent", input="Weather in Paris?", tools=[FLAT_WEATHER]
        )
        call = created.output[-1]
        assert call.type == "function_call"
        follow_up = await client.responses.create(
            model="agent",
            tools=[FLAT_WEATHER],
            input=[
                {"role": "user", "content": "Weather in Paris?"},
                {
                    "type": "function_call",
                    "call_id": call.call_id,
                    "name": call.name,
                    "arguments": call.arguments,
                },
                {"type": "function_call_output", "call_id": call.call_id, "output": "18 C"},
            ],
        )
    collapsed = [t for i, t in enumerate(types) if i == 0 or types[i - 1] != t]
    assert collapsed == RESPONSE_ORDER
    for response in (final, created):
        assert [item.type for item in response.output] == ["reasoning", "message", "function_call"]
        reasoning, _, fn = response.output
        assert reasoning.type == "reasoning" and reasoning.content is not None
        assert reasoning.content[0].text == THOUGHT
        assert response.output_text == "Let me check."
        assert fn.type == "function_call" and fn.name == "get_weather"
        assert json.loads(fn.arguments) == {"city": "Paris"}
        assert response.usage is not None
        assert response.usage.output_tokens_details.reasoning_tokens > 0
    assert follow_up.status == "completed"
    assert follow_up.usage is not None and created.usage is not None
    assert follow_up.usage.input_tokens > created.usage.input_tokens


async def test_required_tool_choice_forces_a_valid_call(agents: Daemon) -> None:
    # The tiny model's weights are random: left alone it writes gibberish. A
    # required or named tool choice constrains its real logits to one call.
    async with agents.client() as client:
        required = await client.chat.completions.create(
            model="tiny-agent",
            messages=ASK,
            tools=[UNITS],
            tool_choice="required",
            max_tokens=60,
            temperature=0,
        )
        named = await client.chat.completions.create(
            model="tiny-agent",
            messages=ASK,
            tools=[WEATHER, UNITS],
            tool_choice={"type": "function", "function": {"name": "set_units"}},
            max_tokens=60,
            temperature=1.0,
            seed=3,
        )
    for reply in (required, named):
        assert reply.choices[0].finish_reason == "tool_calls"
        calls = reply.choices[0].message.tool_calls
        assert calls is not None and len(calls) == 1
        assert calls[0].type == "function" and calls[0].function.name == "set_units"
        args = json.loads(calls[0].function.arguments)
        assert args["unit"] in ("celsius", "fahrenheit") and isinstance(args["loud"], bool)


async def test_responses_give_the_reasoning_as_its_summary_when_asked(agents: Daemon) -> None:
    types: list[str] = []
    ask: dict[str, Any] = {"model": "agent", "input": "Weather?", "tools": [FLAT_WEATHER]}
    async with agents.client() as client:
        async with client.responses.stream(**ask, reasoning={"summary": "auto"}) as stream:
            async for event in stream:
                types.append(event.type)
            final = await stream.get_final_response()
        whole = await client.responses.create(**ask, reasoning={"summary": "detailed"})
    assert "response.reasoning_summary_text.delta" in types
    assert "response.reasoning_text.delta" not in types
    for response in (final, whole):
        reasoning = response.output[0]
        assert isinstance(reasoning, ResponseReasoningItem)
        assert [(s.type, s.text) for s in reasoning.summary] == [("summary_text", THOUGHT)]
