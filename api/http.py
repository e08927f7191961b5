"""What every route shares: its JSON body in, its JSON out, and its account
when the client leaves before the answer."""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio
from quart import Response, g, request

from api.offload import INLINE_BYTES, off_loop
from api.record import CLIENT_GONE, Record
from api.schemas import parse_json
from scheduler.errors import InvalidRequest

Route = TypeVar("Route", bound=Callable[..., Awaitable[Any]])
T = TypeVar("T")


async def json_body() -> Any:
    """The request's body, parsed and checked (``parse_json``); a big one in
    a worker thread (``api/offload.py``)."""
    raw = await request.get_data(cache=False)
    record: Record | None = g.get("record")
    if record is not None:
        record.body_bytes = len(raw)
    return await off_loop(len(raw) <= INLINE_BYTES, parse_json, raw)


async def validated(build: Callable[..., T], *args: Any) -> T:
    """``build(*args)``, a request's validation: in a worker thread for a big
    body (a schema of megabytes is seconds of llguidance's checking)."""
    record: Record | None = g.get("record")
    small = record is not None and (record.body_bytes or 0) <= INLINE_BYTES
    return await off_loop(small, build, *args)


def json_response(body: dict[str, Any]) -> Response:
    return Response(json.dumps(body), content_type="application/json")


def model_field(body: Any) -> str:
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        raise InvalidRequest("'model' is required: a model name", param="model")
    return str(body["model"])


def accounted(route: Route) -> Route:
    """A route whose request, if its client leaves before the response (while
    it waits in a queue or for a load, or for a whole answer), is still
    logged and counted, as 499."""

    @functools.wraps(route)
    async def handler(*args: Any, **kwargs: Any) -> Any:
        try:
            return await route(*args, **kwargs)
        except trio.Cancelled:
            record: Record | None = g.get("record")
            if record is not None:
                record.error = record.error or "the client left before the response"
                record.finish(CLIENT_GONE)
            raise

    return handler  # type: ignore[return-value]
