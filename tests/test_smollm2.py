"""The real instruction-tuned model, converted by mlxd, through the official client."""

from collections.abc import Iterator
from pathlib import Path

import pytest
from openai.types.chat import ChatCompletionMessageParam
from transformers import AutoTokenizer

from api.catalog import Catalog
from api.generation import prepare
from api.record import Record
from api.schemas import ChatRequest
from config.settings import BUNDLED, ModelConfig, Settings
from runner.protocol import Sampling
from scheduler.metrics import Metrics
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


async def test_what_a_request_leaves_out_it_samples_as_the_model_card_says(
    smollm2_dir: Path, tmp_path: Path
) -> None:
    """The bundled model's sampling settings (a GGUF has none: mlxd writes its
    model card's) are what a request that leaves them out gets."""
    settings = Settings(models=(ModelConfig("smollm2", BUNDLED),), cache_dir=tmp_path)

    async def model_dir(_: ModelConfig) -> Path:
        return smollm2_dir

    catalog = Catalog(settings, model_dir)
    asked = {"model": "smollm2", "messages": QUESTION}
    left_out = await prepare(catalog, ChatRequest.from_openai(asked), record())
    assert left_out.request.sampling == Sampling(temperature=0.2, top_p=0.9)
    given = ChatRequest.from_openai(asked | {"temperature": 1.0, "top_k": 5})
    assert (await prepare(catalog, given, record())).request.sampling == Sampling(1.0, 0.9, 5)


def record() -> Record:
    return Record("req_test", "/v1/chat/completions", Metrics())
