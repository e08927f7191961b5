"""Request validation, called directly: every refusal is an ``InvalidRequest``
naming its field (``param``) with a message that says what is wrong.

These cases need no daemon: the request constructors (``ChatRequest``,
``CompletionRequest``, the Responses API's ``chat_request``, ``parse_json``)
are the one place a body is checked. That a refusal reaches a client as a 400
in OpenAI's shape is proved once per endpoint, over HTTP, in ``test_api.py``
and ``test_responses.py``; refusals that need the model (its vocabulary, its
context) are tried there too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from api.catalog import Catalog
from api.generation import prepare
from api.openai.responses import chat_request
from api.openai.store import ResponseStore
from api.openai.turns import Turn
from api.record import Record
from api.schemas import ChatRequest, CompletionRequest, parse_json
from config.settings import ModelConfig, Settings
from scheduler.errors import ContextLengthExceeded, InvalidRequest
from scheduler.metrics import Metrics
from tests.scripted import scripted_model

CHAT = [{"role": "user", "content": "Say something."}]
ASK = [{"role": "user", "content": "What's the weather in Paris?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def refusal(build: Any, body: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        build(body)
    return info.value


# (fields over a valid chat body, param, a fragment of the message)
CHAT_CASES: list[tuple[dict[str, Any], str | None, str]] = [
    # moved from test_api.py's HTTP cases
    ({"messages": []}, "messages", "must be a non-empty list"),
    ({"max_tokens": -1}, "max_tokens", "must be an integer >= 1, got -1"),
    ({"max_tokens": "ten"}, "max_tokens", "must be an integer >= 1, got 'ten'"),
    ({"max_completion_tokens": 0}, "max_completion_tokens", "must be an integer >= 1"),
    ({"temperature": 7}, "temperature", "must be a number in [0, 2], got 7"),
    ({"top_p": 0}, "top_p", "must be a number in (0, 1], got 0"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "must be one of"),
    ({"n": 2}, "n", "only n=1 is supported"),
    ({"presence_penalty": 3}, "presence_penalty", "must be a number in [-2, 2], got 3"),
    ({"logit_bias": {"x": 1}}, "logit_bias", "maps token ids to numbers in [-100, 100]"),
    ({"logit_bias": {"5": 500}}, "logit_bias", "got '5': 500"),
    ({"logit_bias": {"²": 1}}, "logit_bias", "got '²': 1"),  # a digit, but not ASCII
    ({"top_logprobs": 2}, "top_logprobs", "needs 'logprobs': true"),
    ({"response_format": {"type": "xml"}}, "response_format", "got 'xml'"),
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "objectx"}},
            }
        },
        "response_format",
        "invalid JSON schema",
    ),
    *(  # schemas no finite value meets: once a 200 with empty content
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": schema}}},
            "response_format",
            "allows no output at all",
        )
        for schema in (
            {"$ref": "#"},
            {
                "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}},
                "$ref": "#/$defs/a",
            },
        )
    ),
    ({"model": None}, "model", "'model' is required"),
    ({"seed": 2**64}, "seed", "must be an integer from -2**63 to 2**64 - 1"),
    # moved from test_hostile.py (poison sampling values; malformed bodies)
    ({"seed": -(2**64)}, "seed", "must be an integer from -2**63 to 2**64 - 1"),
    ({"messages": [{"role": ["user"], "content": "hi"}]}, "messages[0].role", "must be one of"),
    ({"messages": [{"role": {"a": 1}, "content": "hi"}]}, "messages[0].role", "must be one of"),
    (
        {"messages": [*CHAT, {"role": "assistant", "content": "", "tool_calls": 5}]},
        "messages[1].tool_calls",
        "must be a list",
    ),
    (
        {
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
            "tool_choice": {"type": "function", "function": {"name": ["f"]}},
        },
        "tool_choice",
        "names no tool in 'tools'",
    ),
    ({"messages": CHAT * 10_001}, "messages", "may hold at most 10000"),
    # moved from test_tools.py
    ({"tools": [{"type": "retrieval"}]}, "tools[0]", "must be {'type': 'function'"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", "must be 'auto', 'none'"),
    (
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
        "tool_choice",
        "names no tool in 'tools': 'x'",
    ),
    ({"tool_choice": "required"}, "tool_choice", "needs 'tools'"),
    (
        {
            "tools": [WEATHER],
            "tool_choice": "required",
            "response_format": {"type": "json_object"},
        },
        "tool_choice",
        "cannot both constrain the output",
    ),
    ({"thinking": "yes"}, "thinking", "must be a boolean, got 'yes'"),
    (
        {
            "messages": [
                *ASK,
                {
                    "role": "assistant",
                    "tool_calls": [{"function": {"name": "f", "arguments": "{"}}],
                },
            ]
        },
        "messages[1].tool_calls[0]",
        "arguments' is not valid JSON",
    ),
    ({"messages": [*ASK, {"role": "tool", "content": "1"}]}, "messages[1]", "tool_call_id"),
]


@pytest.mark.parametrize(("fields", "param", "fragment"), CHAT_CASES)
def test_bad_chat_requests_name_their_field(
    fields: dict[str, Any], param: str | None, fragment: str
) -> None:
    body = {
        k: v for k, v in ({"model": "tiny", "messages": CHAT} | fields).items() if v is not None
    }
    error = refusal(ChatRequest.from_openai, body)
    assert type(error) is InvalidRequest
    assert error.param == param
    assert fragment in error.message


COMPLETION_CASES: list[tuple[dict[str, Any], str, str]] = [
    ({"prompt": ""}, "prompt", "must not be empty"),
    ({"prompt": [1, -2]}, "prompt", "list of token ids"),
    ({"prompt": ["a", "b"]}, "prompt", "one prompt per request"),
    ({"logprobs": 6}, "logprobs", "must be an integer in [0, 5]"),
    ({"echo": True}, "echo", "not supported"),
]


@pytest.mark.parametrize(("fields", "param", "fragment"), COMPLETION_CASES)
def test_bad_completion_requests_name_their_field(
    fields: dict[str, Any], param: str, fragment: str
) -> None:
    error = refusal(CompletionRequest.from_openai, {"model": "tiny", "prompt": "Hi"} | fields)
    assert type(error) is InvalidRequest
    assert error.param == param
    assert fragment in error.message


# moved from test_responses.py: the Responses API's names for the fields
RESPONSES_CASES: list[tuple[dict[str, Any], str, str]] = [
    ({"input": []}, "input", "must be a string or a non-empty list"),
    ({"input": 3}, "input", "must be a string or a non-empty list"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens", "must be an integer >= 1"),
    ({"input": "x", "temperature": 7}, "temperature", "must be a number in [0, 2]"),
    ({"input": "x", "reasoning": {"summary": "all"}}, "reasoning.summary", "'auto', 'concise'"),
    ({"input": [{"type": "function_call_output", "output": "1"}]}, "input[0]", "tool_call_id"),
    (
        {"input": [{"role": "user", "content": [{"type": "input_image"}]}]},
        "input",
        "needs its 'image_url'",
    ),
    ({"input": "x", "tools": [{"type": "namespace", "tools": []}]}, "tools[0]", "needs a 'name'"),
    (
        {"input": "x", "tools": [{"type": "custom", "name": "x", "format": {"type": "grammar"}}]},
        "tools[0]",
        "syntax 'lark' or 'regex'",
    ),
    ({"input": "x", "tools": [{"type": "function"}]}, "tools[0]", "and a 'name'"),
    ({"input": "x", "tool_choice": "required"}, "tool_choice", "needs 'tools'"),
    ({"input": "x", "reasoning": {"effort": 3}}, "reasoning.effort", "must be a string"),
]


@pytest.mark.parametrize(("fields", "param", "fragment"), RESPONSES_CASES)
def test_bad_responses_requests_name_their_field(
    fields: dict[str, Any], param: str, fragment: str
) -> None:
    error = refusal(chat_request, {"model": "tiny"} | fields)
    assert type(error) is InvalidRequest
    assert error.param == param
    assert fragment in error.message


# moved from test_hostile.py: bodies refused before any field is read
RAW = {
    b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}': "lone surrogate",
    b'{"model": "tiny", "x": ' + b"[" * 10_000 + b"]" * 10_000 + b"}": "nested more than 64",
    b'{"model": "tiny", "x": ' + b"[" * 100 + b"]" * 100 + b"}": "nested more than 64",
    b'{"model": "tiny", "\\udfff": 1}': "lone surrogate",  # in a key
    b"{not json": "not valid JSON",
    b"\xff\xfe": "not valid JSON",
}


@pytest.mark.parametrize(("raw", "fragment"), RAW.items(), ids=lambda v: repr(v)[:24])
def test_bodies_that_are_not_sound_json_are_refused(raw: bytes, fragment: str) -> None:
    error = refusal(parse_json, raw)
    assert type(error) is InvalidRequest and error.param is None
    assert fragment in error.message


def test_sound_bodies_pass() -> None:
    """The refusals above are the checks', not a constructor that refuses all."""
    assert parse_json(b'{"a": [[["deep enough"]]], "\\u00e9": "\\u00e9"}')["é"] == "é"
    chat = ChatRequest.from_openai({"model": "tiny", "messages": CHAT, "seed": -1, "top_k": 10**9})
    assert chat.params.sampling.seed == 2**64 - 1  # -1 as unsigned
    assert CompletionRequest.from_openai({"model": "tiny", "prompt": [[1, 2]]}).prompt == (1, 2)
    assert chat_request({"model": "tiny", "input": "Hi"})[0].messages[-1]["content"] == "Hi"


