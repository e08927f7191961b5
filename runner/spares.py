"""Runner processes started ahead of need: ``spawn`` starts one, ``Spares``
keeps one waiting for the next load (``runner/client.py``'s
``RunnerProcess`` takes it, or spawns its own)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio

from runner import events as ev
from runner import protocol

log = logging.getLogger("mlxd.runner")


async def spawn(python: str = sys.executable, *, spare: bool = False) -> trio.Process:
    """Start a runner process with no model, to wait for a ``load`` command.
    A spare first imports MLX and mlx-lm and starts the device; one started
    for a load goes straight to the load (which imports what its engine needs)."""
    env = {**os.environ, "PYTHONPATH": package_root()}
    command = [python, "-m", "runner", *(["--spare"] if spare else [])]
    return await trio.lowlevel.open_process(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
    )


class _Spare:
    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.announced = trio.Event()  # its "spare" line was read (or it died)
        self.ready = False
        self.bytes = 0  # the memory it said it holds

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


class Spares:
    """Keeps one runner process started ahead of need.

    Importing MLX and mlx-lm and starting the device take seconds (tens of
    them on a CUDA host); a spare has done it already, so a load pays only for
    the model. Whoever takes the spare owns it. The next one starts only once
    no load is under way (a load ends with its first request's first token),
    so that its imports and device start never compete with a swap.

    The memory a spare holds (a CUDA context, on a CUDA host) is the pool's
    to account for: ``watch`` gives the pool's callbacks, told what a spare
    holds (None while one starts, 0 once there is none) and asked whether
    one may start.
    """

    RETRY_S = 30.0  # after a spare died before it was ready
    LOOK_S = 1.0  # how often the keeper looks, also for a spare that died
    START_TIMEOUT_S = 120.0  # a spare still starting after this is stuck

    def __init__(self, python: str = sys.executable, *, enabled: bool = True) -> None:
        self._python = python
        self._enabled = enabled  # off: every load starts its own process
        self._spare: _Spare | None = None
        self._loads = 0
        self._wake = trio.Event()
        self._held: Callable[[int | None], None] = lambda held: None
        self._fits: Callable[[], bool] = lambda: True

    def watch(self, held: Callable[[int | None], None], fits: Callable[[], bool]) -> None:
        self._held, self._fits = held, fits

    def status(self) -> dict[str, Any]:
        if not self._enabled:
            return {"state": "off", "pid": None, "bytes": 0}
        spare = self._spare
        if spare is None or not spare.alive:
            return {"state": "none", "pid": None, "bytes": 0}
        state = "ready" if spare.ready else "starting"
        return {"state": state, "pid": spare.proc.pid, "bytes": spare.bytes}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep a spare started while no load is under way; kill it on exit."""
        try:
            task_status.started()
            while self._enabled:
                alive = self._spare is not None and self._spare.alive
                if self._spare is not None and not alive:
                    self._spare = None
                    self._held(0)
                if self._loads or alive or not self._fits():
                    self._wake = trio.Event()
                    with trio.move_on_after(self.LOOK_S):  # also notices a spare that died
                        await self._wake.wait()
                    continue
                self._held(None)
                spare = self._spare = _Spare(await spawn(self._python, spare=True))
                await self._announce(spare)
                if not spare.ready:
                    log.error("a spare runner exited before it was ready; retrying later")
                    await trio.sleep(self.RETRY_S)
        finally:
            left, self._spare = self._spare, None
            self._held(0)
            if left is not None:
                left.proc.kill()
                with trio.CancelScope(shield=True):
                    await left.proc.wait()

    async def _announce(self, spare: _Spare) -> None:
        assert spare.proc.stdout is not None
        try:
            line = await _first_line(spare.proc.stdout)
            said = ev.read(line) if line is not None else None
            if isinstance(said, ev.Spare):
                spare.ready, spare.bytes = True, said.bytes
                if self._spare is spare:  # not taken meanwhile
                    self._held(spare.bytes)
                log.info(
                    "spare runner ready pid=%s startup_s=%.3f bytes=%d",
                    said.pid,
                    said.startup_s,
                    spare.bytes,
                )
        finally:
            spare.announced.set()

    @contextmanager
    def loading(self) -> Iterator[None]:
        """Hold off the next spare while a load is under way (for a runner:
        until its load has settled)."""
        self._loads += 1
        try:
            yield
        finally:
            self._loads -= 1
            self._wake.set()

    async def take(self) -> trio.Process:
        """A started runner process: the spare (waiting for it to be ready if
        it is still starting, up to ``START_TIMEOUT_S``) or a new one."""
        spare, self._spare = self._spare, None
        if spare is not None:
            self._held(0)  # its memory is the load's now
        if spare is not None and spare.alive:
            usable = False
            try:
                with trio.move_on_after(self.START_TIMEOUT_S):
                    await spare.announced.wait()
                usable = spare.ready and spare.alive
            finally:
                if not usable:  # stuck, dead, or the load was cancelled
                    spare.proc.kill()
                    with trio.CancelScope(shield=True):
                        await spare.proc.wait()
            if usable:
                return spare.proc
            log.warning("the spare runner was not ready in time; starting another")
        return await spawn(self._python)


async def _first_line(stream: trio.abc.ReceiveStream) -> dict[str, Any] | None:
    """Read one line, and nothing after it (the rest belongs to whoever
    reads the stream next). ``None`` if the stream ends first."""
    buf = b""
    while not buf.endswith(b"\n"):
        data = await stream.receive_some(1)
        if not data:
            return None
        buf += data
    return protocol.decode(buf)


def package_root() -> str:
    root = str(Path(__file__).resolve().parent.parent)
    current = os.environ.get("PYTHONPATH")
    return f"{root}{os.pathsep}{current}" if current else root
