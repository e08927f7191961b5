"""Neither the daemon nor a runner imports PyTorch, even where it is installed
(and the daemon does not import MLX either).

``transformers`` (which mlx-lm's tokenizer code and the grammar tokenizer use)
imports torch whenever it finds it installed: 10-20 s and hundreds of MB on a
GPU host, for nothing. CI has no torch, so these tests install a fake one, first
on ``PYTHONPATH`` (with a ``dist-info`` so that transformers believes in it),
which records every process that imports it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import trio

from runner.client import RunnerProcess, RunnerSpec
from runner.protocol import Generate, Sampling
from tests.conftest import serve_process

ROOT = Path(__file__).resolve().parent.parent

FAKE_TORCH = """\
import os, sys, traceback
with open({marker!r}, "a") as f:
    f.write(f"pid {{os.getpid()}}: {{sys.argv}}\\n" + "".join(traceback.format_stack()) + "\\n")
raise ImportError("this is the test's fake torch: the code under test imported torch")
"""


@pytest.fixture
def fake_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake torch first on ``PYTHONPATH`` (for this process's children); the
    marker file it writes when imported."""
    site = tmp_path / "fake-site"
    (site / "torch").mkdir(parents=True)
    marker = tmp_path / "torch-imported"
    (site / "torch" / "__init__.py").write_text(FAKE_TORCH.format(marker=str(marker)))
    dist = site / "torch-2.9.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.9.0\n")
    current = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", f"{site}{os.pathsep}{current}" if current else str(site))
    return marker


@contextmanager
def no_torch(marker: Path) -> Iterator[None]:
    """Fail if torch was imported, also when the code under test failed (an
    import of the fake is the likelier cause, and the marker shows its chain)."""
    try:
        yield
    except BaseException:
        assert not marker.exists(), f"torch was imported:\n{marker.read_text()}"
        raise
    assert not marker.exists(), f"torch was imported:\n{marker.read_text()}"


async def test_a_runner_loads_and_applies_a_grammar_without_torch(
    nursery: trio.Nursery, tiny_dir: Path, fake_torch: Path
) -> None:
    # The load imports mlx-lm (what a spare imports ahead), then a request's
    # grammar loads the llguidance tokenizer.
    with no_torch(fake_torch), trio.fail_after(180):
        runner = await nursery.start(RunnerProcess(RunnerSpec("tiny", tiny_dir, 2)).run)
        tokens: list[int] = []
        grammar = {"type": "json_object"}
        request = Generate([1, 2, 3], 8, Sampling(temperature=0.0), grammar=grammar)
        async with runner.generate(request) as chunks:
            async for chunk in chunks:
                assert chunk.error is None
                if chunk.token is not None:
                    tokens.append(chunk.token)
                if chunk.finish:
                    break
        assert tokens
        runner.stop()


def test_daemon_serves_a_chat_with_a_grammar_without_torch(
    tmp_path: Path, tiny_dir: Path, fake_torch: Path
) -> None:
    # The daemon's own tokenizer (chat template) and the runner's grammar tokenizer.
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Answer in JSON."}],
        "response_format": {"type": "json_object"},
        "max_tokens": 8,
        "temperature": 0,
    }
    with (
        no_torch(fake_torch),
        serve_process(tmp_path, {"name": "tiny", "path": str(tiny_dir)}) as daemon,
    ):
        reply = httpx.post(f"{daemon.url}/v1/chat/completions", json=body, timeout=180)
        assert reply.status_code == 200, reply.text


def test_the_daemon_reads_chat_templates_without_importing_mlx(tiny_dir: Path) -> None:
    """On a CUDA host, importing MLX opens a context holding 518 MiB of GPU
    memory: the daemon, which computes nothing, must not (a runner does)."""
    code = (
        "import sys; from pathlib import Path\n"
        "from daemon.cli import keep_daemon_light\n"
        "keep_daemon_light()\n"
        "from api.texts import Texts\n"
        "texts = Texts(Path(sys.argv[1]), None)\n"
        "assert texts.chat_prompt([{'role': 'user', 'content': 'Hi'}])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'torch')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tiny_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert out.stdout.strip() == "['torch']", out.stdout  # torch: the None that hides it
