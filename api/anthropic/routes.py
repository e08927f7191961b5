"""Anthropic's Messages routes (``/v1/messages``), on the same models,
leases and metrics as the OpenAI ones; their errors take Anthropic's shape
(``api/errors.py``)."""

from __future__ import annotations

from typing import Any

from quart import Blueprint, Response, g

from api.anthropic.messages import MessageShaper, chat_request
from api.catalog import Catalog
from api.generation import Generation, count_prompt, prepare
from api.http import accounted, json_body, validated
from api.pool import Pool
from api.schemas import json_object
from api.stalls import Stalls
from api.stream import answer


def blueprint(catalog: Catalog, scheduler: Pool, stalls: Stalls) -> Blueprint:
    bp = Blueprint("anthropic", __name__)

    @bp.post("/v1/messages")
    @accounted
    async def messages() -> Response:
        req = await validated(chat_request, await json_body())
        job = await prepare(catalog, req, g.record)
        shaper = MessageShaper(job.model, job.record.tokens)
        return await answer(Generation(scheduler, job), job, shaper, stalls)

    @bp.post("/v1/messages/count_tokens")
    async def count_tokens() -> dict[str, Any]:
        body = json_object(await json_body())
        req = await validated(chat_request, {"max_tokens": 1, **body})  # no max_tokens to count
        return {"input_tokens": await count_prompt(catalog, req)}

    return bp
