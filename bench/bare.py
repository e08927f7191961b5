"""The HTTP stack alone, for ``bench/serving.py``'s floor: Hypercorn and
Quart-trio answering a streamed completion at once, with no model.

    python -m bench.bare PORT

What N clients wait for their first event from it is what the stack itself
takes for N requests arriving so (its parsing, routing and the answer's
first write), the part of mlxd's time to first token no model work can
remove.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart import Response, request
from quart_trio import QuartTrio

app = QuartTrio("bare")


@app.post("/v1/completions")
async def completions() -> Response:
    body = await request.get_json()
    tokens = int(body.get("max_tokens", 1))

    async def events() -> AsyncIterator[bytes]:
        for _ in range(tokens):
            yield b'data: {"choices": [{"index": 0, "text": " the"}]}\n\n'
        yield b"data: [DONE]\n\n"

    return Response(events(), content_type="text/event-stream")


def main() -> None:
    config = Config()
    config.bind = [f"127.0.0.1:{int(sys.argv[1])}"]
    config.accesslog = None
    trio.run(serve, app, config)


if __name__ == "__main__":
    main()
