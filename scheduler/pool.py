"""The scheduler: one task that owns the policy and carries out its effects.

Requests take a model through ``Scheduler.lease``, which holds it until the
``async with`` block ends (for a stream, after its last byte). Events reach the
owner task through an unbounded channel: each request sends at most three,
and ``send_nowait`` lets a lease report ``Withdrawn``/``Released`` from inside
a cancelled scope, where an ``await`` would raise at once.

Runner tasks are children of the scheduler's nursery, so they cannot outlive it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol

import trio

from config.settings import ModelConfig
from scheduler import policy as p
from scheduler.errors import MlxdError, ModelLoadFailed, ShuttingDown

log = logging.getLogger("mlxd.scheduler")


class Runner(Protocol):
    """What the scheduler needs of a runner handle (``runner.client.RunnerProcess``
    in the daemon, a fake in tests)."""

    pid: int | None
    memory: dict[str, int]

    async def run(self, *, task_status: Any = ...) -> None: ...

    def stop(self) -> None: ...


class _LeaseTicket(p.Ticket):
    def __init__(self, model: str) -> None:
        super().__init__(model)
        self.done = trio.Event()
        self.runner: Any = None
        self.error: MlxdError | None = None


class _OnStarted:
    """A ``task_status`` that reports the runner as loaded."""

    def __init__(self, callback: Callable[[Any], object]) -> None:
        self._callback = callback
        self.fired = False

    def started(self, value: Any = None) -> None:
        self.fired = True
        self._callback(value)


class Scheduler:
    def __init__(
        self,
        models: Sequence[ModelConfig],
        make_runner: Callable[[str], Awaitable[Runner]],
    ) -> None:
        """``make_runner(model)`` prepares (but does not start) a runner for a model."""
        self._policy = p.Policy({m.name: m.max_concurrency for m in models})
        self._make_runner = make_runner
        self._send, self._events = trio.open_memory_channel[p.Event](math.inf)
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the policy until ``shutdown`` has stopped every runner."""
        async with self._events, trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            async for event in self._events:
                for effect in self._policy.handle(event):
                    self._apply(effect)
                if self._policy.finished:
                    break

    def shutdown(self) -> None:
        """Reject waiting requests and stop every runner; ``run`` then returns."""
        self._post(p.Shutdown())

    def _post(self, event: p.Event) -> bool:
        try:
            self._send.send_nowait(event)
            return True
        except trio.BrokenResourceError:
            return False  # run() has returned: nobody is left to tell

    @asynccontextmanager
    async def lease(self, model: str) -> AsyncIterator[Any]:
        """Wait for a slot on ``model`` (loading it if needed) and hold it."""
        ticket = _LeaseTicket(model)
        if not self._post(p.Submitted(ticket)):
            raise ShuttingDown("the server is shutting down")
        try:
            await ticket.done.wait()
        except BaseException:
            self._post(p.Withdrawn(ticket))
            raise
        if ticket.error is not None:
            raise ticket.error
        try:
            yield ticket.runner
        finally:
            self._post(p.Released(ticket))

    def status(self) -> list[dict[str, Any]]:
        """A snapshot of every model, for the lifecycle API."""
        out = []
        for name, m in self._policy.models.items():
            out.append(
                {
                    "model": name,
                    "state": m.state.value,
                    "running": len(m.running),
                    "queued": len(m.queue),
                    "pid": getattr(m.runner, "pid", None),
                    "memory": dict(getattr(m.runner, "memory", {}) or {}),
                }
            )
        return out

    def runner(self, model: str) -> Any:
        return self._policy.models[model].runner

    # -- effects -------------------------------------------------------------

    def _apply(self, effect: p.Effect) -> None:
        match effect:
            case p.Grant(ticket, runner):
                assert isinstance(ticket, _LeaseTicket)
                ticket.runner = runner
                ticket.done.set()
            case p.Reject(ticket, error):
                assert isinstance(ticket, _LeaseTicket)
                ticket.error = error
                ticket.done.set()
            case p.StartRunner(model):
                assert self._nursery is not None
                self._nursery.start_soon(self._run_runner, model)
            case p.StopRunner(model, runner):
                log.info("stopping runner for %s", model)
                runner.stop()

    async def _run_runner(self, model: str) -> None:
        status = _OnStarted(lambda runner: self._post(p.Loaded(model, runner)))
        try:
            runner = await self._make_runner(model)
            log.info("loading %s", model)
            await runner.run(task_status=status)
        except Exception as e:
            if status.fired:
                log.exception("runner task for %s failed", model)
            else:
                error = (
                    e
                    if isinstance(e, ModelLoadFailed)
                    else ModelLoadFailed(f"model {model!r} failed to load: {e}")
                )
                log.error("%s", error.message)
                self._post(p.LoadFailed(model, error))
                return
        self._post(p.RunnerExited(model))
