"""The OpenAI routes (``/v1/...``): models, chat completions, completions,
responses (and the stored ones), embeddings. Each generating route reads and
validates its request, prepares it, and hands a generation and its endpoint's
shaper to the one answer driver; embeddings answer whole (``api/openai/embeddings.py``)."""

from __future__ import annotations

from typing import Any

from quart import Blueprint, Response, g, request

from api.catalog import Catalog
from api.generation import Generation, count_prompt, prepare
from api.http import accounted, json_body, json_response, validated
from api.openai.chat import ChatShaper, CompletionShaper
from api.openai.embeddings import EmbeddingRequest, embed
from api.openai.pages import page
from api.openai.responses import ResponseShaper, chat_request
from api.openai.seal import Sealer
from api.openai.store import ResponseStore
from api.openai.turns import Turn
from api.pool import Pool
from api.schemas import ChatRequest, CompletionRequest, json_object
from api.stalls import Stalls
from api.stream import answer
from scheduler.errors import ModelLoadFailed


def blueprint(
    catalog: Catalog, scheduler: Pool, stalls: Stalls, store: ResponseStore, sealer: Sealer
) -> Blueprint:
    bp = Blueprint("openai", __name__)

    async def model_card(name: str) -> dict[str, Any]:
        """OpenAI's model object, with ``type`` (as LM Studio names them):
        "llm" for a chat model, "vlm" for one that takes images too,
        "embeddings" for an embedding model; and ``capabilities`` (as Ollama
        names them): "completion", "vision", "embedding"."""
        try:
            capabilities = await catalog.capabilities(name)
        except ModelLoadFailed:  # its files are missing: its requests will say so
            capabilities = ["completion"]
        kind = "embeddings" if "embedding" in capabilities else "llm"
        kind = "vlm" if "vision" in capabilities else kind
        card = {"id": name, "object": "model", "created": 0, "owned_by": "mlxd"}
        return card | {"type": kind, "capabilities": capabilities}

    @bp.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [await model_card(name) for name in catalog.models]}

    @bp.get("/v1/models/<path:name>")
    async def get_model(name: str) -> dict[str, Any]:
        return await model_card(catalog.get(name).name)

    @bp.post("/v1/embeddings")
    @accounted
    async def embeddings() -> Response:
        req = await validated(EmbeddingRequest.from_openai, await json_body())
        return json_response(await embed(catalog, scheduler, req, g.record))

    @bp.post("/v1/chat/completions")
    @accounted
    async def chat_completions() -> Response:
        req = await validated(ChatRequest.from_openai, await json_body())
        job = await prepare(catalog, req, g.record)
        return await answer(Generation(scheduler, job), job, ChatShaper(job), stalls)

    @bp.post("/v1/completions")
    @accounted
    async def completions() -> Response:
        req = await validated(CompletionRequest.from_openai, await json_body())
        job = await prepare(catalog, req, g.record)
        return await answer(Generation(scheduler, job), job, CompletionShaper(job), stalls)

    @bp.post("/v1/responses")
    @accounted
    async def responses() -> Response:
        body = json_object(await json_body())
        turn = Turn.read(body, store, g.owner)
        req, tools = await validated(chat_request, body, turn, sealer)
        job = await prepare(catalog, req, g.record)
        keep = turn.keeper(store, g.owner)
        shaper = ResponseShaper(job.model, req, body, job.record.tokens, keep, tools, sealer)
        return await answer(Generation(scheduler, job), job, shaper, stalls)

    @bp.post("/v1/responses/input_tokens")
    async def response_input_tokens() -> dict[str, Any]:
        body = json_object(await json_body())
        req, _ = await validated(chat_request, body, Turn.read(body, store, g.owner), sealer)
        count = await count_prompt(catalog, req)
        return {"object": "response.input_tokens", "input_tokens": count}

    @bp.get("/v1/responses/<response_id>")
    async def get_response(response_id: str) -> dict[str, Any]:
        return store.get(g.owner, response_id).response

    @bp.delete("/v1/responses/<response_id>")
    async def delete_response(response_id: str) -> dict[str, Any]:
        store.delete(g.owner, response_id)
        return {"id": response_id, "object": "response.deleted", "deleted": True}

    @bp.get("/v1/responses/<response_id>/input_items")
    async def input_items(response_id: str) -> dict[str, Any]:
        items = store.get(g.owner, response_id).input_items
        return page(items, request.args)

    return bp
