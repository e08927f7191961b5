"""The ``mlxd`` command as a real process: serving, SIGTERM, SIGHUP, port clashes, doctor.

The model is a scripted one (``tests/scripted.py``), a token every 5 ms: these
are tests of the process, and a stream is still running when a signal comes.
(``test_no_torch.py`` and ``test_smollm2.py`` serve real models through ``mlxd serve``.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import TLS, free_port, healthy
from tests.scripted import talking_model
from tests.waiting import eventually_blocking


@pytest.fixture
def scripted(tiny_dir: Path, tmp_path: Path) -> Path:
    return talking_model(tiny_dir, tmp_path / "talker", step_s=0.005)


@pytest.fixture
def config(request: pytest.FixtureRequest, tmp_path: Path, scripted: Path) -> Path:
    """The daemon's config: no spare runner (a process whose imports cost two
    seconds of CPU) unless a test asks for one, and a grace period of 20 s for
    open requests at shutdown (``indirect``: ``{"spare": True, "grace": 2}``)."""
    asked = getattr(request, "param", {})
    spare, grace = asked.get("spare", False), asked.get("grace", 20)
    path = tmp_path / "mlxd.toml"
    path.write_text(f"""
port = {free_port()}
cache_dir = "{tmp_path / "cache"}"
shutdown_grace_s = {grace}
spare_runner = {str(spare).lower()}
[[models]]
name = "tiny"
path = "{scripted}"
""")
    return path


def port_of(config: Path) -> int:
    return int(config.read_text().split("port = ")[1].split()[0])


@pytest.fixture
def daemon(config: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``mlxd serve`` as a process; its log goes to ``mlxd.log`` beside the config."""
    with (config.parent / "mlxd.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "serve", "--config", str(config)], stderr=log
        )
    eventually_blocking(
        lambda: healthy(proc, f"http://127.0.0.1:{port_of(config)}"), what="the daemon to serve"
    )
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("config", [{"spare": True}], ids=["with a spare"], indirect=True)
def test_sigterm_mid_stream_finishes_the_stream_and_leaves_no_runner(
    daemon: subprocess.Popen[bytes], config: Path
) -> None:
    url = f"http://127.0.0.1:{port_of(config)}"
    body = {"model": "tiny", "prompt": "Go", "max_tokens": 300, "temperature": 0, "stream": True}
    events: list[str] = []
    signalled = False
    with (
        httpx.Client(timeout=60, verify=TLS) as http,
        http.stream("POST", f"{url}/v1/completions", json=body) as resp,
    ):
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append(line)
            if len(events) == 3 and daemon.returncode is None and not signalled:
                signalled = True
                pool = http.get(f"{url}/api/ps").json()
                pids = [pool["models"][0]["pid"], pool["spare"]["pid"]]  # (a spare may be starting)
                daemon.send_signal(signal.SIGTERM)
    assert events[-1] == "data: [DONE]"
    assert '"finish_reason":"length"' in events[-2]
    assert daemon.wait(timeout=30) == 0
    for pid in filter(None, pids):  # the model's runner and the spare are gone
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.parametrize("config", [{"grace": 3}], ids=["3 s of grace"], indirect=True)
def test_answers_still_open_when_the_grace_period_ends_say_why(
    daemon: subprocess.Popen[bytes], config: Path
) -> None:
    """A stream gets an error event and a whole answer a 503 saying the
    daemon is shutting down, not a connection cut without a word."""
    url = f"http://127.0.0.1:{port_of(config)}"
    endless = {"model": "tiny", "prompt": "Go", "max_tokens": 100_000, "temperature": 0}
    whole: list[httpx.Response] = []

    def ask_whole() -> None:
        with httpx.Client(timeout=60, verify=TLS) as http:
            whole.append(http.post(f"{url}/v1/completions", json=endless))

    asking = threading.Thread(target=ask_whole)
    events: list[str] = []
    signalled = False
    with (
        httpx.Client(timeout=60, verify=TLS) as http,
        http.stream("POST", f"{url}/v1/completions", json={**endless, "stream": True}) as resp,
    ):
        asking.start()
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append(line)
            if len(events) == 3 and not signalled:
                signalled = True
                eventually_blocking(
                    lambda: http.get(f"{url}/api/ps").json()["models"][0]["running"] == 2,
                    what="both requests running",
                )
                daemon.send_signal(signal.SIGTERM)
    asking.join(timeout=60)
    assert "shutting down" in json.loads(events[-1][len("data: ") :])["error"]["message"]
    (answer,) = whole
    assert answer.status_code == 503 and "shutting down" in answer.json()["error"]["message"]
    assert daemon.wait(timeout=30) == 0


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


def models_of(url: str) -> set[str]:
    return {m["id"] for m in httpx.get(f"{url}/v1/models", timeout=30, verify=TLS).json()["data"]}


