"""Anthropic Messages requests as chat requests (api/anthropic.py)."""

from __future__ import annotations

from typing import Any

import pytest

from api.anthropic import chat_request
from scheduler.errors import InvalidRequest


def body(**kw: Any) -> dict[str, Any]:
    return {"model": "m", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}], **kw}


def test_system_sampling_and_stops_carry_over() -> None:
    req = chat_request(
        body(
            system=[{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}],
            temperature=0.3,
            top_p=0.9,
            top_k=20,
            stop_sequences=["END"],
        )
    )
    assert req.messages[0] == {"role": "system", "content": "Be brief."}
    assert req.messages[1] == {"role": "user", "content": "hi"}
    p = req.params
    assert (p.max_tokens, p.sampling.temperature, p.sampling.top_p) == (64, 0.3, 0.9)
    assert p.sampling.top_k == 20 and p.stop == ("END",)


def test_a_tool_round_trip_becomes_calls_and_tool_messages() -> None:
    weather = {"type": "object", "properties": {"city": {"type": "string"}}}
    req = chat_request(
        body(
            tools=[{"name": "weather", "description": "Weather now", "input_schema": weather}],
            tool_choice={"type": "any"},
            messages=[
                {"role": "user", "content": "Weather in Oslo?"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "I should look.", "signature": "x"},
                        {"type": "text", "text": "Looking."},
                        {
                            "type": "tool_use",
                            "id": "toolu_1",
                            "name": "weather",
                            "input": {"city": "Oslo"},
                        },
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "-3 C"},
                        {"type": "text", "text": "And tomorrow?"},
                    ],
                },
            ],
        )
    )
    assistant, tool, user = req.messages[1:]
    assert assistant["content"] == "Looking."  # the thinking block is not in the prompt
    (call,) = assistant["tool_calls"]
    assert call["id"] == "toolu_1" and call["function"]["name"] == "weather"
    assert call["function"]["arguments"] == {"city": "Oslo"}  # as chat templates take them
    assert (
        tool["role"] == "tool" and tool["tool_call_id"] == "toolu_1" and tool["content"] == "-3 C"
    )
    assert user == {"role": "user", "content": "And tomorrow?"}
    assert [t["function"]["name"] for t in req.tools] == ["weather"]
    assert req.tool_choice.mode == "required"


def test_thinking_is_turned_on_and_off() -> None:
    assert chat_request(body(thinking={"type": "enabled", "budget_tokens": 1024})).thinking is True
    assert chat_request(body(thinking={"type": "disabled"})).thinking is False
    assert chat_request(body()).thinking is None


@pytest.mark.parametrize(
    ("change", "param", "words"),
    [
        ({"max_tokens": None}, "max_tokens", "required"),
        ({"messages": []}, "messages", "non-empty"),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role", "'user' or"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
            "messages[0].content",
            "text models",
        ),
        ({"system": 5}, "system", "string or a list"),
        ({"stop_sequences": "END"}, "stop_sequences", "list"),
        ({"tools": [{"name": "x", "type": "bash_20250124"}]}, "tools", "input_schema"),
        ({"tool_choice": "auto"}, "tool_choice", "'auto', 'any'"),
        ({"thinking": True}, "thinking", "enabled"),
        ({"temperature": "hot"}, "temperature", "number"),
    ],
)
def test_bad_requests_name_their_field(change: dict[str, Any], param: str, words: str) -> None:
    with pytest.raises(InvalidRequest) as e:
        chat_request({k: v for k, v in body(**change).items() if v is not None})
    assert e.value.param == param
    assert words in e.value.message
