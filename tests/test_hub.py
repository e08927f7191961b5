"""runner/hub.py against a fake Hub on 127.0.0.1 (tests/fake_hub.py); never the real one."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import constants

from config.settings import Settings
from daemon.cli import main
from runner import sources
from runner.errors import SourceError
from runner.hub import pull, resolve_cached
from tests.fake_hub import FakeHub

REPO = "org/name"


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 8}))
    (root / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"vocab": {}}}))
    (root / "model.safetensors").write_bytes(os.urandom(8192))
    (root / "README.md").write_text("# not pulled\n")  # matches none of pull's patterns
    (root / "modeling.py").write_text("raise SystemExit\n")  # nor does code
    return root


@pytest.fixture
def hub(model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A fake Hub serving ``model_dir`` as REPO, and huggingface_hub pointed at it.

    huggingface_hub reads its environment once, into ``huggingface_hub.constants``, at import
    time; its functions then look the constants up on that module. So the environment is set
    for completeness (and for child processes), and the constants are what takes effect.
    """
    home = tmp_path / "hf"
    with FakeHub(model_dir, REPO) as fake:
        settings: dict[str, str | bool] = {
            "HF_HOME": str(home),
            "HF_HUB_CACHE": str(home / "hub"),
            "HF_XET_CACHE": str(home / "xet"),
            "HF_TOKEN_PATH": str(home / "token"),
            "HF_HUB_DISABLE_TELEMETRY": True,
            "HF_HUB_DISABLE_XET": True,
            "HF_HUB_DISABLE_IMPLICIT_TOKEN": True,
            "HF_HUB_OFFLINE": False,
        }
        for name, value in settings.items():  # the constants are named like the variables
            monkeypatch.setenv(name, value if isinstance(value, str) else str(int(value)))
            monkeypatch.setattr(constants, name, value)
        point_at(fake, monkeypatch)
        for token_env in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
            monkeypatch.delenv(token_env, raising=False)
        yield fake


def point_at(fake: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make huggingface_hub use ``fake`` as its endpoint (HF_ENDPOINT)."""
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setattr(constants, "ENDPOINT", fake.url)
    # hf_hub_url builds file URLs from this template, made from HF_ENDPOINT at import time too
    template = fake.url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)


def test_pull_then_resolve_cached_offline(hub: FakeHub, model_dir: Path) -> None:
    path = pull(REPO)

    assert path.is_dir()
    assert path.name == hub.commit
    assert Path(constants.HF_HUB_CACHE) in path.parents
    pulled = {"config.json", "tokenizer.json", "model.safetensors"}
    assert {p.name for p in path.iterdir()} == pulled
    for name in pulled:
        assert (path / name).read_bytes() == (model_dir / name).read_bytes()
    assert not any("/api/telemetry" in r or "agent-harnesses" in r for r in hub.requests)

    hub.stop()
    assert resolve_cached(REPO) == path
    assert pull(REPO) == path  # with the Hub unreachable, pull falls back on the cache


def test_pull_again_downloads_nothing(hub: FakeHub) -> None:
    path = pull(REPO)
    downloads = [r for r in hub.requests if r.startswith("GET /org/name/resolve/")]
    assert len(downloads) == 3

    assert pull(REPO) == path
    assert [r for r in hub.requests if r.startswith("GET /org/name/resolve/")] == downloads


def test_pull_at_commit(hub: FakeHub) -> None:
    path = pull(REPO, revision=hub.commit)
    assert path.name == hub.commit
    assert (path / "config.json").is_file()


def test_resolve_cached_not_pulled(hub: FakeHub) -> None:
    with pytest.raises(SourceError, match=r"run `mlxd pull org/other`"):
        resolve_cached("org/other")
    assert hub.requests == []  # the cache only: no request at all


def test_resolve_cached_incomplete(hub: FakeHub) -> None:
    path = pull(REPO)
    (path / "tokenizer.json").unlink()  # as if the download had been interrupted
    with pytest.raises(SourceError, match=r"incomplete; run `mlxd pull org/name`"):
        resolve_cached(REPO)
    assert pull(REPO) == path
    assert resolve_cached(REPO) == path


def test_pull_without_config(
    hub: FakeHub, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (model_dir / "config.json").unlink()
    with FakeHub(model_dir, "org/weights-only") as other:
        point_at(other, monkeypatch)
        with pytest.raises(SourceError, match=r"no config\.json"):
            pull("org/weights-only")
    with pytest.raises(SourceError, match=r"no config\.json"):
        resolve_cached("org/weights-only")


def test_pull_unknown_repo(hub: FakeHub) -> None:
    with pytest.raises(SourceError, match=r"repo org/missing not found on http://127\.0\.0\.1:"):
        pull("org/missing")
    assert not (Path(constants.HF_HUB_CACHE) / "models--org--missing" / "snapshots").exists()


def test_pull_unknown_revision(hub: FakeHub) -> None:
    with pytest.raises(SourceError, match="revision v9 not found in repo org/name"):
        pull(REPO, revision="v9")


def test_pull_invalid_repo_id(hub: FakeHub) -> None:
    with pytest.raises(SourceError, match="not a Hugging Face repo id"):
        pull("not/a/repo")
    with pytest.raises(SourceError, match="not a Hugging Face repo id"):
        resolve_cached("bad repo")


def test_pull_hub_unreachable(hub: FakeHub) -> None:
    hub.stop()  # its port is closed now: connections are refused
    with pytest.raises(
        SourceError,
        match=r"could not reach http://127\.0\.0\.1:\d+ to download org/name: ConnectError",
    ):
        pull(REPO)


async def test_mlxd_pull_then_a_repo_source_resolves_to_the_snapshot(
    hub: FakeHub, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["pull", REPO]) == 0
    path = Path(capsys.readouterr().out.splitlines()[0].removeprefix(f"{REPO}: "))
    hub.stop()
    (model,) = Settings.from_mapping({"models": [{"name": "m", "repo": REPO}]}).models
    assert await sources.resolve(model.source, tmp_path) == path
    assert main(["pull", "org/missing"]) == 1
    assert "org/missing" in capsys.readouterr().err
