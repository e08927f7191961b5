"""The scheduler: one task that owns the policy and carries out its effects.

Requests take a model through ``Scheduler.lease``, which holds it until the
``async with`` block ends (for a stream, after its last byte). Events reach the
owner task through an unbounded channel: each request sends at most four,
and ``send_nowait`` lets a lease report ``Withdrawn``/``Released`` from inside
a cancelled scope, where an ``await`` would raise at once. The owner sleeps
until the next event or the policy's next deadline (queue timeouts,
keep-alive expiries), whichever comes first.

Runner tasks are children of the scheduler's nursery, so they cannot outlive it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Generic, Protocol, TypeVar, cast

import trio

from config.settings import PRIORITIES, ModelConfig
from scheduler import events as pe
from scheduler import policy as p
from scheduler.errors import MlxdError, ModelLoadFailed, ShuttingDown
from scheduler.events import NORMAL
from scheduler.memory import Size
from scheduler.metrics import Metrics
from scheduler.order import Order

log = logging.getLogger("mlxd.scheduler")
MEASURE_EVERY_S = 2.0


class Measurement(Protocol):
    """What the scheduler reads of a runner's stats (``runner.events.Stats``)."""

    @property
    def memory(self) -> dict[str, int]: ...
    @property
    def prefix_bytes(self) -> int: ...


class Runner(Protocol):
    """What the scheduler needs of a runner handle (``runner.client.RunnerProcess``
    in the daemon, a fake in tests)."""

    pid: int | None
    memory: dict[str, int]  # MLX active, peak and cache bytes, as last reported
    load_s: float | None  # how long the runner itself took to load the model
    prefix_bytes: int  # what its prefix cache read ahead while it loaded
    # Set by the scheduler: called once the runner, on its way out, has freed
    # its model and holds only the prefixes it is writing to disk.
    on_saving: Callable[[dict[str, int]], object] | None
    # Set by the scheduler: called with the bytes it wrote to the prefix
    # disk tier and those the hourly bound kept it from writing.
    on_saved: Callable[[int, int], object] | None

    async def run(self, *, task_status: Any = ...) -> None: ...

    async def alive(self) -> None:
        """Return once it answers a ping (answered while it computes or
        loads); raises ``RuntimeError`` once it is gone."""

    async def stats(self) -> Measurement:
        """Its memory and prefix cache's bytes (answered between its steps);
        raises ``RuntimeError`` once it is gone."""

    def stop(self) -> None: ...

    def kill(self, reason: str) -> None:
        """End it at once; its requests fail with ``reason``."""

    def limit_prefixes(self, nbytes: int) -> None: ...


def measured_bytes(memory: dict[str, int]) -> int:
    """What a runner holds: MLX's live buffers plus the freed ones it keeps
    cached for reuse (both are the process's memory), or all the device
    memory the driver says it holds, if that is more (a CUDA context)."""
    mlx = int(memory.get("active", 0)) + int(memory.get("cache", 0))
    return max(mlx, int(memory.get("device", 0)))


class _LeaseTicket(pe.Ticket):
    def __init__(
        self,
        model: str,
        keep_alive_s: float | None,
        prompt: tuple[int, ...],
        max_tokens: int,
        client: str = "",
        priority: int = NORMAL,
        weight: float = 1.0,
    ) -> None:
        super().__init__(model, keep_alive_s, prompt, max_tokens, client, priority, weight)
        self.done = trio.Event()
        self.runner: Any = None
        self.error: MlxdError | None = None
        self.pause_asked = False  # (``policy.Pause``) its holder pauses at its next token


class _OnStarted:
    """A ``task_status`` that reports the runner as loaded."""

    def __init__(self, callback: Callable[[Any], object]) -> None:
        self._callback = callback
        self.fired = False

    def started(self, value: Any = None) -> None:
        self.fired = True
        self._callback(value)


R = TypeVar("R", bound=Runner, covariant=True)  # the daemon's runner handle, or a test's


