"""Prometheus metrics, prefix ``mlxd_``, with vLLM's names where vLLM has one.

Counters and histograms are updated where things happen (the API for
requests and tokens, the pool for loads and evictions). Gauges of the pool's
state (requests waiting and running, resident models, bytes) are read from
the pool at scrape time, so the policy stays the one owner of that state.
Each daemon has its own registry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# Seconds: from 10 ms (a queue that is empty, a first token on a GPU) to
# minutes (a model loading, a long generation on a CPU).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
TOKEN_GAP_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5)

EVICTION_REASONS = ("idle", "expired", "memory", "manual")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


OTHER = "other"  # the ``client`` label of every request from a client not configured


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.clients: frozenset[str] = frozenset()  # the ``client`` label's names, and OTHER

        def counter(name: str, doc: str, *labels: str) -> Counter:
            return Counter(name, doc, list(labels or ["model"]), registry=r)

        def histogram(name: str, doc: str, buckets: tuple[float, ...], *labels: str) -> Histogram:
            return Histogram(name, doc, list(labels or ["model"]), buckets=buckets, registry=r)

        self.requests = counter(
            "mlxd_requests",
            "HTTP requests by endpoint, model, status code and client",
            *("endpoint", "model", "status", "client"),
        )
        self.prompt_tokens = counter(
            "mlxd_prompt_tokens", "Prompt tokens processed", "model", "client"
        )
        self.generation_tokens = counter(
            "mlxd_generation_tokens", "Tokens generated", "model", "client"
        )
        self.images = counter("mlxd_prompt_images", "Images in prompts (each its tokens too)")
        self.queue_time = histogram(
            "mlxd_request_queue_time_seconds",
            "Wait for a model slot (queue and load)",
            LATENCY_BUCKETS,
            *("model", "client"),
        )
        self.ttft = histogram(
            "mlxd_time_to_first_token_seconds",
            "From arrival to the first generated token",
            LATENCY_BUCKETS,
            *("model", "client"),
        )
        self.itl = histogram(
            "mlxd_inter_token_latency_seconds",
            "Time between consecutive generated tokens",
            TOKEN_GAP_BUCKETS,
        )
        self.e2e = histogram(
            "mlxd_e2e_request_latency_seconds", "From arrival to the last token", LATENCY_BUCKETS
        )
        self.loads = counter("mlxd_model_loads", "Models loaded")
        self.load_failures = counter("mlxd_model_load_failures", "Model loads that failed")
        self.load_duration = histogram(
            "mlxd_model_load_duration_seconds",
            "From starting a runner to the model being ready",
            LATENCY_BUCKETS,
        )
        self.evictions = counter(
            "mlxd_evictions",
            "Models unloaded, by reason (idle, expired, memory, manual)",
            *("model", "reason"),
        )
        self.prefix_hits = counter(
            "mlxd_prefix_cache_hits",
            "Requests that reused a cached prefix (in memory or from disk)",
        )
        self.prefix_misses = counter(
            "mlxd_prefix_cache_misses", "Requests that found no cached prefix to reuse"
        )
        self.prefix_tokens = counter(
            "mlxd_prefix_cache_tokens",
            "Prompt tokens taken from the prefix cache instead of being read",
        )
        self.prefix_drops = counter(
            "mlxd_prefix_cache_drops",
            "Times an idle model's cached prefixes were dropped to make room for a load",
        )
        self.prefix_disk_written = counter(
            "mlxd_prefix_cache_disk_written_bytes", "Bytes of cached prefixes written to disk"
        )
        self.prefix_disk_skipped = counter(
            "mlxd_prefix_cache_disk_skipped_bytes",
            "Bytes of cached prefixes not written to disk: over the hourly write bound",
        )
        self.runner_crashes = counter(
            "mlxd_runner_crashes", "Runner processes that exited without being asked"
        )

    def add_clients(self, names: Iterable[str]) -> None:
        """The configured clients' names: the ``client`` label takes these and
        ``other``, never a name a request makes up (bounded cardinality)."""
        self.clients = frozenset(names)

    def client(self, name: str) -> str:
        """The ``client`` label of a request from client ``name``."""
        return name if name in self.clients else OTHER

    def add_models(self, names: Iterable[str]) -> None:
        """Start each model's counters at zero, so that every series exists
        (and a dashboard shows 0 rather than "no data") before anything happens."""
        for name in names:
            for client in (*sorted(self.clients), OTHER):
                self.prompt_tokens.labels(name, client)
                self.generation_tokens.labels(name, client)
            for counter in (
                self.images,
                self.loads,
                self.load_failures,
                self.runner_crashes,
                self.prefix_hits,
                self.prefix_misses,
                self.prefix_tokens,
                self.prefix_drops,
                self.prefix_disk_written,
                self.prefix_disk_skipped,
            ):
                counter.labels(name)
            for reason in EVICTION_REASONS:
                self.evictions.labels(name, reason)

    def saved(self, model: str) -> Callable[[int, int], None]:
        """What counts a runner's writes to the prefix disk tier, for ``model``."""

        def count(written: int, skipped: int) -> None:
            self.prefix_disk_written.labels(model).inc(written)
            self.prefix_disk_skipped.labels(model).inc(skipped)

        return count

    def watch_pool(self, status: Callable[[], dict[str, Any]]) -> None:
        """Report the pool's gauges from ``status()`` (``Scheduler.status``)."""
        self.registry.register(_PoolCollector(status))

    def watch(self, name: str, doc: str, read: Callable[[], float]) -> None:
        """Report a gauge read from ``read()`` at scrape time."""
        self.registry.register(_Gauge(name, doc, read))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _PoolCollector(Collector):
    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self._status = status

    def collect(self) -> Iterator[GaugeMetricFamily]:
        pool = self._status()
        gauges = {
            "waiting": GaugeMetricFamily(
                "mlxd_num_requests_waiting", "Requests queued for a model", labels=["model"]
            ),
            "running": GaugeMetricFamily(
                "mlxd_num_requests_running", "Requests generating on a model", labels=["model"]
            ),
            "bytes": GaugeMetricFamily(
                "mlxd_model_bytes", "Bytes charged to a resident model", labels=["model"]
            ),
            "kv": GaugeMetricFamily(
                "mlxd_kv_reserved_bytes",
                "KV cache bytes reserved by the requests a model is running",
                labels=["model"],
            ),
            "short": GaugeMetricFamily(
                "mlxd_num_requests_waiting_for_memory",
                "Requests queued until memory for their KV cache is free",
                labels=["model"],
            ),
            "prefix": GaugeMetricFamily(
                "mlxd_prefix_cache_bytes",
                "Bytes of cached prefixes a model holds in memory",
                labels=["model"],
            ),
            "prefix_disk": GaugeMetricFamily(
                "mlxd_prefix_cache_disk_bytes",
                "Bytes of a model's cached prefixes on disk",
                labels=["model"],
            ),
        }
        resident = 0
        for m in pool["models"]:
            gauges["waiting"].add_metric([m["model"]], m["queued"])
            gauges["running"].add_metric([m["model"]], m["running"])
            gauges["bytes"].add_metric([m["model"]], m["bytes"])
            gauges["kv"].add_metric([m["model"]], m["kv_reserved"])
            gauges["short"].add_metric([m["model"]], m["waiting_for_memory"])
            gauges["prefix"].add_metric([m["model"]], m["prefix_cache"]["bytes"])
            gauges["prefix_disk"].add_metric([m["model"]], m["prefix_cache"]["disk_bytes"])
            resident += m["state"] == "ready"
        yield from gauges.values()
        yield GaugeMetricFamily("mlxd_models_resident", "Models loaded", value=resident)
        yield GaugeMetricFamily(
            "mlxd_memory_used_bytes",
            "Bytes charged to resident models and the spare runner",
            value=pool["used"],
        )
        yield GaugeMetricFamily(
            "mlxd_memory_budget_bytes", "The memory budget", value=pool["budget"]
        )


class _Gauge(Collector):
    def __init__(self, name: str, doc: str, read: Callable[[], float]) -> None:
        self._name, self._doc, self._read = name, doc, read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(self._name, self._doc, value=self._read())
