"""``mlxd serve``: the daemon's process tree and its orderly shutdown.

    trio.run(serve)
    ├─ signal watcher          SIGTERM / SIGINT → stop; SIGHUP → reload the config
    ├─ model preparation       tokenizers (and the bundled model) ready early
    ├─ a spare runner process  MLX imported, waiting to load the next model
    └─ inner nursery
       ├─ scheduler.run        owns the policy; runners are its children
       └─ hypercorn serve      until stop, then drains open requests

On stop, Hypercorn stops accepting and lets open responses finish (up to
``shutdown_grace_s``); then the scheduler stops every runner, each of which
is killed if it has not exited within the same grace. Stored Responses are
written out last (with ``persist_responses``), and read back at start.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import attrs
import hypercorn.config
import hypercorn.trio
import trio

from api.app import create_app, served
from api.catalog import Catalog
from api.openai.store import ResponseStore
from api.stalls import Stalls
from config.settings import ConfigError, Settings
from config.units import format_bytes
from daemon import cachedir
from daemon.launcher import Launcher
from daemon.recent import RecentErrors
from runner.client import RunnerProcess
from scheduler.errors import MlxdError
from scheduler.events import StartRunner
from scheduler.memory import Size, resolve_budget
from scheduler.order import Fair
from scheduler.pool import Scheduler

log = logging.getLogger("mlxd")


async def serve(
    settings: Settings,
    stop: trio.Event | None = None,
    *,
    config_path: Path | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``stop`` is set (or SIGTERM/SIGINT when ``stop`` is None;
    then SIGHUP reloads the models from ``config_path``)."""
    if (why := await trio.to_thread.run_sync(cachedir.problem, settings.cache_dir)) is not None:
        log.warning(
            "the cache folder %s cannot be used (%s): serving without prefix files on disk "
            "or stored responses on disk",
            settings.cache_dir,
            why,
        )
        settings = attrs.evolve(settings, prefix_disk_bytes=0, persist_responses=False)
    launcher = Launcher(settings)
    catalog = Catalog(settings, launcher.model_dir)
    budget, where = resolve_budget(settings.memory_budget)
    log.info("memory budget %s (%s)", format_bytes(budget), where)

    async def make_runner(start: StartRunner) -> RunnerProcess:
        return await launcher.runner(catalog.get(start.model), start)

    async def size_model(name: str) -> Size:
        return await launcher.size(catalog.get(name))

    scheduler = Scheduler(
        settings.models,
        make_runner,
        budget=budget,
        size_model=size_model,
        max_turn_s=settings.max_turn_s,
        prefix_disk_bytes=launcher.prefix_disk_bytes,
        runner_timeout_s=settings.runner_timeout_s,
        order=Fair(settings.background_max_wait_s),
        clients=[c.name for c in settings.clients],
    )
    scheduler.metrics.watch(
        "mlxd_prefix_cache_disk_write_budget_bytes",
        "Bytes the prefix disk tier may still write this hour (all models)",
        launcher.prefix_disk_writes_left,
    )
    recent = RecentErrors()
    logging.getLogger("mlxd").addHandler(recent)
    store = ResponseStore(
        settings.response_store_entries,
        settings.response_store_bytes,
        settings.cache_dir / "responses.json" if settings.persist_responses else None,
    )
    await trio.to_thread.run_sync(store.load)
    stalls = Stalls(settings.send_timeout_s)
    app = create_app(
        settings,
        catalog,
        scheduler,
        recent.records,
        spares=launcher.spares.status,
        store=store,
        stalls=stalls,
    )
    config = _hypercorn_config(settings)
    watch_signals = stop is None
    stop = trio.Event() if stop is None else stop

    async with trio.open_nursery() as outer:
        if watch_signals:
            outer.start_soon(_stop_on_signal, stop, outer.cancel_scope)

            async def reload() -> None:
                nonlocal settings
                settings = await _reload(settings, config_path, catalog, launcher, scheduler)

            outer.start_soon(_reload_on_sighup, reload)
        outer.start_soon(_prepare, catalog, launcher, list(catalog.models))
        outer.start_soon(store.maintain)  # its journal on the disk, now and then written whole
        launcher.spares.watch(scheduler.spare_held, scheduler.spare_fits)  # in the ledger
        await outer.start(launcher.spares.run)
        async with trio.open_nursery() as inner:
            await inner.start(scheduler.run)

            async def cut_at_shutdown() -> None:
                await stop.wait()
                stalls.shutting_down(settings.shutdown_grace_s)

            inner.start_soon(cut_at_shutdown)

            async def http(task_status: trio.TaskStatus[list[str]]) -> None:
                await hypercorn.trio.serve(
                    served(app), config, shutdown_trigger=stop.wait, task_status=task_status
                )
                # Hypercorn returns once open requests have drained; only then
                # are the runners stopped (scheduler.run returns when they are).
                scheduler.shutdown()

            binds = await inner.start(http)
            log.info(
                "serving %s on %s", ", ".join(m.name for m in settings.models), ", ".join(binds)
            )
            task_status.started(binds)
        outer.cancel_scope.cancel()
    with trio.CancelScope(shield=True):  # a second signal still leaves the file whole
        await trio.to_thread.run_sync(store.save)
    logging.getLogger("mlxd").removeHandler(recent)
    log.info("stopped")