class Claim(Generic[R]):
    """A held lease whose KV reservation grows (``Scheduler.claim``)."""

    def __init__(self, scheduler: Scheduler[R], ticket: _LeaseTicket) -> None:
        self._scheduler, self._ticket = scheduler, ticket
        self.runner = cast("R", ticket.runner)

    @property
    def reserved(self) -> int:
        """Output tokens its reservation holds now (the policy raises it)."""
        return self._ticket.reserved

    @property
    def since(self) -> float:
        """When its request first arrived (the scheduler's clock)."""
        return self._ticket.since

    @property
    def pause_asked(self) -> bool:
        """Whether the pool asks the sequence to pause (an interactive
        request waits for what it holds): it lets go, and comes back."""
        return self._ticket.pause_asked

    @property
    def most(self) -> int:
        """The most output tokens it may hold: its ``max_tokens``."""
        return self._ticket.max_tokens

    def grow(self, reserve: int) -> None:
        """Ask for the reservation to hold ``reserve`` output tokens: granted
        when it fits (``reserved`` says so), before any new request."""
        self._scheduler.grow(self._ticket, reserve)


class Scheduler(Generic[R]):
    """The pool's owner: runs the policy, starts and stops the runners
    ``make_runner`` gives, and lends them out (``lease``)."""

    def __init__(
        self,
        models: Sequence[ModelConfig],
        make_runner: Callable[[pe.StartRunner], Awaitable[R]],
        budget: int = 2**62,
        size_model: Callable[[str], Awaitable[Size]] | None = None,
        max_turn_s: float = 10.0,
        metrics: Metrics | None = None,
        prefix_disk_bytes: Callable[[str], int] | None = None,
        runner_timeout_s: float = 120.0,
        order: Order | None = None,
        clients: Iterable[str] = (),
    ) -> None:
        """``make_runner(start)`` prepares (but does not start) a runner for
        ``start.model``, with the policy's prefix-cache bytes and prompt to
        read ahead; ``size_model(model)`` estimates its bytes and KV bytes per
        token before a first load;
        ``prefix_disk_bytes(model)`` says what its prefixes take on disk;
        ``clients`` are the configured clients' names (the metrics' ``client``
        label takes those and ``other``)."""
        specs = _specs(models)
        self._policy = p.Policy(specs, budget, max_turn_s, order)
        self._preload = [m.name for m in models if m.preload]
        self._make_runner = make_runner
        self._size_model = size_model
        self._prefix_disk_bytes = prefix_disk_bytes
        self._runner_timeout_s = runner_timeout_s
        # Runners pinged that have yet to answer: model, since when.
        self._pinged: dict[Runner, tuple[str, float]] = {}
        self._loading: dict[str, Runner] = {}  # runners loading their model, watched too
        self._send, self._events = trio.open_memory_channel[pe.Event](math.inf)
        self._nursery: trio.Nursery | None = None
        self.metrics = metrics or Metrics()
        self.metrics.add_clients(clients)
        self.metrics.add_models(specs)
        self.metrics.watch_pool(self.status)
        self._stopping: set[str] = set()  # models whose runner was asked to exit

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the policy until ``shutdown`` has stopped every runner."""
        async with self._events, trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._measure)
            for name in self._preload:
                nursery.start_soon(self._load_at_start, name)
            task_status.started()
            while not self._policy.finished:
                event: pe.Event = pe.Tick(trio.current_time())
                with trio.move_on_at(self._policy.next_deadline()):
                    event = await self._events.receive()
                for effect in self._policy.handle(event):
                    self._apply(effect)
            nursery.cancel_scope.cancel()

    def shutdown(self) -> None:
        """Reject waiting requests and stop every runner; ``run`` then returns."""
        self._post(pe.Shutdown(trio.current_time()))

    def _post(self, event: pe.Event) -> bool:
        try:
            self._send.send_nowait(event)
            return True
        except trio.BrokenResourceError:
            return False  # run() has returned: nobody is left to tell

    @asynccontextmanager
    async def lease(
        self,
        model: str,
        keep_alive_s: float | None = None,
        prompt: Sequence[int] = (),
        max_tokens: int = 0,
        client: tuple[str, int, float] = ("", NORMAL, 1.0),
    ) -> AsyncIterator[R]:
        """Wait for a slot on ``model`` (loading it if needed) and for memory
        for the KV cache of ``prompt`` and ``max_tokens`` more, and hold them.
        ``keep_alive_s`` overrides the model's keep-alive from this request on;
        a load for this request reads the cached prefix of ``prompt`` early;
        ``client``: who asks, at what priority and weight (``scheduler/order.py``)."""
        ticket = _LeaseTicket(model, keep_alive_s, tuple(prompt), max_tokens, *client)
        async with self._held(ticket):
            yield cast("R", ticket.runner)

    @asynccontextmanager
    async def claim(
        self,
        model: str,
        keep_alive_s: float | None,
        prompt: Sequence[int],
        max_tokens: int,
        client: tuple[str, int, float],
        reserve: int,
        resumes: Claim[R] | None = None,
    ) -> AsyncIterator[Claim[R]]:
        """``lease``, reserving KV for ``reserve`` output tokens at first
        (``Claim.grow`` asks for more as the sequence generates); ``resumes``:
        the paused claim this is the rest of, whose place in the order it
        keeps (``/api/ps`` counts those waiting as paused)."""
        ticket = _LeaseTicket(model, keep_alive_s, tuple(prompt), max_tokens, *client)
        ticket.reserve = reserve
        if resumes is not None:  # a paused sequence's rest: it keeps its arrival
            ticket.since, ticket.resumes = resumes.since, True
        async with self._held(ticket):
            yield Claim(self, ticket)

    @asynccontextmanager
    async def _held(self, ticket: _LeaseTicket) -> AsyncIterator[None]:
        """Submit ``ticket``, wait for its grant, and hold it."""
        model = ticket.model
        known = self._policy.models.get(model)  # (the policy answers for an unknown one)
        if self._size_model is not None and known is not None and known.state is p.State.ABSENT:
            size = await self._size_model(model)
            self._post(pe.Sized(model, size.bytes, size.kv_per_token, trio.current_time()))
        if not self._post(pe.Submitted(ticket, trio.current_time())):
            raise ShuttingDown("the server is shutting down")
        try:
            await ticket.done.wait()
        except BaseException:
            self._post(pe.Withdrawn(ticket, trio.current_time()))
            raise
        if ticket.error is not None:
            raise ticket.error
        try:
            yield
        finally:
            self._post(pe.Released(ticket, trio.current_time()))

    def grow(self, ticket: pe.Ticket, reserve: int) -> None:
        """Ask for ``ticket``'s reservation to hold ``reserve`` output tokens."""
        self._post(pe.Grow(ticket, reserve, trio.current_time()))

    async def load(self, model: str, keep_alive_s: float | None = None) -> None:
        """Make ``model`` resident (waiting its turn like any request)."""
        async with self.lease(model, keep_alive_s):
            pass

    def reconfigure(self, models: Sequence[ModelConfig], changed: set[str]) -> None:
        """Serve ``models`` from now on (see ``policy.Reconfigure``)."""
        self.metrics.add_models(m.name for m in models)
        self._post(pe.Reconfigure(_specs(models), frozenset(changed), trio.current_time()))

    def unload(self, model: str) -> None:
        """Unload ``model`` once its running and queued requests are done
        (unpinning it)."""
        self._post(pe.Unload(model, trio.current_time()))

    def pin(self, model: str, pinned: bool = True) -> None:
        """Keep ``model`` resident once loaded, whatever its keep-alive or
        memory others want (or no longer, ``pinned=False``)."""
        self._post(pe.Pin(model, pinned, trio.current_time()))

    def status(self) -> dict[str, Any]:
        """A snapshot of the pool, for the lifecycle API. Times are Unix time."""
        now, wall = trio.current_time(), time.time()
        pol = self._policy

        def at(t: float) -> float | None:
            return None if math.isinf(t) else round(wall + (t - now), 3)

        models = []
        short = pol.waiting_for_memory()
        for name, m in pol.models.items():
            memory = dict(getattr(m.runner, "memory", {}) or {})
            models.append(
                {
                    "model": name,
                    "state": m.state.value,
                    "bytes": m.charged,
                    "weights": m.cost or None,
                    "kv_reserved": m.reserved,
                    "measured": measured_bytes(memory) if memory else None,
                    "running": len(m.running),
                    "queued": len(m.queue),
                    "waiting_for_memory": short.get(name, 0),
                    "pinned": m.pinned,
                    "clients": _by_client(m),
                    "keep_alive_s": None if math.isinf(m.keep_alive_s) else m.keep_alive_s,
                    "last_used": at(m.last_used) if m.state is p.State.READY else None,
                    "expires_at": at(m.expires) if m.idle else None,
                    "pid": getattr(m.runner, "pid", None),
                    "memory": memory,
                    "prefix_cache": {
                        "bytes": m.prefixes_used,
                        "limit": m.prefixes,
                        "max": m.spec.prefix_cache,
                        "disk_bytes": self._prefix_disk_bytes(name)
                        if self._prefix_disk_bytes is not None
                        else 0,
                    },
                }
            )
        return {
            "budget": pol.budget,
            "used": pol.used,
            "runner_bytes": pol.ledger.context,
            "spare_bytes": pol.ledger.spare,
            "models": models,
        }

    def spare_held(self, held: int | None) -> None:
        """The spare runner holds ``held`` bytes (None: one is starting; 0:
        there is none). See ``policy.SpareHeld``."""
        self._post(pe.SpareHeld(held, trio.current_time()))

    def spare_fits(self) -> bool:
        """Whether a spare runner may start now (memory allowing)."""
        return self._policy.spare_fits()

    def kv_bytes(self, model: str, prompt_tokens: int, max_tokens: int) -> int:
        """The KV cache bytes a request to ``model`` reserves."""
        return self._policy.models[model].kv_bytes(prompt_tokens + max_tokens)

    def runner(self, model: str) -> R | None:
        """The model's runner, once it is loaded."""
        return cast("R | None", self._policy.models[model].runner)

    # -- effects -------------------------------------------------------------

    def _apply(self, effect: pe.Effect) -> None:
        match effect:
            case pe.Grant(ticket, runner):
                assert isinstance(ticket, _LeaseTicket)
                ticket.runner = runner
                ticket.done.set()
            case pe.Reject(ticket, error):
                assert isinstance(ticket, _LeaseTicket)
                ticket.error = error
                ticket.done.set()
            case pe.Grown():
                pass  # ``Claim.reserved`` reads the ticket the policy has raised
            case pe.Pause(ticket):
                assert isinstance(ticket, _LeaseTicket)
                ticket.pause_asked = True
            case pe.StartRunner():
                assert self._nursery is not None
                self._nursery.start_soon(self._run_runner, effect)
            case pe.PrefixLimit(model, runner, nbytes, dropped):
                if dropped:
                    log.info("drop prefix cache model=%s reason=memory", model)
                    self.metrics.prefix_drops.labels(model).inc()
                runner.limit_prefixes(nbytes)
            case pe.StopRunner(model, runner, reason):
                log.info("unload model=%s reason=%s", model, reason)
                if reason != "shutdown":
                    self.metrics.evictions.labels(model, reason).inc()
                self._stopping.add(model)
                runner.stop()

    async def _run_runner(self, start: pe.StartRunner) -> None:
        model, started = start.model, trio.current_time()

        def loaded(runner: Runner) -> None:
            self._loading.pop(model, None)
            took = trio.current_time() - started
            log.info(
                "load model=%s duration_s=%.3f runner_load_s=%.3f",
                model,
                took,
                runner.load_s or 0.0,
            )
            self.metrics.loads.labels(model).inc()
            self.metrics.load_duration.labels(model).observe(took)
            now, prefixes = trio.current_time(), runner.prefix_bytes  # read ahead
            self._post(pe.Loaded(model, runner, now, prefixes))
            self._post(pe.Measured(model, measured_bytes(runner.memory), prefixes, now))

        def saving(memory: dict[str, int]) -> None:
            self._post(pe.Measured(model, measured_bytes(memory), 0, trio.current_time()))

        status = _OnStarted(loaded)
        try:
            runner = await self._make_runner(start)
            runner.on_saving = saving
            runner.on_saved = self.metrics.saved(model)
            log.info("loading %s", model)
            self._loading[model] = runner
            await runner.run(task_status=status)
        except Exception as e:
            self._loading.pop(model, None)
            if status.fired:
                log.exception("runner task for %s failed", model)
            else:
                # The runner's own reason (its client's, or the catalog's), if it gave one.
                reason = getattr(e, "message", None) or f"model {model!r} failed to load: {e}"
                error = ModelLoadFailed(reason)
                log.error("%s", error.message)
                self.metrics.load_failures.labels(model).inc()
                self._post(pe.LoadFailed(model, error, trio.current_time()))
                return
        if model not in self._stopping:
            log.error("the runner for %s exited unasked", model)
            self.metrics.runner_crashes.labels(model).inc()
        self._stopping.discard(model)
        self._post(pe.RunnerExited(model, trio.current_time()))

    async def _measure(self) -> None:
        """Keep each resident model's measured bytes (and its runner's last
        stats, for ``/api/ps``) current as its caches grow, and watch that
        every runner, loading or loaded, still runs. Stats are answered
        between steps (a step is one prefill chunk or one token), each runner
        in its own time: a busy one delays only its own figures, and is
        never taken for frozen. Liveness is a ping, which a runner answers
        at once whatever it computes: one that has not answered for
        ``runner_timeout_s`` is frozen (stopped, hung in the kernel): it is
        killed, its requests fail, and the next request loads the model
        again."""
        pinged = self._pinged
        measuring: set[Runner] = set()

        async def ping(runner: Runner) -> None:
            try:
                await runner.alive()
            except RuntimeError:  # it is gone (see ``Runner.alive``)
                return
            finally:
                if math.isfinite(pinged.get(runner, ("", 0.0))[1]):
                    pinged.pop(runner, None)

        async def measure(name: str, runner: Runner) -> None:
            try:
                stats = await runner.stats()
            except RuntimeError:
                return
            finally:
                measuring.discard(runner)
            measured = measured_bytes(stats.memory)
            self._post(pe.Measured(name, measured, stats.prefix_bytes, trio.current_time()))

        def watch(name: str, runner: Runner, now: float) -> None:
            if runner not in pinged:
                pinged[runner] = (name, now)
                nursery.start_soon(ping, runner)
            elif now - pinged[runner][1] > self._runner_timeout_s:
                pinged[runner] = (name, math.inf)  # killed once
                reason = (
                    f"the runner for model {name!r} stopped responding (no answer for "
                    f"{self._runner_timeout_s:g} s); it was killed and will load again"
                )
                log.error("%s", reason)
                runner.kill(reason)

        async with trio.open_nursery() as nursery:
            while True:
                await trio.sleep(MEASURE_EVERY_S)
                now = trio.current_time()
                for name, m in list(self._policy.models.items()):
                    if m.state is not p.State.READY or m.runner is None:
                        continue
                    watch(name, m.runner, now)
                    if m.runner not in measuring:
                        measuring.add(m.runner)
                        nursery.start_soon(measure, name, m.runner)
                for name, runner in list(self._loading.items()):
                    watch(name, runner, now)

    def unresponsive(self) -> dict[str, float]:
        """Runners that have not answered a ping for over ``MEASURE_EVERY_S``
        (for ``/health``): seconds since they were pinged."""
        now = trio.current_time()
        return {
            name: round(now - since, 1)
            for name, since in self._pinged.values()
            if math.isfinite(since) and now - since > 2 * MEASURE_EVERY_S
        }

    async def _load_at_start(self, model: str) -> None:
        try:
            await self.load(model)
        except MlxdError as e:
            log.error("preloading %s failed: %s", model, e.message)


def _by_client(m: p.ModelState) -> list[dict[str, Any]]:
    """A model's running and queued requests by client and priority, and of
    the queued ones those that are paused sequences waiting to go on."""
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for where, tickets in (("running", m.running), ("queued", m.queue)):
        for t in tickets:
            name = PRIORITIES[t.priority]
            row = rows.setdefault(
                (t.client, t.priority),
                {"client": t.client, "priority": name, "running": 0, "queued": 0, "paused": 0},
            )
            row[where] += 1
            row["paused"] += int(where == "queued" and t.resumes)
    return sorted(rows.values(), key=lambda r: (r["client"], r["priority"]))


def _specs(models: Sequence[ModelConfig]) -> dict[str, pe.ModelSpec]:
    return {
        m.name: pe.ModelSpec(
            max_concurrency=m.max_concurrency,
            queue_limit=m.queue_limit,
            queue_timeout_s=m.queue_timeout_s,
            keep_alive_s=m.keep_alive_s,
            pinned=m.pinned,
            prefix_cache=m.prefix_cache_bytes,
        )
        for m in models
    }
