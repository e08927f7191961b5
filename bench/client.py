"""A lean streaming HTTP client for the benchmark: trio sockets and h11.

httpx spends a few milliseconds of Python per request, and with eight
requests started together that is tens of milliseconds before the last one is
even on the wire: the client's cost, not the server's. This client sends each
request on its own connection with nothing but h11's framing, so what the
benchmark times is what mlxd takes.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import h11
import trio


async def sse_events(host: str, port: int, path: str, body: dict[str, Any]) -> AsyncIterator[Any]:
    """POST ``body`` as JSON and yield each ``data:`` event of the SSE reply,
    parsed, until ``[DONE]``."""
    payload = json.dumps(body).encode()
    conn = h11.Connection(h11.CLIENT)
    request = h11.Request(
        method="POST",
        target=path,
        headers=[
            ("Host", f"{host}:{port}"),
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(payload))),
            ("Connection", "close"),
        ],
    )
    async with await trio.open_tcp_stream(host, port) as stream:
        await stream.send_all(
            conn.send(request) + conn.send(h11.Data(data=payload)) + conn.send(h11.EndOfMessage())
        )
        buffer = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                if event.status_code != 200:
                    raise RuntimeError(f"HTTP {event.status_code}")
            elif isinstance(event, h11.Data):
                buffer += event.data
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line == b"data: [DONE]":
                        return
                    if line.startswith(b"data: "):
                        yield json.loads(line[6:])
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                raise RuntimeError("the stream ended without [DONE]")
