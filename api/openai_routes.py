"""The OpenAI routes (``/v1/...``): models, chat completions, completions,
responses (and the stored ones), embeddings. Each generating route reads and
validates its request, prepares it, and hands a generation and its endpoint's
shaper to the one answer driver; embeddings answer whole (``api/embeddings.py``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from quart import Blueprint, Response, g, request

from api.catalog import Catalog
from api.conversation import Turn
from api.embeddings import EmbeddingRequest, embed
from api.generation import Generation, count_prompt, prepare
from api.http import accounted, json_body, json_response
from api.responses import ResponseShaper, chat_request
from api.schemas import ChatRequest, CompletionRequest, json_object
from api.shapers import ChatShaper, CompletionShaper
from api.stalls import Stalls
from api.store import ResponseStore
from api.stream import answer
from scheduler.errors import InvalidRequest, ModelLoadFailed
from scheduler.pool import Scheduler


def blueprint(
    catalog: Catalog, scheduler: Scheduler, stalls: Stalls, store: ResponseStore
) -> Blueprint:
    bp = Blueprint("openai", __name__)

    async def model_card(name: str) -> dict[str, Any]:
        """OpenAI's model object, with ``type`` (as LM Studio names them):
        "llm" for a chat model, "embeddings" for an embedding model."""
        try:
            kind = await catalog.kind(name)
        except ModelLoadFailed:  # its files are missing: its requests will say so
            kind = "chat"
        kind_name = "embeddings" if kind == "embed" else "llm"
        return {"id": name, "object": "model", "created": 0, "owned_by": "mlxd", "type": kind_name}

    @bp.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [await model_card(name) for name in catalog.models]}

    @bp.get("/v1/models/<path:name>")
    async def get_model(name: str) -> dict[str, Any]:
        return await model_card(catalog.get(name).name)

    @bp.post("/v1/embeddings")
    @accounted
    async def embeddings() -> Response:
        req = EmbeddingRequest.from_openai(await json_body())
        return json_response(await embed(catalog, scheduler, req, g.record))

    @bp.post("/v1/chat/completions")
    @accounted
    async def chat_completions() -> Response:
        req = ChatRequest.from_openai(await json_body())
        job = await prepare(catalog, req, g.record)
        return await answer(Generation(scheduler, job), job, ChatShaper(job), stalls)

    @bp.post("/v1/completions")
    @accounted
    async def completions() -> Response:
        req = CompletionRequest.from_openai(await json_body())
        job = await prepare(catalog, req, g.record)
        return await answer(Generation(scheduler, job), job, CompletionShaper(job), stalls)

    @bp.post("/v1/responses")
    @accounted
    async def responses() -> Response:
        body = json_object(await json_body())
        turn = Turn.read(body, store, g.owner)
        req = chat_request(body, turn)
        job = await prepare(catalog, req, g.record)
        keep = turn.keeper(store, g.owner)
        shaper = ResponseShaper(job.model, req, body, job.record.tokens, keep)
        return await answer(Generation(scheduler, job), job, shaper, stalls)

    @bp.post("/v1/responses/input_tokens")
    async def response_input_tokens() -> dict[str, Any]:
        body = json_object(await json_body())
        req = chat_request(body, Turn.read(body, store, g.owner))
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
        return _page(items, request.args)

    return bp


def _page(items: list[dict[str, Any]], args: Mapping[str, str]) -> dict[str, Any]:
    """A page of a list, as OpenAI's list endpoints give it (``limit`` 1-100,
    20 by default; ``order`` "desc", newest first, by default; ``after`` an id)."""
    try:
        limit = int(args.get("limit", 20))
    except ValueError:
        limit = 0
    if not 1 <= limit <= 100:
        raise InvalidRequest("'limit' must be an integer from 1 to 100", param="limit")
    order = args.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequest("'order' must be 'asc' or 'desc'", param="order")
    ordered = items if order == "asc" else items[::-1]
    after = args.get("after")
    if after is not None:
        ids = [item.get("id") for item in ordered]
        if after not in ids:
            raise InvalidRequest(f"'after' names no item of this list: {after!r}", param="after")
        ordered = ordered[ids.index(after) + 1 :]
    page = ordered[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(ordered) > limit,
    }
