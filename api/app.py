"""The Quart-trio application: OpenAI routes, the lifecycle view, auth."""

from __future__ import annotations

import functools
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeVar

import trio
from quart import Response, g, request
from quart_trio import QuartTrio

from api import errors, logprobs, sse
from api.catalog import Catalog
from api.generation import Delta, Prepared, Usage, deltas, prepare
from api.guard import Guard
from api.reader import ToolCall
from api.record import CLIENT_GONE, Intake, Record
from api.responses import Shaper, chat_request
from api.schemas import ChatRequest, CompletionRequest, keep_alive_field, parse_json
from api.stalls import Stalls
from config.settings import Settings
from scheduler.errors import InvalidRequest, MlxdError
from scheduler.metrics import CONTENT_TYPE
from scheduler.pool import Scheduler

Shape = Callable[[Delta, bool], dict[str, Any]]


Route = TypeVar("Route", bound=Callable[..., Awaitable[Any]])


def create_app(
    settings: Settings,
    catalog: Catalog,
    scheduler: Scheduler,
    recent_errors: Iterable[dict[str, Any]] = (),
    *,
    spares: Callable[[], dict[str, Any]],
) -> QuartTrio:
    """The app, on the daemon's catalog and scheduler; ``spares`` says how the
    spare runner process stands (for ``/api/ps``)."""
    app = QuartTrio("mlxd")
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
        RESPONSE_TIMEOUT=None,  # Quart's default (60 s) would cut long streams
        BODY_TIMEOUT=60,
    )
    errors.install(app)
    metrics = scheduler.metrics
    intake = Intake()
    guard = Guard.from_settings(settings)
    stalls = Stalls(settings.send_timeout_s)

    @app.before_serving
    async def _watch_streams() -> None:
        app.add_background_task(stalls.run)

    @app.before_request
    async def _start_record() -> None:
        rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
        reading = intake if request.method == "POST" else None
        g.record = Record(f"req_{uuid.uuid4().hex[:16]}", rule, metrics, reading)

    @app.after_request
    async def _finish_record(response: Response) -> Response:
        record: Record | None = g.get("record")
        if record is not None:
            response.headers["X-Request-Id"] = record.id
            if not record.streaming:
                record.finish(response.status_code)
        return guard.cors(response, request.headers.get("Origin"))

    @app.before_request
    async def _admit() -> Response | None:
        return guard.admit(request)  # Host, Origin, Content-Type, API key

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """ "ok"; or "degraded", naming the runners that have not answered for
        seconds (a long single step, or frozen: killed at ``runner_timeout``)."""
        late = scheduler.unresponsive()
        if late:
            return {"status": "degraded", "unresponsive_runners_s": late}
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), content_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(name) for name in catalog.models]}

    @app.get("/v1/models/<path:name>")
    async def get_model(name: str) -> dict[str, Any]:
        return _model_card(catalog.get(name).name)

    @app.get("/api/ps")
    async def ps() -> dict[str, Any]:
        """The pool: budget and bytes in use, every model's state, bytes,
        requests running and queued, last use and expiry, runner counters (as
        the pool last measured them, every 2 s: a busy runner never holds this
        up), and the spare runner process ("none", "starting" or "ready"; its
        bytes are ``spare_bytes``)."""
        pool = scheduler.status() | {"spare": spares()}
        for m in pool["models"]:
            runner = scheduler.runner(m["model"])
            ready = m["state"] == "ready" and runner is not None
            m["runner"] = runner.last_stats if ready else None  # never waits on a busy runner
        return pool

    @app.get("/api/errors")
    async def recent() -> dict[str, Any]:
        """The daemon's recent warnings and errors (for ``mlxd doctor``)."""
        return {"errors": list(recent_errors)}

    @app.post("/api/load")
    @_accounted
    async def load() -> dict[str, Any]:
        body = await _json_body()
        model = catalog.get(_model_field(body)).name
        await catalog.texts(model)
        await scheduler.load(model, keep_alive_field(body))
        return {"model": model, "state": "ready"}

    @app.post("/api/unload")
    async def unload() -> dict[str, Any]:
        model = catalog.get(_model_field(await _json_body())).name
        scheduler.unload(model)
        return {"model": model, "state": "unloading"}

    @app.post("/v1/chat/completions")
    @_accounted
    async def chat_completions() -> Response:
        req = ChatRequest.from_openai(await _json_body())
        job = await prepare(catalog, req, g.record)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chat_lp(entries: list[dict[str, Any]]) -> dict[str, Any] | None:
            return None if job.params.logprobs is None else logprobs.chat(job.texts, entries)

        calls = 0  # tool calls streamed so far: each delta's index

        def chunk(d: Delta, first: bool) -> dict[str, Any]:
            nonlocal calls
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if d.reasoning:
                delta["reasoning_content"] = d.reasoning
            if d.text:
                delta["content"] = d.text
            if d.calls:
                delta["tool_calls"] = [
                    _tool_call(call) | {"index": calls + i} for i, call in enumerate(d.calls)
                ]
                calls += len(d.calls)
            return {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": job.model,
                "choices": [
                    {
                        "index": 0,
                        "delta": delta,
                        "logprobs": chat_lp(d.logprobs),
                        "finish_reason": d.finish,
                    }
                ],
            }

        if job.params.stream:
            return await _stream(scheduler, job, chunk, chunk(Delta(""), True), stalls)
        usage = Usage(len(job.prompt))
        whole = await _collect(scheduler, job, usage)
        return _json_response(
            {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": job.model,
                "choices": [
                    {
                        "index": 0,
                        "message": _message(whole),
                        "logprobs": chat_lp(whole.logprobs),
                        "finish_reason": whole.finish,
                    }
                ],
                "usage": usage.as_dict(),
            }
        )

    @app.post("/v1/completions")
    @_accounted
    async def completions() -> Response:
        req = CompletionRequest.from_openai(await _json_body())
        job = await prepare(catalog, req, g.record)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        offset = 0

        def completion_lp(d: Delta) -> dict[str, Any] | None:
            nonlocal offset
            if job.params.logprobs is None:
                return None
            shaped = logprobs.completion(job.texts, d.logprobs, offset)
            offset += sum(len(t) for t in shaped["tokens"])
            return shaped

        def chunk(d: Delta, first: bool) -> dict[str, Any]:
            return {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": job.model,
                "choices": [
                    {
                        "index": 0,
                        "text": d.text,
                        "logprobs": completion_lp(d),
                        "finish_reason": d.finish,
                    }
                ],
            }

        if job.params.stream:
            return await _stream(scheduler, job, chunk, None, stalls)
        usage = Usage(len(job.prompt))
        whole = await _collect(scheduler, job, usage)
        return _json_response(
            {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": job.model,
                "choices": [
                    {
                        "index": 0,
                        "text": whole.text,
                        "logprobs": completion_lp(whole),
                        "finish_reason": whole.finish,
                    }
                ],
                "usage": usage.as_dict(),
            }
        )

    @app.post("/v1/responses")
    @_accounted
    async def responses() -> Response:
        body = await _json_body()
        req = chat_request(body)
        job = await prepare(catalog, req, g.record)
        shaper = Shaper(job.model, req, body)
        if job.params.stream:
            return await _stream_response(scheduler, job, shaper, stalls)
        usage = Usage(len(job.prompt))
        whole = await _collect(scheduler, job, usage)
        return _json_response(shaper.final(whole, usage))

    def _model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "mlxd"}

    return app


