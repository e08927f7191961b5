"""Anthropic Messages requests as chat requests (api/anthropic/messages.py)."""

from __future__ import annotations

from typing import Any

import pytest

from api.anthropic.messages import chat_request
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


def test_thinking_is_turned_on_off_or_left_to_the_model() -> None:
    enabled = chat_request(body(thinking={"type": "enabled", "budget_tokens": 1024}))
    assert enabled.thinking is True and enabled.reasoning_budget == 1024
    assert chat_request(body(thinking={"type": "disabled"})).thinking is False
    adaptive = chat_request(body(thinking={"type": "adaptive", "display": "omitted"}))
    assert adaptive.thinking is None and adaptive.reasoning_budget is None
    assert chat_request(body()).thinking is None


def test_a_system_turn_stays_where_claude_code_puts_it() -> None:
    req = chat_request(
        body(
            system="You are an agent.",
            messages=[
                {"role": "user", "content": [{"type": "text", "text": "<reminder>"}]},
                {"role": "system", "content": [{"type": "text", "text": "# Environment"}]},
                {"role": "user", "content": "Write a note."},
            ],
        )
    )
    assert [m["role"] for m in req.messages] == ["system", "user", "system", "user"]
    assert req.messages[2] == {"role": "system", "content": "# Environment"}


def test_what_claude_code_sends_besides_is_accepted() -> None:
    """Fields from a recorded Claude Code request (tests/agents/): none is refused."""
    req = chat_request(
        body(
            max_tokens=32000,
            stream=True,
            thinking={"type": "adaptive"},
            context_management={"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
            output_config={"effort": "high"},
            metadata={"user_id": "{}"},
            service_tier="auto",
            container="c_1",
            system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
            tools=[
                {"name": "Bash", "description": "Run", "input_schema": {"type": "object"}},
                {"name": "Later", "input_schema": {"type": "object"}, "defer_loading": True},
                {"type": "web_search_20250305", "name": "web_search", "max_uses": 5},
                {"type": "bash_20250124", "name": "bash"},
            ],
        )
    )
    assert req.effort == "high" and req.thinking is None
    assert [t["function"]["name"] for t in req.tools] == ["Bash"]  # the others are left out
    assert req.cache_marks == ("Be brief.",)


def test_output_format_constrains_the_answer() -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    req = chat_request(body(output_config={"format": {"type": "json_schema", "schema": schema}}))
    assert req.params.grammar == {"type": "json_schema", "schema": schema}


def test_cache_marks_are_the_texts_that_end_marked_blocks() -> None:
    ephemeral = {"type": "ephemeral"}
    req = chat_request(
        body(
            system=[{"type": "text", "text": "Rules.", "cache_control": ephemeral}],
            messages=[
                {"role": "user", "content": "Read it."},
                {
                    "role": "assistant",
                    "content": [{"type": "tool_use", "id": "t1", "name": "Read", "input": {}}],
                },
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "t1",
                            "content": [{"type": "text", "text": "file body"}],
                            "cache_control": ephemeral,
                        }
                    ],
                },
            ],
        )
    )
    assert req.cache_marks == ("Rules.", "file body")


@pytest.mark.parametrize(
    ("change", "param", "words"),
    [
        ({"max_tokens": None}, "max_tokens", "required"),
        ({"messages": []}, "messages", "non-empty"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "'user', "),
        (
            {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
            "messages[0].content",
            "must be base64 data with its 'media_type'",
        ),
        ({"system": 5}, "system", "string or a list"),
        ({"stop_sequences": "END"}, "stop_sequences", "list"),
        ({"tools": [{"name": "x"}]}, "tools", "input_schema"),
        ({"tool_choice": "auto"}, "tool_choice", "'auto', 'any'"),
        ({"thinking": True}, "thinking", "enabled"),
        ({"thinking": {"type": "enabled", "budget_tokens": 0}}, "thinking.budget_tokens", ">= 1"),
        ({"output_config": {"effort": 3}}, "output_config.effort", "string"),
        ({"output_config": {"format": {"type": "xml"}}}, "output_config.format", "json_schema"),
        ({"temperature": "hot"}, "temperature", "number"),
    ],
)
def test_bad_requests_name_their_field(change: dict[str, Any], param: str, words: str) -> None:
    with pytest.raises(InvalidRequest) as e:
        chat_request({k: v for k, v in body(**change).items() if v is not None})
    assert e.value.param == param
    assert words in e.value.message
