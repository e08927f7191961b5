"""Metrics as operators see them: the exposition (checked by promtool), and a
real Prometheus scraping a real daemon under traffic, answering every query
of the Grafana dashboard."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import TLS, Daemon, free_port
from tests.waiting import eventually

ROOT = Path(__file__).parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "mlxd.json"
SCRAPE_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hi"}]

# .ci/run installs Debian's prometheus package, and in CI these tests must run;
# elsewhere they say that Prometheus is missing.
needs_prometheus = pytest.mark.skipif(
    not os.environ.get("CI") and not (shutil.which("prometheus") and shutil.which("promtool")),
    reason="Prometheus is not installed (.ci/run installs Debian's package)",
)


async def traffic(daemon: Daemon) -> None:
    """Requests that touch every metric: plain, streamed, refused, unloaded."""
    async with daemon.client() as client:
        await client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8)
        stream = await client.chat.completions.create(
            model="tiny", messages=CHAT, max_tokens=8, stream=True
        )
        async for _ in stream:
            pass
    async with httpx.AsyncClient(base_url=daemon.url, timeout=60, verify=TLS) as http:
        bad = {"model": "tiny", "messages": CHAT, "temperature": 7}
        assert (await http.post("/v1/chat/completions", json=bad)).status_code == 400
        assert (await http.post("/api/unload", json={"model": "tiny"})).status_code == 200


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_metrics_count_what_happened(talker: Daemon) -> None:
    """On a scripted model (``talker``): the counts do not depend on what it computes."""
    await traffic(talker)
    async with httpx.AsyncClient(base_url=talker.url, timeout=60, verify=TLS) as http:

        async def unloaded() -> dict[tuple[str, frozenset[tuple[str, str]]], float] | None:
            got = samples((await http.get("/metrics")).text)
            return got if got["mlxd_models_resident", frozenset()] == 0 else None

        got = await eventually(unloaded, what="the unload to complete")

    def value(name: str, **labels: str) -> float:
        return got[name, frozenset(labels.items())]

    chat = {"endpoint": "/v1/chat/completions", "client": "other"}  # no clients configured
    assert value("mlxd_requests_total", **chat, model="tiny", status="200") == 2
    assert value("mlxd_requests_total", **chat, model="", status="400") == 1
    assert value("mlxd_generation_tokens_total", model="tiny", client="other") == 16
    assert value("mlxd_time_to_first_token_seconds_count", model="tiny", client="other") == 2
    assert value("mlxd_inter_token_latency_seconds_count", model="tiny") == 14
    assert value("mlxd_request_queue_time_seconds_count", model="tiny", client="other") == 2
    assert value("mlxd_model_loads_total", model="tiny") == 1
    assert value("mlxd_evictions_total", model="tiny", reason="manual") == 1
    assert value("mlxd_evictions_total", model="tiny", reason="memory") == 0
    assert value("mlxd_models_resident") == 0
    assert value("mlxd_memory_budget_bytes") > 0
    assert value("mlxd_num_requests_running", model="tiny") == 0


@needs_prometheus
async def test_promtool_accepts_the_exposition(tiny: Daemon) -> None:
    await traffic(tiny)
    async with httpx.AsyncClient(base_url=tiny.url, timeout=60, verify=TLS) as http:
        text = (await http.get("/metrics")).text
    check = await trio.run_process(
        ["promtool", "check", "metrics"],
        stdin=text.encode(),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr


def dashboard_queries() -> Iterator[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    assert any(v["name"] == "model" for v in dashboard["templating"]["list"])
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            yield panel["title"], target["expr"]


@needs_prometheus
async def test_prometheus_scrapes_and_every_dashboard_query_returns_data(
    tiny: Daemon, tmp_path: Path
) -> None:
    target = tiny.url.removeprefix("http://")
    config = SCRAPE_CONFIG.read_text().replace("127.0.0.1:8642", target)
    config = config.replace("scrape_interval: 5s", "scrape_interval: 1s")
    (tmp_path / "prometheus.yml").write_text(config)
    port = free_port()
    prometheus = await trio.lowlevel.open_process(
        [
            "prometheus",
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        api_url = f"http://127.0.0.1:{port}/api/v1"
        async with httpx.AsyncClient(base_url=api_url, timeout=60, verify=TLS) as api:

            async def query(expr: str) -> list[Any]:
                answer = await api.get("/query", params={"query": expr})
                # (a starting Prometheus answers 503 in plain text: not yet)
                assert answer.status_code == 200, (expr, answer.status_code, answer.text[:200])
                reply = answer.json()
                assert reply["status"] == "success", (expr, reply)
                return list(reply["data"]["result"])

            async def scraped() -> bool:
                try:
                    return any(r["value"][1] == "1" for r in await query('up{job="mlxd"}'))
                except httpx.TransportError:
                    return False

            await traffic(tiny)  # while Prometheus starts (seconds)
            await eventually(scraped, what="Prometheus to start and scrape mlxd")

            async def every_panel_has_data() -> bool:  # once two scrapes came (for rates)
                for title, expr in dashboard_queries():
                    expr = expr.replace("$model", ".*").replace("$__rate_interval", "1m")
                    assert await query(expr), f"panel {title!r}: no data for {expr}"
                return True

            await eventually(every_panel_has_data, what="data for every dashboard panel")
    finally:
        prometheus.terminate()
        await prometheus.wait()
