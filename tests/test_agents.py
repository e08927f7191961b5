"""The agent CLIs people run, unmodified, against mlxd: Claude Code (the
Messages API), Codex (Responses), OpenCode (chat completions through the
Vercel AI SDK) and Aider (chat completions through litellm), each installed
by .ci/run at the version tests/agents/ names.

The model is a scripted agent (tests/scripted.py): asked to write a file, it
calls the CLI's own shell tool (Aider: answers with the file, in Aider's
whole-file edit format), and once the tool's result is in, says it is done;
asked for a greeting, it greets. Each CLI does a plain answer and a tool
round trip, and the tool's effect is checked on disk. Every CLI runs with a
home of its own (its config there, nothing of the user's), in a project
folder of its own."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from config.settings import ModelConfig
from tests.conftest import Daemon, serving, settings_for
from tests.scripted import scripted_model

AGENTS = Path(__file__).parent / "agents"
BIN = AGENTS / "node_modules" / ".bin"
AIDER = AGENTS / "aider-venv" / "bin" / "aider"
WRITE = "echo hello > note.txt"
EDIT = "note.txt\n```\nhello\n```"  # Aider's whole-file format
GREETING = "Hello from mlxd."
DONE = "Done: the tool ran."


def call(name: str, arguments: dict[str, str]) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


@pytest.fixture(scope="module")
def daemon(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    work = tmp_path_factory.mktemp("agents")
    agent = scripted_model(
        tiny_dir,
        work / "agent",
        EDIT,
        context=131072,
        replies=[
            (r"<\|im_start\|>tool", DONE),
            (r"Just say hello", GREETING),
            (r'"name": "exec_command"', call("exec_command", {"cmd": WRITE})),  # Codex
            (r'"name": "Bash"', call("Bash", {"command": WRITE, "description": "Write"})),
            (r'"name": "bash"', call("bash", {"command": WRITE, "description": "Write"})),
        ],
    )
    with serving(settings_for(work, ModelConfig("agent", str(agent)))) as d:
        yield d


def run(cli: list[str], home: Path, project: Path, env: dict[str, str]) -> str:
    """Run a CLI to its end; what it printed."""
    project.mkdir(exist_ok=True)
    theirs = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "OPENAI_"))}
    full = {**theirs, "HOME": str(home), "PWD": str(project), **env}  # OpenCode reads PWD
    done = subprocess.run(
        cli,
        cwd=project,
        env=full,
        capture_output=True,
        text=True,
        timeout=240,
        stdin=subprocess.DEVNULL,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    return out


def needs(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"{path.name} is not installed here (.ci/run installs tests/agents/)")


def claude(daemon: Daemon, home: Path, project: Path, prompt: str) -> str:
    needs(BIN / "claude")
    env = {
        "ANTHROPIC_BASE_URL": daemon.url,
        "ANTHROPIC_API_KEY": "sk-local",
        "ANTHROPIC_DEFAULT_HAIKU_MODEL": "agent",  # its background requests too
        "CLAUDE_CODE_MAX_CONTEXT_TOKENS": "131072",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_TELEMETRY": "1",
    }
    cli = [str(BIN / "claude"), "-p", prompt, "--model", "agent", "--allowedTools", "Bash"]
    return run(cli, home, project, env)


def codex(daemon: Daemon, home: Path, project: Path, prompt: str) -> str:
    needs(BIN / "codex")
    (home / ".codex").mkdir(parents=True, exist_ok=True)
    (home / ".codex" / "config.toml").write_text(
        'model = "agent"\nmodel_provider = "mlxd"\n\n[model_providers.mlxd]\nname = "mlxd"\n'
        f'base_url = "{daemon.url}/v1"\nwire_api = "responses"\nenv_key = "MLXD_API_KEY"\n'
    )
    cli = [str(BIN / "codex"), "exec", "--skip-git-repo-check", "--sandbox", "workspace-write"]
    return run([*cli, prompt], home, project, {"MLXD_API_KEY": "sk-local"})


def opencode(daemon: Daemon, home: Path, project: Path, prompt: str) -> str:
    needs(BIN / "opencode")
    config = home / ".config" / "opencode"
    config.mkdir(parents=True, exist_ok=True)
    provider = {
        "npm": "@ai-sdk/openai-compatible",
        "name": "mlxd",
        "options": {"baseURL": f"{daemon.url}/v1", "apiKey": "sk-local"},
        "models": {"agent": {"name": "agent", "limit": {"context": 131072, "output": 8192}}},
    }
    (config / "opencode.json").write_text(
        json.dumps({"provider": {"mlxd": provider}, "model": "mlxd/agent"})
    )
    return run([str(BIN / "opencode"), "run", prompt], home, project, {})


def aider(daemon: Daemon, home: Path, project: Path, prompt: str) -> str:
    needs(AIDER)
    cli = [str(AIDER), "--model", "openai/agent", "--openai-api-base", f"{daemon.url}/v1"]
    cli += ["--openai-api-key", "sk-local", "--yes-always", "--no-git", "--no-check-update"]
    cli += ["--no-show-model-warnings", "--analytics-disable", "--no-show-release-notes"]
    cli += ["--edit-format", "whole", "--message", prompt, "note.txt"]
    return run(cli, home, project, {})


CLIS = {"claude": claude, "codex": codex, "opencode": opencode, "aider": aider}


@pytest.mark.parametrize("name", CLIS)
def test_the_cli_gets_a_plain_answer(daemon: Daemon, tmp_path: Path, name: str) -> None:
    out = CLIS[name](daemon, tmp_path / "home", tmp_path / "project", "Just say hello.")
    assert GREETING in out


@pytest.mark.parametrize("name", CLIS)
def test_the_cli_runs_its_tool_and_the_file_is_written(
    daemon: Daemon, tmp_path: Path, name: str
) -> None:
    project = tmp_path / "project"
    out = CLIS[name](daemon, tmp_path / "home", project, "Write hello into note.txt")
    assert (project / "note.txt").read_text().strip() == "hello", out[-3000:]
    if name != "aider":  # its edit is the answer; the others answer after the tool ran
        assert DONE in out
