"""The service files: the LaunchAgent plist, ``mlxd service`` against a fake
launchctl, and the systemd unit."""

from __future__ import annotations

import os
import plistlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from daemon import service
from daemon.cli import main

ROOT = Path(__file__).parent.parent

FAKE_LAUNCHCTL = """#!/bin/sh
echo "$@" >> "$LAUNCHCTL_LOG"
case "$1" in
  bootout) [ -f "$LAUNCHCTL_LOG.loaded" ] || { echo "No such process" >&2; exit 3; }
           rm -f "$LAUNCHCTL_LOG.loaded" ;;
  bootstrap) touch "$LAUNCHCTL_LOG.loaded" ;;
  print) [ -f "$LAUNCHCTL_LOG.loaded" ] || exit 113; echo "state = running" ;;
esac
"""


@pytest.fixture
def mac_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home directory and a fake launchctl that records its command lines."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "launchctl"
    fake.write_text(FAKE_LAUNCHCTL)
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("LAUNCHCTL_LOG", str(tmp_path / "launchctl.log"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def launchctl_calls(home: Path) -> list[str]:
    return (home.parent / "launchctl.log").read_text().splitlines()


def test_the_plist_runs_the_installed_mlxd_and_restarts_it_after_a_crash() -> None:
    mlxd = Path("/Users/me/.venv/bin/mlxd")
    logs = Path("/Users/me/Library/Logs/mlxd")
    plist = plistlib.loads(service.render(mlxd, Path("/Users/me/mlxd & co.toml"), logs).encode())
    assert plist["Label"] == service.LABEL
    assert plist["ProgramArguments"] == [str(mlxd), "serve", "--config", "/Users/me/mlxd & co.toml"]
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["RunAtLoad"] is True
    assert plist["StandardErrorPath"] == f"{logs}/mlxd.log"
    assert plist["StandardOutPath"].startswith(str(logs))
    assert plist["ProcessType"] in {"Interactive", "Adaptive", "Standard", "Background"}


def test_install_status_uninstall_drive_launchctl(mac_home: Path, tmp_path: Path) -> None:
    config = tmp_path / "mlxd.toml"
    config.write_text("port = 9000\n")
    assert main(["service", "install", "--config", str(config)]) == 0
    plist_file = mac_home / "Library" / "LaunchAgents" / f"{service.LABEL}.plist"
    plist = plistlib.loads(plist_file.read_bytes())
    assert plist["ProgramArguments"][0] == str(Path(sys.executable).parent / "mlxd")
    assert Path(plist["ProgramArguments"][0]).is_file()
    assert plist["ProgramArguments"][1:] == ["serve", "--config", str(config)]
    assert (mac_home / "Library" / "Logs" / "mlxd").is_dir()
    uid = os.getuid()
    assert main(["service", "status"]) == 0
    assert main(["service", "install", "--config", str(config)]) == 0  # again: replaced
    assert main(["service", "uninstall"]) == 0
    assert not plist_file.exists()
    assert launchctl_calls(mac_home) == [
        f"bootout gui/{uid}/{service.LABEL}",
        f"bootstrap gui/{uid} {plist_file}",
        f"print gui/{uid}/{service.LABEL}",
        f"bootout gui/{uid}/{service.LABEL}",
        f"bootstrap gui/{uid} {plist_file}",
        f"bootout gui/{uid}/{service.LABEL}",
    ]


def test_install_refuses_a_broken_config(
    mac_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("port = 'x'\n")
    assert main(["service", "install", "--config", str(config)]) == 1
    assert "port" in capsys.readouterr().err
    assert not (mac_home / "Library" / "LaunchAgents").exists()


def test_without_launchctl_the_error_points_to_systemd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    if shutil.which("launchctl"):
        pytest.skip("this machine has a real launchctl")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["service", "status"]) == 1
    assert "deploy/systemd" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd here")
def test_the_systemd_unit_verifies(tmp_path: Path) -> None:
    unit = (ROOT / "deploy" / "systemd" / "mlxd.service").read_text()
    assert "ExecStart=%h/.local/bin/mlxd serve" in unit
    # verify checks that ExecStart exists: point it at this installation's mlxd
    mlxd = Path(sys.executable).parent / "mlxd"
    (tmp_path / "mlxd.service").write_text(unit.replace("%h/.local/bin/mlxd", str(mlxd)))
    done = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "mlxd.service")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
