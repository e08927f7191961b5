"""``/v1/embeddings`` through the official client: the bundled all-MiniLM-L6-v2
served beside a chat model by one daemon."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from api.encoder import Encoder
from api.openai.embeddings import EmbeddingRequest, _dimensions
from config.settings import BUNDLED_EMBED, ModelConfig
from scheduler.errors import InvalidRequest
from tests.conftest import TLS, running, settings_for
from tests.test_embedder import token_ids

SIMILAR = ["A cat sits on the mat.", "A kitten is lying on the rug."]
UNRELATED = "Stock prices fell sharply today."
CHAT: Any = [{"role": "user", "content": "Say something."}]


def cos(a: Any, b: Any) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


async def test_embeddings_beside_a_chat_model(
    minilm_dir: Path, tiny_dir: Path, model_cache: Path
) -> None:
    settings = settings_for(
        model_cache,
        ModelConfig("tiny", str(tiny_dir)),
        ModelConfig("all-minilm-l6-v2", BUNDLED_EMBED),
    )
    async with running(settings) as daemon, daemon.client() as client:
        models = {m.id: m.model_dump()["type"] for m in (await client.models.list()).data}
        assert models == {"tiny": "llm", "all-minilm-l6-v2": "embeddings"}

        texts = [*SIMILAR, UNRELATED]
        floats = await client.embeddings.create(
            model="all-minilm-l6-v2", input=texts, encoding_format="float"
        )
        vectors = np.array([d.embedding for d in floats.data])
        assert [d.index for d in floats.data] == [0, 1, 2]
        assert vectors.shape == (3, 384)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
        assert cos(vectors[0], vectors[1]) > cos(vectors[0], vectors[2]) + 0.4

        ids = token_ids(minilm_dir, texts)
        assert floats.usage.prompt_tokens == floats.usage.total_tokens == sum(map(len, ids))

        # The client asks for base64 unless told otherwise, and decodes it.
        packed = await client.embeddings.create(model="all-minilm-l6-v2", input=texts)
        np.testing.assert_allclose(np.array([d.embedding for d in packed.data]), vectors, atol=0)

        by_ids = await client.embeddings.create(model="all-minilm-l6-v2", input=ids[2])
        np.testing.assert_allclose(by_ids.data[0].embedding, vectors[2], atol=1e-5)
        one = await client.embeddings.create(model="all-minilm-l6-v2", input=UNRELATED)
        np.testing.assert_allclose(one.data[0].embedding, vectors[2], atol=1e-5)
        same = await client.embeddings.create(
            model="all-minilm-l6-v2", input=UNRELATED, dimensions=384
        )
        assert len(same.data[0].embedding) == 384

        chat = await client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=3)
        assert chat.choices[0].finish_reason == "length"

        refusals: list[tuple[Any, str | None, str]] = [
            (
                client.chat.completions.create(model="all-minilm-l6-v2", messages=CHAT),
                "model",
                "embedding model",
            ),
            (client.embeddings.create(model="tiny", input="x"), "model", "chat model"),
            (
                client.embeddings.create(model="all-minilm-l6-v2", input="x", dimensions=128),
                "dimensions",
                "384",
            ),
            (
                # what LangChain's OpenAIEmbeddings sends by default: OpenAI's token ids
                client.embeddings.create(model="all-minilm-l6-v2", input=[[101, 100_256, 102]]),
                "input",
                "check_embedding_ctx_length=False",
            ),
            (
                client.embeddings.create(model="all-minilm-l6-v2", input="word " * 600),
                "input",
                "512",
            ),
        ]
        for call, param, words in refusals:
            with pytest.raises(openai.BadRequestError) as info:
                await call
            body = info.value.body
            assert isinstance(body, dict) and body["param"] == param, body
            assert words in body["message"], body
        assert isinstance(body, dict) and body["code"] == "context_length_exceeded"

        async with httpx.AsyncClient(timeout=30, verify=TLS) as http:
            metrics = (await http.get(f"{daemon.url}/metrics")).text
        assert (
            'mlxd_requests_total{client="other",endpoint="/v1/embeddings",'
            'model="all-minilm-l6-v2",status="200"}' in metrics
        )
        assert 'mlxd_prompt_tokens_total{client="other",model="all-minilm-l6-v2"}' in metrics


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "x"}, "model"),
        ({"model": "m", "input": ""}, "input"),
        ({"model": "m", "input": []}, "input"),
        ({"model": "m", "input": ["a", ""]}, "input"),
        ({"model": "m", "input": [[1, 2], []]}, "input"),
        ({"model": "m", "input": [1, -2]}, "input"),
        ({"model": "m", "input": ["a", [1]]}, "input"),
        ({"model": "m", "input": [True]}, "input"),
        ({"model": "m", "input": ["a"] * 2049}, "input"),
        ({"model": "m", "input": "a", "dimensions": 0}, "dimensions"),
        ({"model": "m", "input": "a", "encoding_format": "int8"}, "encoding_format"),
    ],
)
def test_bad_embedding_requests_name_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        EmbeddingRequest.from_openai(body)
    assert info.value.param == param


def test_inputs_of_every_shape() -> None:
    def inputs(value: Any) -> Any:
        return EmbeddingRequest.from_openai({"model": "m", "input": value}).input

    assert inputs("a") == ("a",)
    assert inputs(["a", "b"]) == ("a", "b")
    assert inputs([1, 2]) == ((1, 2),)
    assert inputs([[1], [2, 3]]) == ((1,), (2, 3))


def test_only_matryoshka_models_give_fewer_dimensions(minilm_dir: Path) -> None:
    encoder = Encoder(minilm_dir, None)
    assert (encoder.dims, encoder.max_context, encoder.matryoshka) == (384, 512, False)
    assert _dimensions(encoder, None, "m") == _dimensions(encoder, 384, "m") == 384
    with pytest.raises(InvalidRequest, match="only 384"):
        _dimensions(encoder, 128, "m")
    encoder.matryoshka = True  # as Qwen3-Embedding's
    assert _dimensions(encoder, 128, "m") == 128
    with pytest.raises(InvalidRequest, match="at most 384"):
        _dimensions(encoder, 512, "m")
