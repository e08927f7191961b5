"""The OpenAI routes (``/v1/...``): models, chat completions, completions,
responses. Each reads and validates its request, prepares it, and hands a
generation and its endpoint's shaper to the one answer driver."""

from __future__ import annotations

from typing import Any

from quart import Blueprint, Response, g

from api.catalog import Catalog
from api.generation import Generation, prepare
from api.http import accounted, json_body
from api.responses import ResponseShaper, chat_request
from api.schemas import ChatRequest, CompletionRequest
from api.shapers import ChatShaper, CompletionShaper
from api.stalls import Stalls
from api.stream import answer
from scheduler.pool import Scheduler


def blueprint(catalog: Catalog, scheduler: Scheduler, stalls: Stalls) -> Blueprint:
    bp = Blueprint("openai", __name__)

    @bp.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(name) for name in catalog.models]}

    @bp.get("/v1/models/<path:name>")
    async def get_model(name: str) -> dict[str, Any]:
        return _model_card(catalog.get(name).name)

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
        body = await json_body()
        req = chat_request(body)
        job = await prepare(catalog, req, g.record)
        shaper = ResponseShaper(job.model, req, body, job.record.tokens)
        return await answer(Generation(scheduler, job), job, shaper, stalls)

    return bp


def _model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "mlxd"}
