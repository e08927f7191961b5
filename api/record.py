"""One request's account: its timings and tokens, logged as one line and
counted in the metrics when the response has been sent (for a stream, after
its last byte)."""

from __future__ import annotations

import logging
import time
from typing import Any

import attrs

from api.activity import Activity
from api.clients import Client
from api.errors import describe
from config.settings import PRIORITIES
from scheduler.errors import MlxdError
from scheduler.metrics import Metrics

log = logging.getLogger("mlxd.request")

CLIENT_GONE = 499  # as nginx logs it: the client closed the connection first


@attrs.define
class Intake:
    """The requests being read and prepared, not yet queued for a model.

    A request sent to a runner while others are here says that more follow
    (``more`` in the runner protocol), so that an idle runner waits a moment
    and reads them together. Only a hint: a request that never leaves (its
    handler cancelled mid-way) stops counting after ``STALE_S``.
    """

    STALE_S = 1.0

    _entered: dict[str, float] = attrs.field(factory=dict)

    def enter(self, request_id: str) -> None:
        self._entered[request_id] = time.monotonic()

    def leave(self, request_id: str) -> None:
        self._entered.pop(request_id, None)

    def busy(self) -> bool:
        """Whether any request is being read or prepared now."""
        since = time.monotonic() - self.STALE_S
        for request_id, entered in list(self._entered.items()):
            if entered >= since:
                return True
            del self._entered[request_id]
        return False


@attrs.define
class Tokens:
    """A request's token counts: the one tally that its usage (in every
    endpoint's shape) and its log line and metrics all read. The decoder
    counts what is generated; the runner says what was cached."""

    prompt: int = 0
    cached: int | None = None  # known once the runner has looked the prompt up
    generated: int = 0
    reasoning: int = 0  # of ``generated``, those inside a reasoning block
    caching: bool = False  # the model keeps prompts in its prefix cache
    marked: int = 0  # prompt tokens up to the request's last cache mark (Anthropic's)

    @property
    def written(self) -> int:
        """Prompt tokens the request adds to its model's prefix cache: those
        it did not find there (none if the model keeps no prefix cache)."""
        return self.prompt - (self.cached or 0) if self.caching else 0


@attrs.define
class Record:
    id: str
    endpoint: str
    metrics: Metrics
    intake: Intake | None = None  # counted in it until queued (or finished); POSTs only
    activity: Activity | None = None  # what the status page shows
    arrived: float = attrs.field(factory=time.monotonic)
    model: str = ""
    client: Client = attrs.field(factory=Client)  # who sent it (``api/clients.py``)
    tokens: Tokens = attrs.field(factory=Tokens)
    queue_s: float | None = None
    kv_reserved: int | None = None  # KV cache bytes reserved for it once granted
    body_bytes: int | None = None  # its request body's size, once read
    ttft_s: float | None = None
    paused_s: float = 0.0  # paused to wait for memory to grow its KV (``api/generation.py``)
    pauses: int = 0
    images: int = 0  # in its prompt
    streaming: bool = False  # then the stream's end finishes the record
    error: str | None = None  # a failure after a stream had started
    failed: int | None = None  # its HTTP status, which the stream could no longer send
    _last_token: float | None = None
    _itl: Any = None
    _done: bool = False

    def __attrs_post_init__(self) -> None:
        if self.intake is not None:
            self.intake.enter(self.id)

    def fail(self, exc: MlxdError) -> None:
        """The stream (already 200) failed: it is logged and counted with the
        status the error would have had."""
        self.error, self.failed = exc.message, describe(exc)[0]

    def queued(self) -> None:
        """Read and prepared: it leaves the intake for its model's queue."""
        if self.intake is not None:
            self.intake.leave(self.id)

    def others_arriving(self) -> bool:
        """Whether other requests are being read or prepared right now."""
        return self.intake is not None and self.intake.busy()

    def granted(self, waited_s: float, kv_reserved: int) -> None:
        self.queue_s, self.kv_reserved = waited_s, kv_reserved
        self.metrics.queue_time.labels(self.model, self._client_label).observe(waited_s)

    @property
    def _client_label(self) -> str:
        return self.metrics.client(self.client.name)

    def paused(self, seconds: float) -> None:
        self.pauses += 1
        self.paused_s += seconds

    def token(self) -> None:
        """A token has come (the decoder counts it): its timing."""
        now = time.monotonic()
        if self.activity is not None:
            self.activity.tokens += 1
        if self._last_token is None:
            self.ttft_s = now - self.arrived
            self._itl = self.metrics.itl.labels(self.model)  # once, not per token
        else:
            self._itl.observe(now - self._last_token)
        self._last_token = now

    def finish(self, status: int) -> None:
        if self._done:
            return
        self._done = True
        self.queued()
        status = self.failed or status
        duration = time.monotonic() - self.arrived
        m, tokens, client = self.metrics, self.tokens, self._client_label
        m.requests.labels(self.endpoint, self.model, str(status), client).inc()
        if self.model and self.queue_s is not None:
            m.prompt_tokens.labels(self.model, client).inc(tokens.prompt)
            m.generation_tokens.labels(self.model, client).inc(tokens.generated)
            m.images.labels(self.model).inc(self.images)
            if self.ttft_s is not None:
                m.ttft.labels(self.model, client).observe(self.ttft_s)
                m.e2e.labels(self.model).observe(duration)
        if self.model and tokens.cached is not None:
            hit = m.prefix_hits if tokens.cached else m.prefix_misses
            hit.labels(self.model).inc()
            m.prefix_tokens.labels(self.model).inc(tokens.cached)
        if self.activity is not None and self.intake is not None:
            self.activity.finished(self._row(status, duration))
        # A GET that went well (the status page's polling, Prometheus's
        # scrapes) is logged only at debug: every few seconds, all day.
        quiet = self.intake is None and status < 400
        log.log(
            logging.DEBUG if quiet else logging.INFO,
            "request id=%s model=%s client=%s priority=%s endpoint=%s status=%d prompt_tokens=%d "
            "cached_tokens=%s generated_tokens=%d kv_reserved=%s queue_s=%s ttft_s=%s "
            "duration_s=%.3f%s%s%s",
            self.id,
            self.model or "-",
            self.client.name or "-",
            PRIORITIES[self.client.priority],
            self.endpoint,
            status,
            tokens.prompt,
            "-" if tokens.cached is None else tokens.cached,
            tokens.generated,
            "-" if self.kv_reserved is None else self.kv_reserved,
            _seconds(self.queue_s),
            _seconds(self.ttft_s),
            duration,
            f" images={self.images}" if self.images else "",
            f" pauses={self.pauses} paused_s={self.paused_s:.3f}" if self.pauses else "",
            f" error={self.error!r}" if self.error else "",
        )

    def _row(self, status: int, duration: float) -> dict[str, Any]:
        """Its account, as the status page lists it."""
        t = self.tokens
        return {
            "time": round(time.time(), 3),
            "id": self.id,
            "endpoint": self.endpoint,
            "model": self.model or None,
            "client": self.client.name or None,
            "priority": PRIORITIES[self.client.priority],
            "status": status,
            "prompt_tokens": t.prompt,
            "cached_tokens": t.cached,
            "generated_tokens": t.generated,
            "queue_s": self.queue_s,
            "ttft_s": self.ttft_s,
            "duration_s": round(duration, 3),
            "pauses": self.pauses,
            "paused_s": round(self.paused_s, 3),
            "images": self.images,
            "error": self.error,
        }


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
