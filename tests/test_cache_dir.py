"""Files in the cache folder that mlxd did not write, or cannot use, are never
fatal: odd entries among the prefix files are skipped, a folder that is not
one is reported and the daemon serves without it, and replaced weights get a
new prefix folder (their old prefixes computed by other weights)."""

from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path

import attrs
import httpx
import pytest

from config.settings import ModelConfig, Settings
from daemon.launcher import Launcher
from runner import prefix_disk
from tests.conftest import TLS, running, settings_for


def test_odd_entries_among_the_prefix_files_are_skipped_not_opened(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    where = tmp_path / "prefixes" / "abc"
    where.mkdir(parents=True)
    (where / "a-b.safetensors").mkdir()  # a folder named like a prefix file
    os.mkfifo(where / "c-d.safetensors")  # a FIFO: opening it would wait for a writer
    found: list[list[Path]] = []
    with caplog.at_level(logging.WARNING, logger="mlxd.prefix"):
        reader = threading.Thread(
            target=lambda: found.append(prefix_disk.files(where)), daemon=True
        )
        reader.start()
        reader.join(timeout=30)
    assert not reader.is_alive(), "listing the prefix folder hung"
    assert found == [[]]
    assert sum("not a regular file" in r.getMessage() for r in caplog.records) == 2


async def test_replaced_weights_get_a_new_prefix_folder(tiny_dir: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_dir, model_dir)
    model = ModelConfig("tiny", str(model_dir))
    launcher = Launcher(Settings(models=(model,), cache_dir=tmp_path / "cache"))
    before = await launcher.prefix_dir(model)
    assert before is not None and await launcher.prefix_dir(model) == before  # unchanged: same
    (weights,) = model_dir.glob("*.safetensors")
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(64)  # other weights, same size: what a re-download could leave
    weights.write_bytes(bytes(data))
    after = await launcher.prefix_dir(model)
    assert after is not None and after != before


async def test_a_cache_folder_that_is_a_file_is_reported_and_models_still_load(
    tiny_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache folder should be")
    settings = attrs.evolve(
        settings_for(tmp_path, ModelConfig("tiny", str(tiny_dir))),
        cache_dir=blocked,
        persist_responses=True,
    )
    with caplog.at_level(logging.WARNING, logger="mlxd"):
        async with running(settings) as daemon, httpx.AsyncClient(timeout=120, verify=TLS) as http:
            body = {"model": "tiny", "prompt": "Hi", "max_tokens": 3}
            answer = await http.post(f"{daemon.url}/v1/completions", json=body)
            assert answer.status_code == 200, answer.text
            stored = await http.post(
                f"{daemon.url}/v1/responses",
                json={"model": "tiny", "input": "Hi", "max_output_tokens": 3},
            )
            assert stored.status_code == 200, stored.text
    warned = [r.getMessage() for r in caplog.records if "cannot be used" in r.getMessage()]
    assert len(warned) == 1 and str(blocked) in warned[0]