def test_sighup_adds_and_removes_models_while_a_stream_goes_on(
    daemon: subprocess.Popen[bytes], config: Path, scripted: Path
) -> None:
    url = f"http://127.0.0.1:{port_of(config)}"
    original = config.read_text()
    body = {"model": "tiny", "prompt": "Go", "max_tokens": 200, "temperature": 0, "stream": True}
    events: list[str] = []
    with (
        httpx.Client(timeout=60, verify=TLS) as http,
        http.stream("POST", f"{url}/v1/completions", json=body) as resp,
    ):
        for line in resp.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line)
            if len(events) != 3:  # once, at the third event
                continue
            assert models_of(url) == {"tiny"}
            config.write_text(original + f'[[models]]\nname = "added"\npath = "{scripted}"\n')
            daemon.send_signal(signal.SIGHUP)
            eventually_blocking(
                lambda: models_of(url) == {"tiny", "added"}, what="the added model to be served"
            )
            short = {"model": "added", "prompt": "Hi", "max_tokens": 2}
            assert http.post(f"{url}/v1/completions", json=short).status_code == 200

            # Removing "added", and a broken file that is refused
            config.write_text(original)
            daemon.send_signal(signal.SIGHUP)
            eventually_blocking(lambda: models_of(url) == {"tiny"}, what="the model's removal")
            assert http.post(f"{url}/v1/completions", json=short).status_code == 404
            config.write_text(original.replace("port = ", "port = 'x' #"))
            daemon.send_signal(signal.SIGHUP)
            eventually_blocking(
                lambda: "the new config is refused" in http.get(f"{url}/api/errors").text,
                what="the broken config's refusal",
            )
            assert models_of(url) == {"tiny"}
    assert events[-1] == "data: [DONE]"  # the stream on "tiny" went on unharmed
    assert '"finish_reason":"length"' in events[-2]  # all 200 tokens came
    config.write_text(original)
    doctor = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "doctor", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert doctor.returncode == 0, doctor.stderr
    assert "packages: mlx " in doctor.stdout and "daemon: running" in doctor.stdout
    assert "the new config is refused" in doctor.stdout  # among the recent errors
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=30) == 0
    log = (config.parent / "mlxd.log").read_text()
    assert "added added" in log and "removed added" in log
    assert "the new config is refused" in log and "port" in log


def start(config: Path) -> subprocess.Popen[bytes]:
    with (config.parent / "mlxd.log").open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "serve", "--config", str(config)], stderr=log
        )
    url = f"http://127.0.0.1:{port_of(config)}"
    eventually_blocking(lambda: healthy(proc, url), what="the daemon to serve")
    return proc


def test_a_stored_response_survives_a_sigkill(config: Path) -> None:
    """With ``persist_responses``, what a client was answered is on file the
    moment it was answered: a SIGKILL (the OOM killer, a crash) a moment
    later loses nothing of it."""
    config.write_text(
        config.read_text().replace("[[models]]", "persist_responses = true\n[[models]]")
    )
    url = f"http://127.0.0.1:{port_of(config)}"
    proc = start(config)
    try:
        with httpx.Client(timeout=60, verify=TLS) as http:
            body = {"model": "tiny", "input": "Hi", "max_output_tokens": 3}
            made = http.post(f"{url}/v1/responses", json=body).json()
            conv = http.post(f"{url}/v1/conversations", json={"items": []}).json()
            proc.kill()  # no shutdown, no last save
            proc.wait()
            proc = start(config)
            kept = http.get(f"{url}/v1/responses/{made['id']}")
            assert kept.status_code == 200 and kept.json()["output"] == made["output"]
            assert http.get(f"{url}/v1/conversations/{conv['id']}").status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_a_cache_folder_mlxd_cannot_use_is_reported_and_it_serves_without(
    config: Path, tmp_path: Path
) -> None:
    """A regular file where the cache folder should be: one warning, and
    the daemon serves (no prefix files, stored responses in memory), and
    stops cleanly."""
    (tmp_path / "cache").write_text("not a folder")
    config.write_text(
        config.read_text().replace("[[models]]", "persist_responses = true\n[[models]]")
    )
    url = f"http://127.0.0.1:{port_of(config)}"
    proc = start(config)
    with httpx.Client(timeout=60, verify=TLS) as http:
        answer = http.post(
            f"{url}/v1/responses", json={"model": "tiny", "input": "Hi", "max_output_tokens": 3}
        )
        assert answer.status_code == 200, answer.text
        assert http.get(f"{url}/v1/responses/{answer.json()['id']}").status_code == 200
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    log = (config.parent / "mlxd.log").read_text()
    assert "cache" in log and "not a folder" not in log  # the warning names the path, not junk