def _hypercorn_config(settings: Settings) -> hypercorn.config.Config:
    config = hypercorn.config.Config()
    config.bind = [f"{settings.host}:{settings.port}"]
    config.graceful_timeout = settings.shutdown_grace_s
    config.accesslog = None
    config.errorlog = logging.getLogger("mlxd.http")
    return config


async def _stop_on_signal(stop: trio.Event, everything: trio.CancelScope) -> None:
    """The first signal drains gracefully; a second one stops at once (runners
    are still reaped: cancellation closes their stdin and waits for them)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            if not stop.is_set():
                log.info("received %s: finishing open requests, then stopping", name)
                stop.set()
            else:
                log.warning("received %s again: stopping now", name)
                everything.cancel()


async def _reload_on_sighup(reload: Callable[[], Awaitable[None]]) -> None:
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        async for _ in signals:
            await reload()


async def _reload(
    settings: Settings,
    path: Path | None,
    catalog: Catalog,
    launcher: Launcher,
    scheduler: Scheduler,
) -> Settings:
    """Apply a changed config's models; keep the old config if the new one is bad."""
    if path is None:
        log.warning("received SIGHUP, but mlxd runs on its built-in config: nothing to reload")
        return settings
    try:
        new = await trio.to_thread.run_sync(Settings.from_toml, path)
    except ConfigError as e:
        log.error("received SIGHUP; the new config is refused, the old one stays: %s", e)
        return settings
    kept = attrs.evolve(new, **{f: getattr(settings, f) for f in _RESTART_ONLY})
    added, removed, changed = catalog.reconfigure(kept)
    scheduler.reconfigure(kept.models, changed)
    for field in _RESTART_ONLY:
        if getattr(new, field) != getattr(settings, field):
            log.warning("config: %s changed; restart mlxd to apply it", field)
    log.info(
        "reloaded %s: added %s, removed %s, changed %s",
        path,
        ", ".join(sorted(added)) or "none",
        ", ".join(sorted(removed)) or "none",
        ", ".join(sorted(changed)) or "none",
    )
    await _prepare(catalog, launcher, sorted(added | changed))
    return kept


# What a reload cannot change in a running daemon.
_RESTART_ONLY = (
    "host",
    "port",
    "api_keys",
    "allowed_hosts",
    "cors_origins",
    "send_timeout_s",
    "runner_timeout_s",
    "memory_budget",
    "max_turn_s",
    "shutdown_grace_s",
    "cache_dir",
    "max_body_bytes",
    "log_level",
    "prefix_disk_bytes",
    "prefix_disk_writes",
    "response_store_entries",
    "response_store_bytes",
    "persist_responses",
)


async def _prepare(catalog: Catalog, launcher: Launcher, names: list[str]) -> None:
    """Load models' tokenizers (converting the bundled model if needed) and
    find their cached prefixes on disk, in the background, so that the first
    request does not pay for it."""
    for name in names:
        try:
            if await catalog.kind(name) == "embed":
                await catalog.encoder(name)
                continue
            await catalog.texts(name)
            await launcher.prefix_dir(catalog.get(name))
        except MlxdError as e:
            log.error("%s", e.message)
        except Exception:  # a broken model is its requests' error, never the daemon's end
            log.exception("preparing model %s failed", name)
