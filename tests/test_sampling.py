"""Sampling details and structured output through the official client, with the
tiny model's real logits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import pydantic
import pytest
import trio
from openai.types.chat import ChatCompletionMessageParam
from openai.types.responses import ResponseFormatTextJSONSchemaConfigParam
from tokenizers import Tokenizer

from tests.conftest import Daemon

CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say something"}]


@pytest.fixture(scope="module")
def tiny(shared_tiny: Daemon) -> Daemon:
    """One daemon for this module: its tests only send requests and read answers."""
    return shared_tiny


class Verdict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    answer: Literal["yes", "no", "maybe"]
    sure: bool


async def test_chat_logprobs_match_the_tokens_and_greedy_picks_the_top(tiny: Daemon) -> None:
    async with tiny.client() as client:
        reply = await client.chat.completions.create(
            model="tiny", messages=CHAT, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
        )
    lp = reply.choices[0].logprobs
    assert lp is not None and lp.content is not None and reply.usage is not None
    assert len(lp.content) == reply.usage.completion_tokens == 6
    assert "".join(e.token for e in lp.content) == reply.choices[0].message.content
    for entry in lp.content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy takes the most likely
        assert entry.logprob <= 0 and entry.bytes == list(entry.token.encode())


async def test_completion_logprobs_in_the_legacy_shape(tiny: Daemon) -> None:
    async with tiny.client() as client:
        reply = await client.completions.create(
            model="tiny", prompt="Once", max_tokens=5, temperature=0, logprobs=2
        )
        stream = await client.completions.create(
            model="tiny", prompt="Once", max_tokens=5, temperature=0, logprobs=2, stream=True
        )
        streamed = [c.choices[0].logprobs async for c in stream if c.choices[0].logprobs]
    lp = reply.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.top_logprobs is not None
    assert len(lp.tokens) == len(lp.token_logprobs or []) == 5
    assert all(len(top) <= 2 for top in lp.top_logprobs)
    assert "".join(lp.tokens) == reply.choices[0].text
    assert lp.text_offset is not None and lp.text_offset[0] == 0
    assert [t for s in streamed for t in s.tokens or []] == lp.tokens


async def test_logit_bias_bans_the_greedy_token(tiny: Daemon, tiny_dir: Path) -> None:
    async with tiny.client() as client:
        first = await client.completions.create(
            model="tiny", prompt="Once", max_tokens=1, temperature=0
        )
        greedy = first.choices[0].text
        (token_id,) = (
            Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
            .encode(greedy, add_special_tokens=False)
            .ids
        )
        banned = await client.completions.create(
            model="tiny",
            prompt="Once",
            max_tokens=1,
            temperature=0,
            logit_bias={str(token_id): -100},
        )
    assert banned.choices[0].text != greedy


async def test_frequency_penalty_changes_a_repetitive_greedy_output(tiny: Daemon) -> None:
    async with tiny.client() as client:
        plain = await client.completions.create(
            model="tiny", prompt="Go", max_tokens=40, temperature=0
        )
        penalised = await client.completions.create(
            model="tiny", prompt="Go", max_tokens=40, temperature=0, frequency_penalty=2.0
        )
    assert penalised.choices[0].text != plain.choices[0].text


async def test_structured_output_parses_and_validates(tiny: Daemon) -> None:
    schema_format: ResponseFormatTextJSONSchemaConfigParam = {
        "type": "json_schema",
        "name": "verdict",
        "schema": Verdict.model_json_schema(),
        "strict": True,
    }
    async with tiny.client() as client:
        parsed = await client.chat.completions.parse(
            model="tiny", messages=CHAT, response_format=Verdict, max_tokens=60, temperature=0
        )
        sampled: list[str] = []

        async def respond(seed: int) -> None:  # concurrent: the batched path
            response = await client.responses.create(
                model="tiny",
                input="Judge it",
                max_output_tokens=60,
                temperature=1.0,
                extra_body={"seed": seed},
                text={"format": schema_format},
            )
            sampled.append(response.output_text)

        async with trio.open_nursery() as nursery:
            for seed in range(4):
                nursery.start_soon(respond, seed)
    verdict = parsed.choices[0].message.parsed
    assert isinstance(verdict, Verdict)
    assert parsed.choices[0].finish_reason == "stop"
    assert len(sampled) == 4
    for text in sampled:
        Verdict.model_validate(json.loads(text))


async def test_json_object_mask_wins_over_logit_bias(tiny: Daemon, tiny_dir: Path) -> None:
    # Left alone, the random model writes one endless string. Biased towards
    # quotes and braces it would write nothing but those; the mask lets
    # through only the ones that keep the JSON valid, which closes it.
    tokenizer = Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    bias = {'"': 100, "}": 50}  # a quote wherever one fits, else a brace
    closing: dict[str, int] = {str(tokenizer.token_to_id(c)): b for c, b in bias.items()}
    async with tiny.client() as client:
        stream = await client.chat.completions.create(
            model="tiny",
            messages=CHAT,
            response_format={"type": "json_object"},
            logit_bias=closing,
            max_tokens=50,
            temperature=0,
            stream=True,
        )
        chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop", text
    assert isinstance(json.loads(text), dict)
