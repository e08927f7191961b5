"""``mlxd service install|uninstall|status``: mlxd as a launchd LaunchAgent.

The plist is ``deploy/launchd/dev.mlxd.serve.plist`` with the installed
mlxd's absolute path, its config and the log directory filled in; it goes to
``~/Library/LaunchAgents/`` and is loaded into the user's GUI domain with
``launchctl bootstrap gui/$UID``. Linux hosts use ``deploy/systemd/``.
"""

from __future__ import annotations

import os
import plistlib
import shutil
import subprocess
import sys
from pathlib import Path
from string import Template
from xml.sax.saxutils import escape

LABEL = "dev.mlxd.serve"
TEMPLATE = Path(__file__).resolve().parent.parent / "deploy" / "launchd" / f"{LABEL}.plist"


class ServiceError(Exception):
    pass


def plist_path() -> Path:
    return Path.home() / "Library" / "LaunchAgents" / f"{LABEL}.plist"


def log_dir() -> Path:
    return Path.home() / "Library" / "Logs" / "mlxd"


def mlxd_executable() -> Path:
    """The absolute path of the ``mlxd`` that is running this command."""
    beside = Path(sys.executable).parent / "mlxd"  # a virtual environment's scripts
    if beside.is_file():
        return beside.absolute()
    found = shutil.which("mlxd")
    if found is None:
        raise ServiceError("cannot find the mlxd executable; install mlxd first")
    return Path(found).absolute()


def render(mlxd: Path, config: Path | None, logs: Path) -> str:
    """The LaunchAgent plist for this installation."""
    args = [str(mlxd), "serve"] + (["--config", str(config)] if config else [])
    lines = "\n".join(f"        <string>{escape(a)}</string>" for a in args)
    if not TEMPLATE.is_file():
        raise ServiceError(
            f"the plist template is missing ({TEMPLATE}); install mlxd from its source tree"
        )
    text = Template(TEMPLATE.read_text()).substitute(arguments=lines, logs=escape(str(logs)))
    plistlib.loads(text.encode())  # refuse to install a plist launchd could not read
    return text


def _launchctl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    launchctl = shutil.which("launchctl")
    if launchctl is None:
        raise ServiceError(
            "launchctl not found: `mlxd service` manages a macOS LaunchAgent; "
            "on Linux use deploy/systemd/mlxd.service"
        )
    done = subprocess.run([launchctl, *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise ServiceError(f"launchctl {' '.join(args)} failed: {done.stderr.strip()}")
    return done


def _domain() -> str:
    return f"gui/{os.getuid()}"


def install(config: Path | None) -> Path:
    """Write the plist and (re)load the agent; returns the plist's path."""
    logs = log_dir()
    logs.mkdir(parents=True, exist_ok=True)
    text = render(mlxd_executable(), config.absolute() if config else None, logs)
    path = plist_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    _launchctl("bootout", f"{_domain()}/{LABEL}", check=False)  # an older one, if loaded
    path.write_text(text)
    _launchctl("bootstrap", _domain(), str(path))
    return path


def uninstall() -> bool:
    """Unload the agent and remove its plist; false if it was not installed."""
    path = plist_path()
    _launchctl("bootout", f"{_domain()}/{LABEL}", check=False)
    if not path.exists():
        return False
    path.unlink()
    return True


def status() -> str:
    """launchd's view of the agent, or a line saying it is not loaded."""
    done = _launchctl("print", f"{_domain()}/{LABEL}", check=False)
    if done.returncode != 0:
        installed = "installed but not loaded" if plist_path().exists() else "not installed"
        return f"{LABEL}: {installed}"
    return done.stdout
