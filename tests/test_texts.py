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


# A template in the manner of Mistral's: the first system turn goes into the
# first user turn; after it, only alternating user and assistant turns.
ALTERNATING = """\
{%- if messages[0].role == "system" -%}
{%- set system = messages[0].content + "\\n\\n" -%}{%- set messages = messages[1:] -%}
{%- else -%}{%- set system = "" -%}{%- endif -%}
{%- for m in messages -%}
{%- if m.role not in ("user", "assistant") -%}
{{ raise_exception("only user and assistant roles, after one system message") }}
{%- endif -%}
<{{ m.role }}>{% if loop.first %}{{ system }}{% endif %}{{ m.content }}</{{ m.role }}>
{%- endfor -%}
{%- if add_generation_prompt %}<assistant>{% endif -%}"""


def with_template(smollm2_dir: Path, out: Path, template: str) -> Texts:
    model = agent_tokenizer(smollm2_dir, out)
    shutil.copy(smollm2_dir / "config.json", model / "config.json")
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    return Texts(model, None)


CLAUDE_CODE_TURNS = [
    {"role": "system", "content": "You are an agent."},
    {"role": "user", "content": "<reminder>"},
    {"role": "system", "content": "# Environment"},
    {"role": "user", "content": "Write a note."},
]


def test_a_system_turn_mid_conversation_is_rendered_where_it_stands(texts: Texts) -> None:
    assert texts.places_system  # ChatML writes any role anywhere
    text = texts.render(CLAUDE_CODE_TURNS)
    assert text.index("<reminder>") < text.index("<|im_start|>system\n# Environment")
    assert text.index("# Environment") < text.index("Write a note.")


def test_a_template_that_cannot_place_it_gets_it_in_the_user_turn_beside_it(
    smollm2_dir: Path, tmp_path: Path
) -> None:
    strict = with_template(smollm2_dir, tmp_path / "strict", ALTERNATING)
    assert not strict.places_system
    # in its place, after the turn it followed (never moved to the front); the
    # user turns that meet are joined, so that the roles alternate
    assert strict.render(CLAUDE_CODE_TURNS) == (
        "<user>You are an agent.\n\n<reminder>\n\n# Environment\n\nWrite a note.</user><assistant>"
    )
    # one after an assistant's turn goes into the next user turn
    later = [*CLAUDE_CODE_TURNS[:2], {"role": "assistant", "content": "ok"}]
    later += [{"role": "system", "content": "Note."}, {"role": "user", "content": "Go on."}]
    assert strict.render(later).endswith(
        "<assistant>ok</assistant><user>Note.\n\nGo on.</user><assistant>"
    )


def test_the_tokens_up_to_a_cache_mark_are_counted(texts: Texts) -> None:
    turns = [{"role": "system", "content": "Rules."}, {"role": "user", "content": "Hello there"}]
    text = texts.render(turns)
    ids = texts.encode(text)
    upto = texts.marked(text, ["Rules."])
    assert texts.backend.decode(ids[:upto]).endswith("Rules.")
    assert texts.marked(text, ["Hello there"]) > upto
    assert texts.marked(text, ["not in the prompt"]) == 0


def test_sampling_left_out_comes_from_the_models_generation_config(
    smollm2_dir: Path, tmp_path: Path
) -> None:
    model = agent_tokenizer(smollm2_dir, tmp_path / "m")
    shutil.copy(smollm2_dir / "config.json", model / "config.json")
    (model / "generation_config.json").write_text(
        json.dumps({"temperature": 0.6, "top_p": 0.95, "top_k": 20, "eos_token_id": [2, 7]})
    )
    texts = Texts(model, None)
    assert texts.sampling_defaults == {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
    assert texts.stop_ids == (2, 7)
    (model / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    assert Texts(model, None).sampling_defaults == {"temperature": 0.0}
    (model / "generation_config.json").write_text("[1, 2]")  # not what it should be
    assert Texts(model, None).sampling_defaults == {}