async def _json_body() -> Any:
    return parse_json(await request.get_data(cache=False))


def _model_field(body: Any) -> str:
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        raise InvalidRequest("'model' is required: a model name", param="model")
    return str(body["model"])


def _accounted(route: Route) -> Route:
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


def _json_response(body: dict[str, Any]) -> Response:
    return Response(json.dumps(body), content_type="application/json")


def _tool_call(call: ToolCall) -> dict[str, Any]:
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }


def _message(whole: Delta) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": whole.text or None}
    if whole.reasoning:
        message["reasoning_content"] = whole.reasoning
    if whole.calls:
        message["tool_calls"] = [_tool_call(c) for c in whole.calls]
    elif message["content"] is None:
        message["content"] = ""
    return message


async def _collect(scheduler: Scheduler, job: Prepared, usage: Usage) -> Delta:
    """The whole generation as one delta."""
    whole = Delta("")
    async for d in deltas(scheduler, job, usage):
        whole += d
    return whole


async def _open(scheduler: Scheduler, job: Prepared) -> tuple[Delta, AsyncGenerator[Delta], Usage]:
    """Start generating and wait until the model has taken the request.

    A stream's response starts only then, so that a failure to queue or load
    is an ordinary HTTP error rather than an error inside a 200 stream, while
    the headers still go out during the prefill instead of after it. From then
    on the response body owns the generation and the model's lease, until its
    last byte is sent or the client goes away.
    """
    usage = Usage(len(job.prompt))
    gen = deltas(scheduler, job, usage)
    try:
        first = await anext(gen)
    except BaseException:
        with trio.CancelScope(shield=True):
            await gen.aclose()
        raise
    return first, gen, usage


def _sse(job: Prepared, frames: AsyncIterator[bytes], stalls: Stalls) -> Response:
    """An event stream; its request is accounted for when the stream ends
    (``CLIENT_GONE`` if the client left or stopped reading first)."""
    job.record.streaming = True
    return Response(
        stalls.body(frames, job.record),
        content_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _stream(
    scheduler: Scheduler,
    job: Prepared,
    shape: Shape,
    opening: dict[str, Any] | None,
    stalls: Stalls,
) -> Response:
    """A chat or completions stream; a failure after it started is sent as an
    error event."""
    first, gen, usage = await _open(scheduler, job)
    extra: dict[str, Any] = {"usage": None} if job.params.include_usage else {}

    async def body() -> AsyncIterator[bytes]:
        try:
            if opening is not None:
                yield sse.event(opening | extra)
            d: Delta | None = first
            while d is not None:
                if d.text or d.reasoning or d.calls or d.finish or d.logprobs:
                    yield sse.event(shape(d, False) | extra)
                d = None if d.finish else await anext(gen, None)
            if job.params.include_usage:
                final = shape(Delta(""), False) | {"choices": [], "usage": usage.as_dict()}
                yield sse.event(final)
            yield sse.DONE
        except MlxdError as exc:
            job.record.fail(exc)
            yield sse.event(errors.describe(exc)[1])
        finally:
            with trio.CancelScope(shield=True):
                await gen.aclose()

    return _sse(job, body(), stalls)


async def _stream_response(
    scheduler: Scheduler, job: Prepared, shaper: Shaper, stalls: Stalls
) -> Response:
    """A Responses API stream: typed events; a late failure is ``response.failed``."""
    first, gen, usage = await _open(scheduler, job)

    async def body() -> AsyncIterator[bytes]:
        try:
            async for ev in shaper.events(first, lambda: anext(gen, None), usage):
                yield sse.typed(ev)
        except MlxdError as exc:
            job.record.fail(exc)
            yield sse.typed(shaper.failed(errors.describe(exc)[1]))
        finally:
            with trio.CancelScope(shield=True):
                await gen.aclose()

    return _sse(job, body(), stalls)
