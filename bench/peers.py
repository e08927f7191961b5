"""What the benchmarks compare mlxd with, started the same way by each:
``mlx_lm.server`` (after the same system BLAS mlxd's runners load: on a
Linux CPU MLX's own is about 30x slower; elsewhere it does nothing)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MLX_LM_SERVER = """
from runner.__main__ import preload_blas
preload_blas()
from mlx_lm.server import main
main()
"""


def start_mlx_lm(
    model_dir: Path, port: int, workdir: Path, *options: str
) -> subprocess.Popen[bytes]:
    """``mlx_lm.server`` with its defaults (a prompt cache of 10 entries, no
    byte limit; batching on) but for ``options``, its log in ``workdir``."""
    cmd = [sys.executable, "-c", MLX_LM_SERVER, "--model", str(model_dir), "--port", str(port)]
    cmd += options
    with (workdir / "mlx_lm.log").open("wb") as log:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
