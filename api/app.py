"""The Quart-trio application: what every request goes through (the guard,
its account, CORS), and the sets of routes (``api/openai/routes.py``,
``api/anthropic/routes.py``, ``api/lifecycle.py``)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from typing import Any

import trio
from hypercorn.typing import (
    ASGIFramework,
    ASGIReceiveCallable,
    ASGISendCallable,
    ASGISendEvent,
    Scope,
)
from quart import Response, g, request
from quart_trio import QuartTrio

from api import errors, lifecycle, page
from api.activity import Activity
from api.anthropic import routes as anthropic_routes
from api.catalog import Catalog
from api.clients import Clients
from api.guard import Guard
from api.openai import conversations
from api.openai import routes as openai_routes
from api.openai.seal import Sealer
from api.openai.store import ResponseStore
from api.pool import Pool
from api.record import Intake, Record
from api.stalls import Stalls
from config.settings import Settings


def create_app(
    settings: Settings,
    catalog: Catalog,
    scheduler: Pool,
    recent_errors: Iterable[dict[str, Any]] = (),
    *,
    spares: Callable[[], dict[str, Any]],
    store: ResponseStore,
    stalls: Stalls,
) -> QuartTrio:
    """The app, on the daemon's catalog and scheduler; ``spares`` says how the
    spare runner process stands (for ``/api/ps``); ``store`` keeps Responses;
    ``stalls`` ends the streams whose client stopped reading, and answers
    still open when a shutdown's grace period ends."""
    app = QuartTrio("mlxd")
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
        RESPONSE_TIMEOUT=None,  # Quart's default (60 s) would cut long streams
        BODY_TIMEOUT=settings.send_timeout_s,  # then a 408
    )
    errors.install(app)
    intake, activity = Intake(), Activity()
    guard = Guard.from_settings(settings)
    clients = Clients.from_settings(settings)

    @app.before_serving
    async def _watch_streams() -> None:
        app.add_background_task(stalls.run)
        app.add_background_task(activity.run)

    @app.before_request
    async def _start_record() -> None:
        rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
        reading = intake if request.method == "POST" else None
        g.record = Record(
            f"req_{uuid.uuid4().hex[:16]}", rule, scheduler.metrics, reading, activity
        )

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
        answer = guard.admit(request)  # Host, Origin, Content-Type, API key
        g.owner = guard.owner(request)  # whose stored responses it may see
        g.record.client = clients.identify(request)  # whose turn it takes, at what priority
        return answer

    app.register_blueprint(lifecycle.blueprint(catalog, scheduler, spares, activity, recent_errors))
    app.register_blueprint(page.blueprint())
    sealer = Sealer.in_dir(settings.cache_dir)  # for reasoning clients keep (encrypted_content)
    app.register_blueprint(openai_routes.blueprint(catalog, scheduler, stalls, store, sealer))
    app.register_blueprint(anthropic_routes.blueprint(catalog, scheduler, stalls))
    app.register_blueprint(conversations.blueprint(store))
    return app


def served(app: QuartTrio) -> ASGIFramework:
    """``app`` as Hypercorn serves it, with the end of each response shielded.

    A response that closes its connection (``Connection: close``, asked by
    the client or sent with a 408 or 413) is ended by Hypercorn inside the
    last ``send``; Quart-trio cancels the request's tasks as soon as that
    send reports the stream closed, which cancelled the socket's closing
    too, leaving the connection open until its keep-alive ran out."""

    async def asgi(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        async def send_end_shielded(message: ASGISendEvent) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body"):
                with trio.CancelScope(shield=True):  # the end: bounded, Hypercorn's own write
                    await send(message)
            else:
                await send(message)

        await app(scope, receive, send_end_shielded)

    return asgi
