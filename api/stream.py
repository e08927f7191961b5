"""How an answer goes out: whole, as one JSON object, or streamed, as
server-sent events. One driver for every endpoint; the endpoint's shaper
(``api/openai/chat.py``, ``api/openai/responses.py``) says what the events are.

A stream starts only once the model has taken the request
(``Generation.start``), so that a failure to queue or load is an ordinary
HTTP error rather than an error inside a 200 stream, while the headers still
go out during the prefill instead of after it. From then on the response
body owns the generation and the model's lease, until its last byte is sent
or the client goes away (or stops reading: ``api/stalls.py``); a failure
after that is sent as the endpoint's error event.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from quart import Response

from api import errors
from api.delta import Delta
from api.generation import Generation, Prepared
from api.http import json_response
from api.record import Record
from api.stalls import Stalls
from scheduler.errors import MlxdError, ShuttingDown


class Shaper(Protocol):
    """What the stream driver and the whole answer need of an endpoint."""

    end: bytes  # the stream's last frame, after the closing events (or b"")
    opens_with_usage: bool  # its opening events tell the prompt's cached tokens

    def opening(self) -> list[dict[str, Any]]: ...
    def events(self, d: Delta) -> list[dict[str, Any]]: ...
    def closing(self) -> list[dict[str, Any]]: ...
    def final(self, whole: Delta) -> dict[str, Any]: ...
    def failed(self, status: int, error: dict[str, Any]) -> dict[str, Any]: ...
    def frame(self, event: dict[str, Any]) -> bytes: ...


async def answer(generation: Generation, job: Prepared, shaper: Shaper, stalls: Stalls) -> Response:
    """The response the request asked for: whole, or a stream."""
    if not job.params.stream:
        async with generation:
            with stalls.until_shutdown() as cut:
                whole = await generation.whole()
            if cut.cancelled_caught:
                raise _cut()
        return json_response(shaper.final(whole))
    await generation.start()
    if job.request.images:  # refused by the runner, if they do not decode, as a 400
        await generation.cached()
    job.record.streaming = True  # then the stream's end accounts for the request
    return Response(
        stalls.body(_frames(generation, shaper, job.record, stalls), job.record),
        content_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _frames(
    generation: Generation, shaper: Shaper, record: Record, stalls: Stalls
) -> AsyncIterator[bytes]:
    # The events made together go out in one write: each write is a trip
    # through Quart, Hypercorn and the socket (Anthropic's closing alone is
    # three events).
    try:
        if shaper.opens_with_usage:
            await generation.cached()
        if opening := b"".join(shaper.frame(event) for event in shaper.opening()):
            yield opening
        while True:
            with stalls.until_shutdown() as cut:  # never around a yield
                d = await anext(generation, None)
            if cut.cancelled_caught:
                raise _cut()
            if d is None:
                break
            if frames := b"".join(shaper.frame(event) for event in shaper.events(d)):
                yield frames
        yield b"".join(shaper.frame(event) for event in shaper.closing()) + shaper.end
    except MlxdError as exc:
        record.fail(exc)
        yield shaper.frame(shaper.failed(*errors.describe(exc)))
    finally:
        await generation.aclose()  # shielded: the lease is released whatever happens


def _cut() -> ShuttingDown:
    return ShuttingDown(
        "mlxd is shutting down: its grace period for open requests (shutdown_grace_s) "
        "ended before this answer did"
    )
