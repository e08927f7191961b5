"""The daemon's own routes: its health, the pool's state, loading,
unloading and pinning models by hand, recent errors and activity (what the
status page shows), and the Prometheus metrics."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from quart import Blueprint, Response, g

from api.activity import Activity
from api.catalog import Catalog
from api.http import accounted, json_body, model_field
from api.pool import Pool
from api.schemas import keep_alive_field
from scheduler.metrics import CONTENT_TYPE


def blueprint(
    catalog: Catalog,
    scheduler: Pool,
    spares: Callable[[], dict[str, Any]],
    activity: Activity,
    recent_errors: Iterable[dict[str, Any]] = (),
) -> Blueprint:
    bp = Blueprint("lifecycle", __name__)

    @bp.get("/health")
    async def health() -> dict[str, Any]:
        """ "ok"; or "degraded", naming the runners that have not answered for
        seconds (a long single step, or frozen: killed at ``runner_timeout``)."""
        late = scheduler.unresponsive()
        if late:
            return {"status": "degraded", "unresponsive_runners_s": late}
        return {"status": "ok"}

    @bp.get("/metrics")
    async def prometheus() -> Response:
        return Response(scheduler.metrics.exposition(), content_type=CONTENT_TYPE)

    @bp.get("/api/ps")
    async def ps() -> dict[str, Any]:
        """The pool: budget and bytes in use, every model's state, bytes,
        requests running and queued, last use and expiry, runner counters (as
        the pool last measured them, every 2 s: a busy runner never holds this
        up), and the spare runner process ("none", "starting" or "ready"; its
        bytes are ``spare_bytes``); and what each model takes, where that is
        known without resolving its source ("completion", "vision",
        "embedding"; null until its files were looked at)."""
        pool = scheduler.status() | {"spare": spares()}
        for m in pool["models"]:
            m["capabilities"] = catalog.known_capabilities(m["model"])
            runner = scheduler.runner(m["model"]) if m["state"] == "ready" else None
            # never waits on a busy runner: what it last said
            m["runner"] = runner.last_stats if runner is not None else None
        return pool

    @bp.get("/api/errors")
    async def recent() -> dict[str, Any]:
        """The daemon's recent warnings and errors (for ``mlxd doctor``)."""
        return {"errors": list(recent_errors)}

    @bp.get("/api/activity")
    async def recently() -> dict[str, Any]:
        """The latest requests, and tokens and requests per second over the
        last minutes (``api/activity.py``)."""
        return activity.snapshot()

    def named_model(body: Any) -> str:
        """The configured model a lifecycle request names (its record's too)."""
        g.record.model = model = catalog.get(model_field(body)).name
        return model

    @bp.post("/api/load")
    @accounted
    async def load() -> dict[str, Any]:
        body = await json_body()
        model = named_model(body)
        await catalog.texts(model)
        await scheduler.load(model, keep_alive_field(body))
        return {"model": model, "state": "ready"}

    @bp.post("/api/unload")
    async def unload() -> dict[str, Any]:
        model = named_model(await json_body())
        scheduler.unload(model)
        return {"model": model, "state": "unloading"}

    @bp.post("/api/pin")
    @accounted
    async def pin() -> dict[str, Any]:
        """Keep the model resident (loading it if needed) until it is
        unpinned or unloaded by hand, or the config changes it."""
        model = named_model(await json_body())
        scheduler.pin(model)
        await catalog.texts(model)
        await scheduler.load(model)
        return {"model": model, "state": "ready", "pinned": True}

    @bp.post("/api/unpin")
    async def unpin() -> dict[str, Any]:
        """Let the model go by its keep-alive again (now, if that has run out)."""
        model = named_model(await json_body())
        scheduler.pin(model, pinned=False)
        return {"model": model, "pinned": False}

    return bp
