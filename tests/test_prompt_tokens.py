"""Chat prompts tokenized from where they depart from an earlier one
(api/prompt_tokens.py): always the same tokens as tokenizing them whole,
with SmolLM2's tokenizer and with added tokens of the agent's, and a
follow-up turn costs only its new text."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from api.prompt_tokens import PromptTokens
from api.texts import Texts
from tests.scripted import agent_tokenizer

PIECES = [*"ab cé9\n\t<>|_/", "😀", "<think>", "</think>", "<|im_end|>", "<|im_start|>"]
WORDS = st.lists(st.sampled_from(PIECES), max_size=30).map("".join)  # added tokens among them


@pytest.fixture(scope="module")
def agent(smollm2_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory) -> Texts:
    out = agent_tokenizer(smollm2_tokenizer, tmp_path_factory.mktemp("agent") / "m")
    shutil.copy(smollm2_tokenizer / "config.json", out / "config.json")
    return Texts(out, None)


class Counting:
    """A tokenizer that notes how many characters it was given."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self.characters = 0

    def encode(self, text: str, **kwargs: Any) -> Any:
        self.characters += len(text)
        return self._tokenizer.encode(text, **kwargs)

    def get_added_tokens_decoder(self) -> Any:
        return self._tokenizer.get_added_tokens_decoder()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(turns=st.lists(WORDS, min_size=1, max_size=6), edit=st.integers(0, 5), new=WORDS)
def test_the_tokens_are_those_of_the_whole_text(
    agent: Texts, turns: list[str], edit: int, new: str
) -> None:
    prompts = PromptTokens(agent.backend)
    messages: list[dict[str, Any]] = []
    for i, said in enumerate(turns):  # a conversation that grows turn by turn
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": said})
        text = agent.render(messages)
        assert prompts.encode(text) == agent.backend.encode(text, add_special_tokens=False).ids
    # an earlier turn edited, and a new one: a prompt that departs in the middle
    messages[min(edit, len(messages) - 1)]["content"] += new
    text = agent.render(messages)
    assert prompts.encode(text) == agent.backend.encode(text, add_special_tokens=False).ids


def test_a_follow_up_turn_is_tokenized_from_where_it_is_new(agent: Texts) -> None:
    counting = Counting(agent.backend)
    prompts = PromptTokens(counting)  # type: ignore[arg-type]
    system = {"role": "system", "content": "You are a careful coding agent. " * 300}
    first = [system, {"role": "user", "content": "Read main.py."}]
    prompts.encode(agent.render(first))
    before = counting.characters
    follow = [*first, {"role": "assistant", "content": "Done."}]
    follow.append({"role": "user", "content": "Now the tests."})
    text = agent.render(follow)
    assert prompts.encode(text) == agent.encode(text)
    assert counting.characters - before < 200 < len(text)  # the new turns, not the system prompt


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(turns=st.lists(WORDS, min_size=1, max_size=6), where=st.floats(0, 1))
def test_the_tokens_before_a_place_are_those_of_the_whole_text(
    agent: Texts, turns: list[str], where: float
) -> None:
    prompts = PromptTokens(agent.backend)
    roles = ["user", "assistant"]
    text = agent.render([{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)])
    prompts.encode(text)
    end = round(where * len(text))
    offsets = agent.backend.encode(text, add_special_tokens=False).offsets
    assert prompts.before(text, end) == sum(1 for _, stop in offsets if stop <= end)


def test_the_tokens_before_a_cache_mark_cost_only_its_turn(agent: Texts) -> None:
    counting = Counting(agent.backend)
    prompts = PromptTokens(counting)  # type: ignore[arg-type]
    system = {"role": "system", "content": "You are a careful coding agent. " * 300}
    text = agent.render([system, {"role": "user", "content": "Read main.py."}])
    prompts.encode(text)
    before = counting.characters
    end = text.index("Read main.py.") + len("Read main.py.")
    assert prompts.before(text, end) == len(agent.encode(text[:end]))
    assert counting.characters - before < 100 < len(text)  # the user turn, not the system prompt
