"""Settings: defaults, TOML, and errors that name the key."""

from pathlib import Path

import pytest

from config.settings import BUNDLED, ConfigError, Settings
from daemon.cli import main


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mlxd.toml"
    path.write_text(text)
    return path


def test_defaults_are_safe_and_serve_the_bundled_model() -> None:
    s = Settings()
    assert s.host == "127.0.0.1"
    assert s.api_keys == ()
    assert [m.source for m in s.models] == [BUNDLED]


def test_reads_models_with_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    s = Settings.from_toml(
        write(
            tmp_path,
            """
port = 9000
[[models]]
name = "small"
path = "m"
aliases = ["s"]
max_context = 2048
max_concurrency = 4
""",
        )
    )
    (m,) = s.models
    assert s.port == 9000
    assert (m.name, m.aliases, m.max_context, m.max_concurrency) == ("small", ("s",), 2048, 4)
    assert m.source == str((tmp_path / "m").resolve())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("port = 'x'", "port: expected a port number"),
        ("port = 70000", "port: expected a port number"),
        ("colour = 1", "colour: unknown key"),
        ("[[models]]\nname = 'a'", "models[0].path: required"),
        (
            "[[models]]\nname = 'a'\npath = '/a'\nmax_concurrency = -2",
            "models[0].max_concurrency: expected a positive integer, got -2",
        ),
        (
            "[[models]]\nname = 'a'\npath = '/a'\n[[models]]\nname = 'b'\npath = '/b'\n"
            "aliases = ['a']",
            "models[1]: name 'a' is already used",
        ),
        ("port = ", "not valid TOML"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Settings.from_toml(write(tmp_path, text))


def test_config_check_prints_the_error_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["config", "check", str(write(tmp_path, "log_level = 'loud'"))]) == 1
    assert "log_level: expected one of" in capsys.readouterr().err
    assert main(["config", "check", str(write(tmp_path, "api_keys = ['sk-secret']"))]) == 0
    out = capsys.readouterr().out
    assert "ok" in out and "sk-secret" not in out