def test_json_inside_a_string_is_held_to_the_bodys_depth() -> None:
    """A tool call's arguments are JSON in a string: nested 100,000 deep they
    were a RecursionError (a 500); now the caller's 400, naming the field."""
    deep = "[" * 100_000 + "]" * 100_000
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": deep}}
    body = {"model": "tiny", "messages": [*CHAT, {"role": "assistant", "tool_calls": [call]}]}
    error = refusal(ChatRequest.from_openai, body)
    assert error.param == "messages[1].tool_calls[0]"
    assert "nested more than 64 deep" in error.message


def test_an_input_item_whose_type_is_not_a_string_is_refused() -> None:
    store = ResponseStore(10, 10**6)
    body = {"model": "tiny", "input": [{"type": ["message"], "role": "user", "content": "x"}]}
    error = refusal(lambda b: Turn.read(b, store, ""), body)
    assert error.param == "input" and "'type' must be a string" in error.message


async def test_text_too_long_for_the_context_is_refused_before_any_templating(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """A body at the 10,000-message cap whose text cannot fit the context is
    refused from its size (no token spells more than the vocabulary's longest
    string), before it is rendered and tokenized (seconds of CPU)."""
    model = scripted_model(tiny_dir, tmp_path / "m", "Hi.", context=4096)
    catalog = Catalog(Settings(models=(ModelConfig("m", str(model)),), cache_dir=tmp_path), where)
    texts = await catalog.texts("m")

    def never(*args: Any) -> Any:
        raise AssertionError("rendered")

    texts.render = never  # type: ignore[method-assign,assignment]
    messages = [{"role": "user", "content": "word " * 330}] * 10_000  # 3.3 MB of text
    req = ChatRequest.from_openai({"model": "m", "messages": messages})
    with pytest.raises(ContextLengthExceeded, match="at least"):
        await prepare(catalog, req, Record("req_test", "/v1/chat/completions", Metrics()))


async def where(model: ModelConfig) -> Path:
    return Path(model.source)
