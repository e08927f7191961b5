"""Custom tools' grammars, rewritten for their JSON-escaped input
(api/openai/custom_calls.py): checked against Python's regexes, and through
llguidance with SmolLM2's tokenizer, the way the runner applies them."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import llguidance
import llguidance.hf
import pytest
from hypothesis import given
from hypothesis import strategies as st

from api.openai.custom_calls import call_grammar, escaped_grammar, escaped_regex
from api.texts import Markers
from runner.protocol import to_llguidance

PATTERNS = [
    r"[a-z]+\d*",
    r"\r?\n",
    r"[\s\S]+",
    r"(?s:.*)",
    r".*",
    r'say "(hi|bye)"\\?',
    r"[^\x00]{0,3}",
]

# Codex's custom `exec` tool, as a recorded request sends it.
EXEC = (
    "\nstart: pragma_source | plain_source\npragma_source: PRAGMA_LINE NEWLINE SOURCE\n"
    "plain_source: SOURCE\n\nPRAGMA_LINE: /[ \\t]*\\/\\/ @exec:[^\\r\\n]*/\n"
    "NEWLINE: /\\r?\\n/\nSOURCE: /[\\s\\S]+/\n"
)
JSON_TOOLS = Markers(None, ("<tool_call>", "</tool_call>"), "json_tools")
LS = {"type": "function", "function": {"name": "ls", "parameters": {"type": "object"}}}


def escaped(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)[1:-1]


@pytest.mark.parametrize("pattern", PATTERNS)
@given(text=st.text(alphabet=st.sampled_from('ab z9\n\r\t"\\\x00\x1fé😀'), max_size=6))
def test_an_escaped_regex_matches_just_the_escaped_texts(pattern: str, text: str) -> None:
    rewritten = escaped_regex(pattern)
    assert bool(re.fullmatch(pattern, text)) == bool(re.fullmatch(rewritten, escaped(text)))


def test_what_cannot_be_rewritten_is_refused() -> None:
    for pattern in (r"^a", r"(a)\1", r"(?=a)a", r"(?i)a"):
        with pytest.raises(ValueError):
            escaped_regex(pattern)
    for grammar in ('%import common.WS\nstart: "a"', 'start: "a"i'):
        with pytest.raises(ValueError):
            escaped_grammar("lark", grammar)


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer: Path) -> tuple[Any, llguidance.LLTokenizer]:
    from transformers import AutoTokenizer

    hf: Any = AutoTokenizer.from_pretrained(str(smollm2_tokenizer), local_files_only=True)
    return hf, llguidance.hf.from_tokenizer(hf)


def accepts(tokenizer: tuple[Any, llguidance.LLTokenizer], grammar: str, text: str) -> bool:
    hf, tok = tokenizer
    matcher = llguidance.LLMatcher(tok, grammar, log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    return all(matcher.consume_token(t) for t in hf.encode(text, add_special_tokens=False)) and (
        matcher.is_accepting()
    )


def exec_call(source: str) -> str:
    return "<tool_call>\n" + json.dumps({"name": "exec", "arguments": {"input": source}})


def test_calls_hold_to_their_grammar_and_text_around_them_is_free(
    tokenizer: tuple[Any, llguidance.LLTokenizer],
) -> None:
    grammar = call_grammar(JSON_TOOLS, (LS,), (("exec", {"syntax": "lark", "definition": EXEC}),))
    assert grammar is not None
    lark = to_llguidance(grammar)
    assert llguidance.LLMatcher.validate_grammar(lark) == ""
    ls = "<tool_call>\n" + json.dumps({"name": "ls", "arguments": {"p": 1}}) + "\n</tool_call>"
    good = [
        "Just an answer.",
        "Running it."
        + exec_call('// @exec: {"yield_time_ms": 10}\nconsole.log("hi")')
        + "\n</tool_call>",
        ls + " Then " + exec_call("text('ok')") + "\n</tool_call>",
    ]
    bad = [
        exec_call("") + "\n</tool_call>",  # SOURCE is one character or more
        "<tool_call>\n"
        + json.dumps({"name": "rm", "arguments": {}})
        + "\n</tool_call>",  # no such tool
        "<tool_call>\n"
        + '{"name": "exec", "arguments": {"input": "a\nb"}}'
        + "\n</tool_call>",  # raw newline
    ]
    for text in good:
        assert accepts(tokenizer, lark, text), text
    for text in bad:
        assert not accepts(tokenizer, lark, text), text


def test_a_regex_tool_and_formats_that_need_no_grammar(
    tokenizer: tuple[Any, llguidance.LLTokenizer],
) -> None:
    regex = {"syntax": "regex", "definition": r"[0-9]+(\.[0-9]+)?"}
    grammar = call_grammar(JSON_TOOLS, (), (("calc", regex),))
    assert grammar is not None
    lark = to_llguidance(grammar)

    def calc(text: str) -> str:
        return "<tool_call>\n" + json.dumps({"name": "calc", "arguments": {"input": text}})

    assert accepts(tokenizer, lark, calc("3.25") + "\n</tool_call>")
    assert not accepts(tokenizer, lark, calc("3.x") + "\n</tool_call>")
    # a format mlxd cannot constrain, or no grammar to hold to: nothing is constrained
    assert (
        call_grammar(Markers(None, ("[TOOL_CALLS]", ""), "mistral"), (), (("calc", regex),)) is None
    )
    assert call_grammar(JSON_TOOLS, (LS,), ()) is None
