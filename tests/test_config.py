"""Settings: defaults, TOML, and errors that name the key."""

import math
from pathlib import Path

import pytest

from config.settings import BUNDLED, BUNDLED_EMBED, ConfigError, Settings
from config.units import parse_bytes, parse_duration
from daemon.cli import main


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mlxd.toml"
    path.write_text(text)
    return path


def test_defaults_are_safe_and_serve_the_bundled_models() -> None:
    s = Settings()
    assert s.host == "127.0.0.1"
    assert s.api_keys == ()
    assert s.cors_origins == () and s.allowed_hosts == ()  # no web page may call it
    assert [m.source for m in s.models] == [BUNDLED, BUNDLED_EMBED]
    assert [m.name for m in s.models] == ["smollm2-135m-instruct", "all-minilm-l6-v2"]
    assert [m.known_kind for m in s.models] == ["chat", "embed"]


def test_model_kind(tmp_path: Path) -> None:
    text = "[[models]]\nname = 'e'\npath = '/e'\nkind = 'embed'\n"
    (m,) = Settings.from_toml(write(tmp_path, text)).models
    assert m.kind == "embed" and m.known_kind == "embed"
    (auto,) = Settings.from_toml(write(tmp_path, "[[models]]\nname = 'a'\npath = '/a'\n")).models
    assert auto.kind == "auto" and auto.known_kind is None  # its files decide
    bundled = "[[models]]\nname = 'm'\npath = 'bundled:all-minilm-l6-v2'\n"
    assert Settings.from_toml(write(tmp_path, bundled)).models[0].known_kind == "embed"
    with pytest.raises(ConfigError, match=r"models\[0\]\.kind"):
        Settings.from_toml(write(tmp_path, text.replace("'embed'", "'rerank'")))


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


def test_browser_settings(tmp_path: Path) -> None:
    text = "allowed_hosts = ['mac.lan']\ncors_origins = ['https://app.example']\n"
    s = Settings.from_toml(write(tmp_path, text))
    assert s.allowed_hosts == ("mac.lan",) and s.cors_origins == ("https://app.example",)
    assert "https://app.example" in s.describe()
    with pytest.raises(ConfigError, match="cors_origins"):
        Settings.from_toml(write(tmp_path, "cors_origins = 'https://app.example'\n"))


def test_prefix_cache_settings(tmp_path: Path) -> None:
    default = Settings.from_toml(write(tmp_path, "[[models]]\nname = 'a'\npath = '/a'\n"))
    assert default.models[0].prefill_chunk is None  # sized by the runner
    assert default.models[0].prefix_cache_bytes == 4 * 1024**3
    s = Settings.from_toml(
        write(
            tmp_path,
            """
prefix_cache_disk = "2GiB"
prefix_cache_disk_writes = "1GiB"
[[models]]
name = "a"
path = "/a"
prefix_cache = "512MiB"
prefill_chunk = 256
[[models]]
name = "b"
path = "/b"
prefix_cache = 0
prefill_chunk = "auto"
""",
        )
    )
    a, b = s.models
    assert (s.prefix_disk_bytes, s.prefix_disk_writes) == (2 * 1024**3, 1024**3)
    assert default.prefix_disk_writes == 4 * 1024**3
    assert (a.prefix_cache_bytes, a.prefill_chunk) == (512 * 1024**2, 256)
    assert (b.prefix_cache_bytes, b.prefill_chunk) == (0, None)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("port = 'x'", "port: expected a port number"),
        ("prefix_cache_disk = 'big'", "prefix_cache_disk: not a size: 'big'"),
        ("[[models]]\nname = 'a'\npath = '/a'\nprefill_chunk = 4", "prefill_chunk: expected"),
        ("[[models]]\nname = 'a'\npath = '/a'\nprefix_cache = -1", "prefix_cache: expected a"),
        ("port = 70000", "port: expected a port number"),
        ("kv_step_tokens = -1", "kv_step_tokens: expected an integer >= 0"),
        ("colour = 1", "colour: unknown key"),
        ("[[models]]\nname = 'a'", "models[0]: give either path"),
        ("memory_budget = 'lots'", "memory_budget: not a size: 'lots'"),
        ("memory_budget = 1.5", "memory_budget: expected a size or a fraction"),
        ("[[models]]\nname = 'a'\npath = '/a'\nkeep_alive = 'soon'", "models[0].keep_alive: not a"),
        ("[[models]]\nname = 'a'\nrepo = 'no-slash'", "models[0].repo: expected a Hugging"),
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


