"""The token pipeline on its own: token lists in, deltas out, with no runner
and no HTTP. The same tokens give the same answer however they are grouped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from api.decoder import Decoder
from api.delta import Delta
from api.reader import Reader
from api.record import Tokens
from api.texts import Texts
from tests.scripted import scripted_model

ANSWER = (
    '<think>Paris, then.</think>\n\nLet me check.<tool_call>\n{"name": "f", '
    '"arguments": {"city": "Paris"}}\n</tool_call>'
)


@pytest.fixture(scope="module")
def texts(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Texts:
    return Texts(scripted_model(tiny_dir, tmp_path_factory.mktemp("agent"), ANSWER), None)


def decoder(
    texts: Texts, *, chat: bool = True, stops: tuple[str, ...] = (), one_call: bool = False
) -> Decoder:
    reader = Reader(texts.markers, parse_calls=True) if chat else None
    return Decoder(texts.text_stream(stops), reader, Tokens(prompt=3), one_call)


def run(d: Decoder, tokens: list[int], size: int, finish: str = "stop") -> tuple[Delta, int]:
    """Feed ``tokens`` ``size`` at a time, taking a delta after each group;
    the deltas added up, and how many were sent."""
    whole, sent = Delta(), 0
    for i in range(0, len(tokens), size):
        for token in tokens[i : i + size]:
            if d.feed(token, {"logprob": -float(token), "top": []}):
                whole += d.finish("stop")
                return whole, sent + 1
        out = d.take()
        if out is not None:
            assert not out.empty
            whole, sent = _add(whole, out), sent + 1
    return _add(whole, d.finish(finish)), sent + 1


def _add(whole: Delta, d: Delta) -> Delta:
    whole += d
    return whole


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_the_answer_does_not_depend_on_how_tokens_are_grouped(texts: Texts, size: int) -> None:
    tokens = texts.encode(ANSWER)
    d = decoder(texts)
    whole, sent = run(d, tokens, size)
    assert whole.reasoning == "Paris, then."
    assert whole.text == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in whole.calls] == [("f", {"city": "Paris"})]
    assert whole.finish == "tool_calls"  # a "stop" that called a tool
    assert [lp["id"] for lp in whole.logprobs] == tokens
    assert [lp["logprob"] for lp in whole.logprobs] == [-float(t) for t in tokens]
    assert d.tokens.generated == len(tokens)
    assert 0 < d.tokens.reasoning < len(tokens)
    assert sent <= len(tokens) // size + 2  # a delta per group at most, and the last


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_a_stop_string_ends_the_answer_and_never_shows(texts: Texts, size: int) -> None:
    tokens = texts.encode("one two STOP three four")
    d = decoder(texts, chat=False, stops=("STOP",))
    whole, _ = run(d, tokens, size, finish="length")
    assert whole.text == "one two "
    assert whole.finish == "stop"
    assert d.tokens.generated < len(tokens)  # nothing after the stop string is fed


def test_a_completion_is_all_content_and_length_stays_length(texts: Texts) -> None:
    tokens = texts.encode("<think>not a block here</think> and <tool_call>")
    d = decoder(texts, chat=False)
    whole, _ = run(d, tokens, 2, finish="length")
    assert whole.text == "<think>not a block here</think> and <tool_call>"
    assert (whole.reasoning, whole.calls, whole.finish) == ("", [], "length")
    assert d.tokens.reasoning == 0


def test_special_tokens_stay_out_of_the_text_but_are_counted(texts: Texts) -> None:
    end = texts.tokenizer.convert_tokens_to_ids("<|im_end|>")
    tokens = [*texts.encode("Hi"), end, *texts.encode(" there")]
    d = decoder(texts, chat=False)
    whole, _ = run(d, tokens, 1)
    assert whole.text == "Hi there"
    assert d.tokens.generated == len(tokens)


def test_what_might_begin_a_stop_string_is_held_until_the_end(texts: Texts) -> None:
    d = decoder(texts, chat=False, stops=("STOP",))
    for token in texts.encode("ST"):
        assert not d.feed(token)
    assert d.take() is None  # nothing decided yet
    last = d.finish("length")
    assert (last.text, last.finish) == ("ST", "length")


@pytest.mark.parametrize("size", [1, 3, 1000])
def test_without_parallel_calls_the_answer_ends_at_its_first_call(texts: Texts, size: int) -> None:
    second = '<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>'
    tokens = texts.encode(ANSWER + second + " and more")
    d = decoder(texts, one_call=True)
    whole, _ = run(d, tokens, size, finish="length")
    assert [c.name for c in whole.calls] == ["f"]
    assert whole.text == "Let me check."  # nothing of what came after the call
    assert whole.finish == "tool_calls"
    assert d.tokens.generated < len(tokens)  # the rest is never generated
    both, _ = run(decoder(texts), tokens, size, finish="length")
    assert [c.name for c in both.calls] == ["f", "g"]
