"""The daemon's handle on one runner process.

``RunnerProcess.run`` is a long-lived task (started with ``nursery.start``) that
spawns the process, waits for it to report ``ready``, and then pumps its
events to the requests that are generating on it. It returns when the process
exits, after failing every stream still open on it with ``RunnerGone``
(unless the exit was asked for and nothing was left running).

Commands go through an unbounded outbox drained by a writer task, so that
``cancel`` can be sent synchronously, even from a cancelled scope.
"""

from __future__ import annotations

import itertools
import logging
import math
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import ExitStack, aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import trio

from runner import commands as cmd
from runner import events as ev
from runner import protocol
from runner.errors import LoadFailed, Refused, RunnerError, RunnerGone
from runner.protocol import Chunk
from runner.spares import Spares, spawn

log = logging.getLogger("mlxd.runner")
SETTLE_S = 5.0


@attrs.frozen
class RunnerSpec:
    """A runner's model and settings. Its prefix cache starts with
    ``prefix_cache`` bytes (what the budget allows the load, for reading the
    cached prefix of ``prompt`` while the weights load; the pool changes it
    once the model is ready); ``prefix_dir`` (``<cache_dir>/prefixes/<fingerprint>``,
    see ``runner/prefix_disk.py``) turns the disk tier on, with ``prefix_disk``
    bytes for all models' prefix files together and ``prefix_disk_writes``
    bytes written by all per hour."""

    model: str
    model_dir: Path
    max_batch: int
    prefill_chunk: int | None = None  # None: sized by the runner (see runner/engine.py)
    prefix_cache: int = 0
    prefix_dir: Path | None = None
    prefix_disk: int = 0
    prefix_disk_writes: int | None = None  # bytes per hour, all models' (None: unbounded)
    prompt: tuple[int, ...] = ()  # the first request's: its cached prefix is read ahead
    cache_limit: int | None = None  # bytes of freed buffers MLX may keep (None: its default)
    kind: str = "chat"  # or "embed": the runner loads an embedding engine
    image_features: int = 0  # bytes of a vision model's cache of image features

    def load(self) -> cmd.Load:
        return cmd.Load(
            str(self.model_dir),
            self.max_batch,
            self.prefill_chunk,
            self.prefix_cache,
            str(self.prefix_dir) if self.prefix_dir is not None else None,
            self.prefix_disk,
            self.prefix_disk_writes,
            list(self.prompt),
            self.cache_limit,
            self.kind,
            self.image_features,
        )


