"""What the daemon has done lately, for its status page (``GET /``): the
latest requests' accounts, and tokens generated and requests finished per
second over the last ten minutes, sampled every two seconds.

Tokens are counted as they are generated (a long stream shows while it
runs, not at its end); requests as they finish. Only requests with a body
(POST: generation, embeddings, loads) are kept, so the page's own polling
never fills the list it shows."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import attrs
import trio

SAMPLE_S = 2.0
KEPT_S = 600.0
LATEST = 40


@attrs.define
class Activity:
    tokens: int = 0  # generated since the daemon started
    requests: int = 0  # finished since then
    latest: deque[dict[str, Any]] = attrs.field(factory=lambda: deque(maxlen=LATEST))
    # (Unix time, tokens per second, requests per second) of each interval
    samples: deque[tuple[float, float, float]] = attrs.field(
        factory=lambda: deque(maxlen=int(KEPT_S / SAMPLE_S))
    )

    def finished(self, row: dict[str, Any]) -> None:
        """A request's account (``api/record.py``), newest last."""
        self.requests += 1
        self.latest.append(row)

    async def run(self) -> None:
        """Take a sample every ``SAMPLE_S``, for ever."""
        tokens, requests, then = self.tokens, self.requests, trio.current_time()
        while True:
            await trio.sleep(SAMPLE_S)
            now = trio.current_time()
            span = max(now - then, 1e-3)
            self.samples.append(
                (
                    round(time.time(), 3),
                    round((self.tokens - tokens) / span, 2),
                    round((self.requests - requests) / span, 3),
                )
            )
            tokens, requests, then = self.tokens, self.requests, now

    def snapshot(self) -> dict[str, Any]:
        return {
            "sample_s": SAMPLE_S,
            "kept": self.samples.maxlen,  # the samples a chart spans
            "samples": [
                {"time": t, "tokens_per_s": tps, "requests_per_s": rps}
                for t, tps, rps in self.samples
            ],
            "tokens": self.tokens,
            "requests": self.requests,
            "latest": list(reversed(self.latest)),
        }
