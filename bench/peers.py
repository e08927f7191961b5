"""What the benchmarks compare mlxd with, started the same way by each:
``mlx_lm.server`` and ``mlx_vlm.server`` (after the same system BLAS mlxd's
runners load: on a Linux CPU MLX's own is about 30x slower; elsewhere it does
nothing)."""

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
MLX_VLM_SERVER = MLX_LM_SERVER.replace("mlx_lm.server", "mlx_vlm.server.cli")


def start_mlx_lm(
    model_dir: Path, port: int, workdir: Path, *options: str
) -> subprocess.Popen[bytes]:
    """``mlx_lm.server`` with its defaults (a prompt cache of 10 entries, no
    byte limit; batching on) but for ``options``, its log in ``workdir``."""
    cmd = [sys.executable, "-c", MLX_LM_SERVER, "--model", str(model_dir), "--port", str(port)]
    cmd += options
    with (workdir / "mlx_lm.log").open("wb") as log:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def start_mlx_vlm(model_dir: Path, port: int, workdir: Path) -> subprocess.Popen[bytes]:
    """``mlx_vlm.server`` with its defaults (continuous batching, a prompt
    cache and a vision feature cache), ``model_dir`` loaded at its start."""
    cmd = [sys.executable, "-c", MLX_VLM_SERVER, "--model", str(model_dir)]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    with (workdir / "mlx_vlm.log").open("wb") as log:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
