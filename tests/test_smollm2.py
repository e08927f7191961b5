"""The real instruction-tuned model, converted by mlxd, through the official client."""

from collections.abc import Iterator
from pathlib import Path

import pytest
from openai.types.chat import ChatCompletionMessageParam
from transformers import AutoTokenizer

from config.settings import BUNDLED
from tests.conftest import Daemon, serve_process

ASKED = "What is the capital of France?"
QUESTION: list[ChatCompletionMessageParam] = [{"role": "user", "content": ASKED}]


@pytest.fixture(scope="module")
def smol(
    smollm2_dir: Path, model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Daemon]:
    """One daemon for this module's tests, which only send requests and read
    answers; the model is the one ``smollm2_dir`` converted into the cache."""
    work = tmp_path_factory.mktemp("smol")
    with serve_process(work, {"name": "smollm2", "path": BUNDLED}, cache_dir=model_cache) as d:
        yield d


def _tokenizer(smollm2_dir: Path):
    return AutoTokenizer.from_pretrained(str(smollm2_dir), local_files_only=True)


async def test_answers_paris(smol: Daemon, smollm2_dir: Path) -> None:
    async with smol.client() as client:
        reply = await client.chat.completions.create(
            model="smollm2", messages=QUESTION, temperature=0, max_tokens=30
        )
    content = reply.choices[0].message.content
    assert content is not None and "Paris" in content
    assert reply.choices[0].finish_reason == "stop"
    tok = _tokenizer(smollm2_dir)
    prompt = tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == len(tok.encode(prompt, add_special_tokens=False))
    assert reply.usage.completion_tokens == len(tok.encode(content, add_special_tokens=False))


async def test_streams_paris(smol: Daemon) -> None:
    pieces, finish, usage = [], None, None
    async with smol.client() as client:
        stream = await client.chat.completions.create(
            model="smollm2",
            messages=QUESTION,
            temperature=0,
            max_tokens=30,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                usage = chunk.usage
    assert "Paris" in "".join(pieces)
    assert len([p for p in pieces if p]) > 1  # really streamed, piece by piece
    assert finish == "stop"
    assert usage is not None and usage.prompt_tokens > 30


async def test_answers_paris_through_the_responses_api(smol: Daemon) -> None:
    async with smol.client() as client:
        reply = await client.responses.create(
            model="smollm2", input=ASKED, temperature=0, max_output_tokens=30
        )
        chat = await client.chat.completions.create(
            model="smollm2", messages=QUESTION, temperature=0, max_tokens=30
        )
        async with client.responses.stream(
            model="smollm2", input=ASKED, temperature=0, max_output_tokens=30
        ) as stream:
            streamed = await stream.get_final_response()  # needs response.completed
    assert reply.status == streamed.status == "completed"
    assert "Paris" in reply.output_text
    assert streamed.output_text == reply.output_text
    assert reply.output_text == chat.choices[0].message.content  # the same answer
    assert reply.usage is not None and chat.usage is not None
    assert reply.usage.input_tokens == chat.usage.prompt_tokens
