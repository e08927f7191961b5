"""The output reader on its own: parts split wherever the stream breaks."""

from __future__ import annotations

import json

import pytest
from mlx_lm.tool_parsers import json_tools, mistral

from api.delta import Delta
from api.reader import Reader
from api.texts import Markers

QWEN = Markers(
    ("<think>", "</think>"),
    ("<tool_call>", "</tool_call>"),
    "json_tools",
    json_tools.parse_tool_call,
)
MISTRAL = Markers(None, ("[TOOL_CALLS]", ""), "mistral", mistral.parse_tool_call)
CALL = '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'


def read(markers: Markers, text: str, size: int, **kwargs: object) -> Delta:
    reader = Reader(markers, **kwargs)  # type: ignore[arg-type]
    out = Delta()
    for i in range(0, len(text), size):
        reader.feed(text[i : i + size], out)
    reader.flush(out)
    return out


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_parts_do_not_depend_on_where_the_stream_breaks(size: int) -> None:
    text = f"<think>plan < it</think>\n\nSure <b>.{CALL}\nDone."
    out = read(QWEN, text, size, parse_calls=True)
    assert out.reasoning == "plan < it"
    assert out.text == "Sure <b>.Done."
    assert [(c.name, json.loads(c.arguments)) for c in out.calls] == [("f", {"x": 1})]


def test_calls_are_text_when_not_asked_for_or_broken() -> None:
    assert read(QWEN, CALL, 4).text == CALL
    broken = "<tool_call>\n{oops}\n</tool_call>"
    out = read(QWEN, broken, 4, parse_calls=True)
    assert out.text == broken and not out.calls
    unfinished = '<tool_call>\n{"name": "f"'
    assert read(QWEN, unfinished, 4, parse_calls=True).text == unfinished


def test_reasoning_opened_by_the_template_and_left_unclosed() -> None:
    assert read(QWEN, "still thinking", 3, reasoning=True).reasoning == "still thinking"
    out = read(QWEN, "a</think>b", 3, reasoning=True)
    assert (out.reasoning, out.text) == ("a", "b")


def test_a_format_whose_calls_run_to_the_end() -> None:
    out = read(
        MISTRAL,
        'Ok.[TOOL_CALLS][{"name": "f", "arguments": {"x": 2}, "id": "abc123xyz"}]',
        5,
        parse_calls=True,
    )
    assert out.text == "Ok."
    assert [(c.id, c.name, c.arguments) for c in out.calls] == [("abc123xyz", "f", '{"x": 2}')]
