"""``POST /v1/embeddings``: the request, validated once, and its answer.

Inputs are tokenized here (the runner sees token ids only) and checked before
the model is leased, so a bad request costs no load: empty inputs, ids outside
the vocabulary, an input longer than the model reads, a ``dimensions`` the
model cannot give. The model is then leased like any other (queue, limits,
memory, metrics: an embedding model reserves no KV), and its runner embeds
all the inputs in one command.

Token-id inputs go to the model as they are, as OpenAI and vLLM take them:
they should hold the model's special tokens where it wants them (a BERT
model's [CLS] and [SEP]), as tokenizing the text would add.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Mapping
from typing import Any

import attrs
import numpy as np
import trio

from api.catalog import Catalog
from api.encoder import Encoder
from api.pool import Pool
from api.record import Record
from api.schemas import json_object, keep_alive_field
from runner.errors import RunnerError
from scheduler.errors import ContextLengthExceeded, InvalidRequest, RunnerCrashed

MAX_INPUTS = 2048  # OpenAI's limit
FORMATS = ("float", "base64")


@attrs.frozen
class EmbeddingRequest:
    model: str
    input: tuple[str, ...] | tuple[tuple[int, ...], ...]
    dimensions: int | None = None
    encoding_format: str = "float"
    keep_alive_s: float | None = None

    @classmethod
    def from_openai(cls, body: Any) -> EmbeddingRequest:
        body = json_object(body)
        model = body.get("model")
        if not isinstance(model, str):
            raise InvalidRequest("'model' is required: a model name", param="model")
        dims = body.get("dimensions")
        if dims is not None and (isinstance(dims, bool) or not isinstance(dims, int) or dims < 1):
            raise InvalidRequest(
                f"'dimensions' must be an integer >= 1, got {dims!r}", param="dimensions"
            )
        fmt = body.get("encoding_format")
        if fmt is not None and fmt not in FORMATS:
            raise InvalidRequest(
                f"'encoding_format' must be 'float' or 'base64', got {fmt!r}",
                param="encoding_format",
            )
        return cls(model, _inputs(body), dims, fmt or "float", keep_alive_field(body))


def _inputs(body: Mapping[str, Any]) -> tuple[str, ...] | tuple[tuple[int, ...], ...]:
    """A string, a list of strings, a list of token ids, or a list of lists of
    token ids; none of them empty, at most ``MAX_INPUTS``."""
    raw = body.get("input")
    expected = (
        "'input' must be a non-empty string, a list of non-empty strings, a list of "
        "token ids or a list of lists of token ids"
    )
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise InvalidRequest(expected, param="input")
    if all(_is_id(t) for t in raw):
        raw = [raw]
    if len(raw) > MAX_INPUTS:
        raise InvalidRequest(f"'input' may hold at most {MAX_INPUTS} inputs", param="input")
    if all(isinstance(t, str) for t in raw):
        if not all(raw):
            raise InvalidRequest("'input' must not hold an empty string", param="input")
        return tuple(raw)
    if all(isinstance(t, list) and t and all(_is_id(i) for i in t) for t in raw):
        return tuple(tuple(t) for t in raw)
    raise InvalidRequest(expected, param="input")


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


async def embed(
    catalog: Catalog, scheduler: Pool, req: EmbeddingRequest, record: Record
) -> dict[str, Any]:
    """The response body for ``req``, in OpenAI's shape."""
    name = catalog.get(req.model).name
    record.model = name
    await catalog.require(name, "embed")
    encoder = await catalog.encoder(name)
    dims = _dimensions(encoder, req.dimensions, name)
    inputs = await _token_ids(encoder, req)
    record.tokens.prompt = tokens = sum(len(ids) for ids in inputs)
    asked = time.monotonic()
    record.queued()
    async with scheduler.lease(name, req.keep_alive_s, client=record.client.who) as runner:
        record.granted(time.monotonic() - asked, 0)
        try:
            vectors = await runner.embed(inputs)
        except RunnerError as e:
            raise RunnerCrashed(e.message) from e
    if dims < vectors.shape[1]:  # a Matryoshka model's prefix, made unit length again
        vectors = vectors[:, :dims]
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": _encoded(v, req.encoding_format)}
            for i, v in enumerate(vectors)
        ],
        "model": name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _dimensions(encoder: Encoder, wanted: int | None, name: str) -> int:
    if wanted is None or wanted == encoder.dims:
        return encoder.dims
    if encoder.matryoshka and wanted < encoder.dims:
        return wanted
    allowed = f"at most {encoder.dims}" if encoder.matryoshka else f"only {encoder.dims}"
    raise InvalidRequest(
        f"model {name!r} gives vectors of {encoder.dims} dimensions; 'dimensions' may be "
        f"{allowed}, got {wanted}",
        param="dimensions",
    )


async def _token_ids(encoder: Encoder, req: EmbeddingRequest) -> list[list[int]]:
    if req.input and isinstance(req.input[0], str):
        texts = [t for t in req.input if isinstance(t, str)]
        inputs = await trio.to_thread.run_sync(encoder.encode, texts)
    else:
        inputs = [list(t) for t in req.input if not isinstance(t, str)]
        top = max(max(ids) for ids in inputs)
        if top >= encoder.vocabulary:
            raise InvalidRequest(
                f"token id {top} is outside this model's vocabulary ({encoder.vocabulary} "
                "tokens): token ids must be the model's own. Send text instead (LangChain's "
                "OpenAIEmbeddings tokenizes with OpenAI's tokenizer unless it is made with "
                "check_embedding_ctx_length=False)",
                param="input",
            )
    longest = max(range(len(inputs)), key=lambda i: len(inputs[i]))
    if len(inputs[longest]) > encoder.max_context:
        raise ContextLengthExceeded(
            f"this model reads at most {encoder.max_context} tokens; input {longest} has "
            f"{len(inputs[longest])} tokens",
            param="input",
        )
    return inputs


def _encoded(vector: np.ndarray, fmt: str) -> list[float] | str:
    if fmt == "base64":  # little-endian float32, as OpenAI sends them
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    return [float(x) for x in vector]
