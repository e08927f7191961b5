"""Streams whose client stopped reading.

A client that opens a stream and then reads nothing (a hung tool, a
suspended laptop on the other end of a tunnel) would hold its request's slot
for ever: once the socket's buffers are full the server's send blocks, the
response body is never asked for its next event, and its generation, lease
and place in the model's queue stay taken. ``Stalls`` watches every stream
body: one that has waited more than ``send_timeout_s`` for its last event to
be taken is closed, which ends its generation and frees its slot (the
connection itself stays blocked until the client reads or leaves). The
request is logged with status 499 and the reason.

It also ends what a shutdown would cut: Hypercorn gives open requests
``shutdown_grace_s`` to finish, then closes their connections. Shortly
before that (``until_shutdown``), an answer still being generated ends with
the endpoint's error event (a stream) or a 503 (a whole answer), so its
client learns why rather than reading a cut connection.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import aclosing

import trio

from api.record import CLIENT_GONE, Record

log = logging.getLogger("mlxd.api")


class Stalls:
    def __init__(self, send_timeout_s: float) -> None:
        self.send_timeout_s = send_timeout_s
        # Bodies that have handed an event over, and since when, and their request.
        self._waiting: dict[AsyncGenerator[bytes, None], tuple[float, Record]] = {}
        self._cut_at = math.inf  # when a shutdown's grace period is about to end
        self._open: set[trio.CancelScope] = set()  # ``until_shutdown``'s scopes

    @contextlib.contextmanager
    def until_shutdown(self) -> Iterator[trio.CancelScope]:
        """A scope cancelled shortly before a shutdown's grace period ends."""
        with trio.CancelScope(deadline=self._cut_at) as scope:
            self._open.add(scope)
            try:
                yield scope
            finally:
                self._open.discard(scope)

    def shutting_down(self, grace_s: float) -> None:
        """The daemon stops taking requests; those open have ``grace_s``."""
        margin = min(max(grace_s / 10, 0.2), 1.0)  # to send the error before the cut
        self._cut_at = trio.current_time() + max(grace_s - margin, 0.0)
        for scope in self._open:
            scope.deadline = self._cut_at

    def body(self, frames: AsyncIterator[bytes], record: Record) -> AsyncGenerator[bytes, None]:
        """``frames`` as a response body that is watched, and accounts for its
        request when it ends (499 if the client left or stalled first)."""
        me: list[AsyncGenerator[bytes, None]] = []

        async def watched() -> AsyncGenerator[bytes, None]:
            status = CLIENT_GONE
            try:
                async with aclosing(frames) as it:  # type: ignore[type-var]
                    async for frame in it:
                        self._waiting[me[0]] = (trio.current_time(), record)
                        yield frame
                        self._waiting.pop(me[0], None)
                status = 200
            finally:
                self._waiting.pop(me[0], None)
                record.finish(status)

        me.append(watched())
        return me[0]

    async def run(self) -> None:
        """Close the bodies whose client has taken nothing for too long."""
        while True:
            await trio.sleep(min(self.send_timeout_s / 4, 1.0))
            now = trio.current_time()
            for body, (since, record) in list(self._waiting.items()):
                if now - since > self.send_timeout_s and body in self._waiting:
                    del self._waiting[body]
                    record.error = (
                        f"the client read nothing for {self.send_timeout_s:g} s (send_timeout)"
                    )
                    log.warning("closing stream %s: %s", record.id, record.error)
                    await body.aclose()
