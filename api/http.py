"""What every route shares: its JSON body in, its JSON out, and its account
when the client leaves before the answer."""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio
from quart import Response, g, request

from api.record import CLIENT_GONE, Record
from api.schemas import parse_json
from scheduler.errors import InvalidRequest

Route = TypeVar("Route", bound=Callable[..., Awaitable[Any]])


async def json_body() -> Any:
    raw = await request.get_data(cache=False)
    record: Record | None = g.get("record")
    if record is not None:
        record.body_bytes = len(raw)
    return parse_json(raw)


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
