"""Web pages cannot drive mlxd: Host, Origin and Content-Type checks, CORS
for listed origins only, API keys. The guard stands in front of every route,
so the model behind it is a scripted one (``tests/scripted.py``), whose runner
starts without importing mlx-lm."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest
import trio

from api.guard import Guard, host_name
from config.settings import ModelConfig, Settings
from tests.conftest import TLS, running, settings_for
from tests.scripted import scripted_model

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
APP = "https://app.example"


def test_listening_everywhere_without_keys_or_hosts_is_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="mlxd"):
        Guard.from_settings(Settings(host="0.0.0.0"))
        warned = [r.getMessage() for r in caplog.records]
        Guard.from_settings(Settings(host="0.0.0.0", api_keys=("k",)))
        Guard.from_settings(Settings(host="0.0.0.0", allowed_hosts=("mac.lan",)))
        Guard.from_settings(Settings())  # loopback
    assert len(warned) == 1 and "every interface" in warned[0]
    assert len(caplog.records) == 1  # the others are guarded


def test_host_names_lose_their_port() -> None:
    assert host_name("127.0.0.1:8642") == "127.0.0.1"
    assert host_name("[::1]:8642") == "::1"
    assert host_name("LocalHost") == "localhost"
    assert host_name("::1") == "::1"


async def test_only_this_servers_hosts_and_listed_origins_get_answers(
    tiny_dir: Path, tmp_path: Path
) -> None:
    model = scripted_model(tiny_dir, tmp_path / "tiny", "Hello.")
    settings = settings_for(
        tmp_path,
        ModelConfig("tiny", str(model)),
        allowed_hosts=("mlxd.lan",),
        cors_origins=(APP,),
    )
    async with running(settings) as daemon, httpx.AsyncClient(timeout=120, verify=TLS) as http:
        url = f"{daemon.url}/v1/chat/completions"
        port = settings.port

        async def post(headers: dict[str, str], **kw: object) -> httpx.Response:
            return await http.post(url, headers=headers, **kw)  # type: ignore[arg-type]

        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "mlxd.lan"):
            assert (await post({"Host": host}, json=CHAT)).status_code == 200, host
        # DNS rebinding: a page's own name, pointed at 127.0.0.1.
        rebound = await post({"Host": f"evil.example:{port}"}, json=CHAT)
        assert rebound.status_code == 403 and rebound.json()["error"]["code"] == "forbidden"

        page = await post({"Origin": "https://evil.example"}, json=CHAT)
        assert page.status_code == 403 and "cors_origins" in page.json()["error"]["message"]
        assert "access-control-allow-origin" not in page.headers
        # A page's "simple" request, which browsers send without asking first.
        plain = await post({"Content-Type": "text/plain"}, content=b'{"model": "tiny"}')
        assert plain.status_code == 415
        assert plain.json()["error"]["code"] == "unsupported_media_type"

        listed = await post({"Origin": APP}, json=CHAT)
        assert listed.status_code == 200 and listed.headers["access-control-allow-origin"] == APP
        asking = {"Origin": APP, "Access-Control-Request-Method": "POST"}
        preflight = await http.options(url, headers=asking)
        assert preflight.status_code == 204
        assert preflight.headers["access-control-allow-origin"] == APP
        assert "content-type" in preflight.headers["access-control-allow-headers"].lower()
        refused = await http.options(url, headers=asking | {"Origin": "https://evil.example"})
        assert refused.status_code == 403
        same = await post({"Origin": f"http://127.0.0.1:{port}"}, json=CHAT)
        assert same.status_code == 200  # a page mlxd itself served
        # An HTTP/1.0 tool sends no Host at all; no browser does that.
        raw = trio.socket.socket()
        await raw.connect(("127.0.0.1", port))
        with raw, trio.fail_after(60):
            await raw.send(b"GET /v1/models HTTP/1.0\r\n\r\n")
            head = b""
            while len(head) < 12 and (part := await raw.recv(64)):
                head += part
            assert head.startswith(b"HTTP/1.1 200"), head


async def test_api_keys_are_required_and_health_is_open(tiny_dir: Path, tmp_path: Path) -> None:
    model = ModelConfig("tiny", str(scripted_model(tiny_dir, tmp_path / "tiny", "Hello.")))
    settings = settings_for(tmp_path, model, api_keys=("k1", "k2"))
    async with running(settings) as daemon, httpx.AsyncClient(timeout=120, verify=TLS) as http:
        url = f"{daemon.url}/v1/chat/completions"
        for key, status in (("k2", 200), ("k1", 200), ("k3", 401), ("k", 401), ("k1x", 401)):
            resp = await http.post(url, json=CHAT, headers={"Authorization": f"Bearer {key}"})
            assert resp.status_code == status, key
        assert (await http.post(url, json=CHAT)).status_code == 401
        assert (await http.get(f"{daemon.url}/health")).status_code == 200