def test_pool_settings(tmp_path: Path) -> None:
    s = Settings.from_toml(
        write(
            tmp_path,
            """
memory_budget = "48GiB"
[[models]]
name = "q"
repo = "mlx-community/Qwen3-4B-4bit"
keep_alive = "forever"
queue_limit = 3
queue_timeout = "2m"
pinned = true
preload = true
""",
        )
    )
    (m,) = s.models
    assert s.memory_budget == 48 * 2**30
    assert m.source == "hf:mlx-community/Qwen3-4B-4bit"
    assert m.keep_alive_s == math.inf and m.queue_timeout_s == 120
    assert (m.queue_limit, m.pinned, m.preload) == (3, True, True)
    assert Settings.from_mapping({"memory_budget": 0.8}).memory_budget == 0.8


def test_units() -> None:
    assert parse_bytes("512MiB") == 512 * 2**20 == parse_bytes("512M")
    assert parse_bytes("1.5 GB") == int(1.5 * 2**30)
    assert parse_duration(0) == 0 and parse_duration(-1) == math.inf
    assert parse_duration("90s") == 90 and parse_duration("1h") == 3600
    with pytest.raises(ValueError):
        parse_duration("soon")
    with pytest.raises(ValueError):
        parse_duration(True)


def test_config_check_prints_the_error_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["config", "check", str(write(tmp_path, "log_level = 'loud'"))]) == 1
    assert "log_level: expected one of" in capsys.readouterr().err
    assert main(["config", "check", str(write(tmp_path, "api_keys = ['sk-secret']"))]) == 0
    out = capsys.readouterr().out
    assert "ok" in out and "sk-secret" not in out


def test_response_store_settings(tmp_path: Path) -> None:
    assert not Settings().persist_responses  # conversations stay off the disk unless asked
    text = "response_store_entries = 50\nresponse_store_size = '8MiB'\npersist_responses = true\n"
    s = Settings.from_toml(write(tmp_path, text))
    assert (s.response_store_entries, s.response_store_bytes) == (50, 8 * 1024**2)
    assert s.persist_responses and "kept across restarts" in s.describe()
    with pytest.raises(ConfigError, match="persist_responses"):
        Settings.from_toml(write(tmp_path, "persist_responses = 'yes'\n"))


def test_image_limits(tmp_path: Path) -> None:
    text = "max_images = 2\nmax_image_size = '1MiB'\nmax_image_pixels = 4000000\n"
    s = Settings.from_toml(write(tmp_path, text))
    assert (s.max_images, s.max_image_bytes, s.max_image_pixels) == (2, 1024**2, 4_000_000)
    with pytest.raises(ConfigError, match="max_image_pixels: expected a positive integer"):
        Settings.from_toml(write(tmp_path, "max_image_pixels = 0\n"))


def test_image_urls_are_fetched_only_from_listed_hosts(tmp_path: Path) -> None:
    assert Settings().image_url_hosts == ()
    assert "image URLs fetched from: no host" in Settings().describe()
    text = "image_url_hosts = ['*.example.com', 'images.lan']\nimage_url_timeout = '30s'\n"
    s = Settings.from_toml(write(tmp_path, text))
    assert s.image_url_hosts == ("*.example.com", "images.lan") and s.image_url_timeout_s == 30
    assert "image URLs fetched from: *.example.com, images.lan" in s.describe()
    with pytest.raises(ConfigError, match="image_url_hosts: expected a list of host names"):
        Settings.from_toml(write(tmp_path, "image_url_hosts = '*'\n"))


def test_the_spare_runner_can_be_turned_off(tmp_path: Path) -> None:
    assert Settings().spare_runner and "spare runner: on" in Settings().describe()
    s = Settings.from_toml(write(tmp_path, "spare_runner = false\n"))
    assert not s.spare_runner and "spare runner: off" in s.describe()
    with pytest.raises(ConfigError, match="spare_runner"):
        Settings.from_toml(write(tmp_path, "spare_runner = 0\n"))
