"""Detokenizing streams and cutting at stop strings."""

import json
import shutil
from pathlib import Path

import pytest

from api.texts import Texts, TextStream, texts_of
from tests.scripted import agent_tokenizer


@pytest.fixture(scope="module")
def texts(smollm2_dir: Path) -> Texts:
    return Texts(smollm2_dir, None)


def run(stream: TextStream, ids: list[int]) -> tuple[str, bool]:
    out = "".join(stream.feed(t) for t in ids)
    if not stream.stopped:
        out += stream.flush()
    return out, stream.stopped


def test_stream_equals_whole_decode_with_multibyte_text(texts: Texts) -> None:
    sample = "Grüße, 東京! 🎉 naïve café — 12345"
    ids = texts.encode(sample)
    out, stopped = run(texts.text_stream([]), ids)
    assert out == sample and not stopped


def test_stop_string_spanning_tokens_is_cut_and_never_shown(texts: Texts) -> None:
    ids = texts.encode("The answer is forty-two. END of story")
    stream = texts.text_stream(["END"])
    shown = []
    for t in ids:
        shown.append(stream.feed(t))
        assert "E" not in "".join(shown)[len("The answer is forty-two. ") :]
        if stream.stopped:
            break
    assert "".join(shown) == "The answer is forty-two. "
    assert stream.stopped


def test_held_back_prefix_is_released_when_it_is_not_a_stop(texts: Texts) -> None:
    out, stopped = run(texts.text_stream(["</done>"]), texts.encode("a </do not stop"))
    assert out == "a </do not stop" and not stopped


def test_earliest_of_several_stops_wins(texts: Texts) -> None:
    out, stopped = run(texts.text_stream(["world", "lo"]), texts.encode("hello world"))
    assert out == "hel" and stopped


def test_chat_prompt_uses_the_template_and_context_comes_from_config(texts: Texts) -> None:
    ids = texts.chat_prompt([{"role": "user", "content": "hi"}])
    text = texts.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    assert texts.max_context == 8192
    assert texts.stop_ids == (2,)


def test_whether_a_template_renders_tools_is_known(
    texts: Texts, smollm2_dir: Path, tmp_path: Path
) -> None:
    assert not texts.renders_tools  # SmolLM2's template has no place for tools
    agent_dir = agent_tokenizer(smollm2_dir, tmp_path / "agent")
    shutil.copy(smollm2_dir / "config.json", agent_dir / "config.json")
    agent = Texts(agent_dir, None)
    assert agent.renders_tools


def test_the_stop_string_that_ended_the_text_is_named(texts: Texts) -> None:
    stream = TextStream(texts.backend, ["lazy", "fox"])
    for token in texts.encode("The quick brown fox jumps over the lazy dog"):
        stream.feed(token)
    assert stream.stopped and stream.matched == "fox"


def test_a_directory_is_loaded_once_until_its_files_change(
    smollm2_dir: Path, tmp_path: Path
) -> None:
    model = agent_tokenizer(smollm2_dir, tmp_path / "model")
    shutil.copy(smollm2_dir / "config.json", model / "config.json")
    first = texts_of(model, None)
    assert texts_of(model, None) is first  # a second model on the same files
    assert texts_of(model, 1024).max_context == 1024 != first.max_context
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}[{{ m.content }}]{% endfor %}"
    (model / "tokenizer_config.json").write_text(json.dumps(config))  # rewritten
    again = texts_of(model, None)
    assert again is not first
    assert again.backend.decode(again.chat_prompt([{"role": "user", "content": "hi"}])) == "[hi]"
