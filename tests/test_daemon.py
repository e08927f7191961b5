"""The ``mlxd`` command as a real process: serving, SIGTERM, port clashes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port


@pytest.fixture
def config(tmp_path: Path, tiny_dir: Path) -> Path:
    path = tmp_path / "mlxd.toml"
    path.write_text(f"""
port = {free_port()}
cache_dir = "{tmp_path / "cache"}"
shutdown_grace_s = 20
[[models]]
name = "tiny"
path = "{tiny_dir}"
""")
    return path


def port_of(config: Path) -> int:
    return int(config.read_text().split("port = ")[1].split()[0])


@pytest.fixture
def daemon(config: Path) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", "serve", "--config", str(config)],
    )
    url = f"http://127.0.0.1:{port_of(config)}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_sigterm_mid_stream_finishes_the_stream_and_leaves_no_runner(
    daemon: subprocess.Popen[bytes], config: Path
) -> None:
    url = f"http://127.0.0.1:{port_of(config)}"
    body = {"model": "tiny", "prompt": "Go", "max_tokens": 300, "temperature": 0, "stream": True}
    events: list[str] = []
    signalled = False
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", f"{url}/v1/completions", json=body) as resp,
    ):
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append(line)
            if len(events) == 3 and daemon.returncode is None and not signalled:
                signalled = True
                runner_pid = http.get(f"{url}/api/ps").json()["models"][0]["pid"]
                daemon.send_signal(signal.SIGTERM)
    assert events[-1] == "data: [DONE]"
    assert '"finish_reason":"length"' in events[-2]
    assert daemon.wait(timeout=30) == 0
    with pytest.raises(ProcessLookupError):
        os.kill(runner_pid, 0)


def test_second_daemon_on_the_same_port_exits_with_a_clear_error(
    daemon: subprocess.Popen[bytes], config: Path
) -> None:
    second = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 1
    assert "already in use" in second.stderr
    assert daemon.poll() is None  # the first one is unharmed