class RunnerProcess:
    def __init__(
        self,
        spec: RunnerSpec,
        *,
        load_timeout_s: float = 600.0,
        stop_grace_s: float = 10.0,
        python: str = sys.executable,
        spares: Spares | None = None,
    ) -> None:
        self.spec = spec
        self._spares = spares
        self.pid: int | None = None
        self.memory: dict[str, int] = {}
        self.last_stats: dict[str, Any] | None = None  # the last "stats" event, and its time
        self.load_s: float | None = None  # the runner's own load time
        self.prefix_bytes = 0  # its prefix cache's, once loaded (a read-ahead)
        # Called with the runner's memory once, on its way out, it has freed
        # the model and holds only the prefixes it is writing to disk.
        self.on_saving: Callable[[dict[str, int]], object] | None = None
        # Called with the bytes it wrote to the disk tier, and those it did
        # not (over the hourly bound), once it has.
        self.on_saved: Callable[[int, int], object] | None = None
        self._load_timeout_s = load_timeout_s
        self._stop_grace_s = stop_grace_s
        self._python = python
        self._ids = itertools.count(1)
        # Each open request's channel and its stop tokens.
        self._streams: dict[int, tuple[trio.MemorySendChannel[Chunk], tuple[int, ...]]] = {}
        self._outbox_send, self._outbox = trio.open_memory_channel[cmd.Command](math.inf)
        self._stats: list[trio.MemorySendChannel[ev.Stats]] = []
        self._pongs: list[trio.MemorySendChannel[None]] = []  # pings waiting, oldest first
        # Embed requests waiting for their answer: an "embeddings" or "error" event.
        self._embeds: dict[int, trio.MemorySendChannel[ev.Embeddings | ev.Failed]] = {}
        self._stop_requested = trio.Event()
        self._first_output = trio.Event()
        self._proc: trio.Process | None = None
        self._killed: str | None = None  # why it was killed, if it was
        self.exit_code: int | None = None

    # -- lifecycle -----------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[RunnerProcess] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Take a started runner process (a spare, if there is one), have it
        load the model and serve until it exits. Raises ``LoadFailed``
        (before ``started``) if the model cannot be loaded."""
        with ExitStack() as loading:  # closed once the load has settled (see _settle)
            if self._spares is not None:
                loading.enter_context(self._spares.loading())
            proc = await (self._spares.take() if self._spares else spawn(self._python))
            await self._serve(proc, loading, task_status)

    async def _serve(
        self, proc: trio.Process, loading: ExitStack, task_status: trio.TaskStatus[RunnerProcess]
    ) -> None:
        self.pid, self._proc = proc.pid, proc
        assert proc.stdin is not None and proc.stdout is not None
        # The load command goes first; pings follow it while the model loads
        # (the runner answers them from the start: ``alive``).
        self._outbox_send.send_nowait(self.spec.load())
        try:
            first: ev.Event | None = None
            async with aclosing(_events(proc.stdout)) as events, trio.open_nursery() as nursery:
                nursery.start_soon(self._write, proc.stdin)
                with trio.move_on_after(self._load_timeout_s):
                    async for event in events:  # (a spare's "spare" line was read)
                        if not isinstance(event, ev.Pong):
                            first = event
                            break
                        self._dispatch(event)
                if isinstance(first, ev.Ready):
                    self.memory, self.load_s = first.memory, first.load_s
                    self.prefix_bytes = first.prefix_bytes
                    nursery.start_soon(self._settle, loading)
                    nursery.start_soon(self._kill_after_grace, proc)
                    task_status.started(self)
                    async for event in events:
                        self._dispatch(event)
                nursery.cancel_scope.cancel()  # stdout closed (or no load): the end
            if not isinstance(first, ev.Ready):
                proc.kill()
                await proc.wait()
                raise LoadFailed(_load_error(self.spec, first, proc.returncode, self._killed))
        finally:
            with trio.CancelScope(shield=True):
                await self._reap(proc)
            self._fail_all(
                RunnerGone(
                    self._killed
                    or f"the runner for model {self.spec.model!r} exited "
                    f"(code {proc.returncode}) while generating"
                )
            )

    async def _settle(self, loading: ExitStack) -> None:
        """A load has settled once the first request has its first token (that
        step loads the device's kernels and is part of the swap's cost), or
        after ``SETTLE_S`` with no request."""
        with trio.move_on_after(SETTLE_S):
            await self._first_output.wait()
        loading.close()

    def stop(self) -> None:
        """Ask the runner to exit; it is killed if it has not within the grace period."""
        self._send_nowait(cmd.Shutdown())
        self._stop_requested.set()

    def kill(self, reason: str) -> None:
        """End the process at once (it stopped answering); its requests fail
        with ``reason``."""
        self._killed = reason
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()

    async def _kill_after_grace(self, proc: trio.Process) -> None:
        await self._stop_requested.wait()
        await trio.sleep(self._stop_grace_s)
        if proc.poll() is None:
            log.warning("runner for %s did not exit in time; killing it", self.spec.model)
            proc.kill()

    async def _reap(self, proc: trio.Process) -> None:
        # Closing stdin tells the runner to exit, if nothing has yet.
        assert proc.stdin is not None
        await proc.stdin.aclose()
        with trio.move_on_after(self._stop_grace_s):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        self.exit_code = proc.returncode
        log.info(
            "runner for %s (pid %s) exited with %s", self.spec.model, proc.pid, proc.returncode
        )

    async def _write(self, stdin: trio.abc.SendStream) -> None:
        try:
            async for command in self._outbox:
                if isinstance(command, protocol.Generate) and command.images:
                    # megabytes of base64 to write out: 13 ms a screenshot
                    # here, not on the event loop every stream shares
                    line = await trio.to_thread.run_sync(cmd.line, command)
                else:
                    line = cmd.line(command)
                await stdin.send_all(line)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the process is gone; run() notices through stdout

    # -- requests ------------------------------------------------------------

    @asynccontextmanager
    async def generate(
        self, request: protocol.Generate, *, more: bool = False
    ) -> AsyncIterator[trio.MemoryReceiveChannel[Chunk]]:
        """Start generating; yields a channel of chunks ending with one whose
        ``finish`` (or ``error``) is set. Leaving early cancels the generation.
        ``more``: other requests are on their way (see the protocol)."""
        req_id = next(self._ids)
        send, recv = trio.open_memory_channel[Chunk](math.inf)  # bounded by max_tokens
        self._streams[req_id] = (send, request.stop_ids)
        try:
            self._outbox_send.send_nowait(attrs.evolve(request, id=req_id, more=more))
        except trio.ClosedResourceError:
            raise RunnerGone(f"the runner for model {self.spec.model!r} has exited") from None
        try:
            yield recv
        finally:
            if self._streams.pop(req_id, None) is not None:
                self._send_nowait(cmd.Cancel(req_id))

    def limit_prefixes(self, nbytes: int) -> None:
        """Let the prefix cache hold at most ``nbytes`` from now on (0 drops it)."""
        self._send_nowait(cmd.PrefixLimit(nbytes))

    async def alive(self) -> None:
        """Return once the runner answers a ping: its process runs, whatever
        it is computing (or loading). Raises ``RunnerGone`` once it is gone."""
        send, recv = trio.open_memory_channel[None](1)
        self._pongs.append(send)
        self._send_nowait(cmd.Ping())
        async with recv:
            try:
                await recv.receive()
            except trio.EndOfChannel:
                raise RunnerGone(f"the runner for model {self.spec.model!r} has exited") from None

    async def stats(self) -> ev.Stats:
        send, recv = trio.open_memory_channel[ev.Stats](1)
        self._stats.append(send)
        self._send_nowait(cmd.AskStats())
        async with recv:
            try:
                return await recv.receive()
            except trio.EndOfChannel:
                raise RunnerGone(f"the runner for model {self.spec.model!r} has exited") from None

    async def embed(self, inputs: list[list[int]]) -> np.ndarray:
        """The vectors of ``inputs`` (token ids), count x dims float32, unit
        length. Raises ``RunnerGone`` if the runner fails the request or exits
        first; leaving early (cancelled) has the runner drop the rest of it."""
        req_id = next(self._ids)
        send, recv = trio.open_memory_channel[ev.Embeddings | ev.Failed](1)
        self._embeds[req_id] = send
        try:
            self._outbox_send.send_nowait(cmd.Embed(req_id, inputs))
        except trio.ClosedResourceError:
            del self._embeds[req_id]
            raise RunnerGone(f"the runner for model {self.spec.model!r} has exited") from None
        async with recv:
            try:
                answer = await recv.receive()
            except trio.EndOfChannel:
                raise RunnerGone(
                    f"the runner for model {self.spec.model!r} exited while embedding"
                ) from None
            finally:
                if self._embeds.pop(req_id, None) is not None:  # left before the answer:
                    self._send_nowait(cmd.Cancel(req_id))  # the rest is dropped
        if isinstance(answer, ev.Failed):
            raise RunnerGone(f"embedding failed in the runner: {answer.message}")
        return answer.vectors()

    def _send_nowait(self, command: cmd.Command) -> None:
        try:
            self._outbox_send.send_nowait(command)
        except trio.ClosedResourceError:
            pass

    def _dispatch(self, event: ev.Event) -> None:
        match event:
            case ev.Tokens(out):
                self._first_output.set()
                for req_id, token, finish, lp in out:
                    open_ = self._streams.get(req_id)
                    if open_ is None:
                        continue  # cancelled; the runner drops it at its next step
                    stream, stop_ids = open_
                    if finish == "stop" and token in stop_ids:
                        stream.send_nowait(Chunk(None, finish))
                    else:
                        stream.send_nowait(Chunk(token, finish, lp))
                    if finish is not None:
                        del self._streams[req_id]
            case ev.Cached(req_id, tokens):
                open_ = self._streams.get(req_id)
                if open_ is not None:
                    open_[0].send_nowait(Chunk(None, cached=tokens))
            case ev.Saving(memory):
                self.memory = memory
                if self.on_saving is not None:
                    self.on_saving(self.memory)
            case ev.Saved(written, skipped):
                if self.on_saved is not None:
                    self.on_saved(written, skipped)
            case ev.Embeddings(req_id):
                self._first_output.set()
                self._answer_embed(req_id, event)
            case ev.Failed(ids, message, refused):
                self._first_output.set()
                err: RunnerError = (
                    Refused(message)
                    if refused
                    else RunnerGone(f"generation failed in the runner: {message}")
                )
                for failed in ids:
                    if failed is None:
                        continue
                    self._answer_embed(failed, event)
                    open_ = self._streams.pop(failed, None)
                    if open_ is not None:
                        open_[0].send_nowait(Chunk(None, error=err))
            case ev.Pong():
                if self._pongs:
                    try:
                        self._pongs.pop(0).send_nowait(None)
                    except trio.BrokenResourceError:
                        pass  # its waiter gave up
            case ev.Stats(_, memory):
                self.memory = memory
                self.last_stats = event.shown() | {"at": time.time()}
                if self._stats:
                    try:
                        self._stats.pop(0).send_nowait(event)
                    except trio.BrokenResourceError:
                        pass  # its waiter gave up
            case _:
                log.warning("runner for %s sent an unexpected event: %r", self.spec.model, event)

    def _answer_embed(self, req_id: int, answer: ev.Embeddings | ev.Failed) -> None:
        waiter = self._embeds.pop(req_id, None)
        if waiter is not None:
            try:
                waiter.send_nowait(answer)
            except trio.BrokenResourceError:
                pass  # its waiter gave up

    def _fail_all(self, err: Exception) -> None:
        streams, self._streams = self._streams, {}
        for stream, _ in streams.values():
            stream.send_nowait(Chunk(None, error=err))
        for stats in self._stats:
            stats.close()
        for waiter in self._embeds.values():
            waiter.close()
        for pong in self._pongs:
            pong.close()
        self._stats.clear()
        self._pongs.clear()
        self._embeds.clear()
        self._outbox_send.close()


async def _events(stream: trio.abc.ReceiveStream) -> AsyncGenerator[ev.Event, None]:
    buf = b""
    async for data in stream:
        buf += data
        *complete, buf = buf.split(b"\n")
        for line in complete:
            if not line.strip():
                continue
            try:
                event = ev.read(protocol.decode(line))
            except ValueError as e:  # a runner of another version, or a bug
                log.warning("skipping a line from a runner: %s", e)
                continue
            yield event


def _load_error(
    spec: RunnerSpec, first: ev.Event | None, code: int | None, killed: str | None
) -> str:
    if isinstance(first, ev.Fatal):
        why = first.message
    elif killed is not None:
        why = killed
    elif first is None:
        why = f"the runner exited with code {code} before it was ready"
    else:
        why = "the runner did not become ready in time"
    return f"model {spec.model!r} failed to load from {spec.model_dir}: {why}"
