"""The ``mlxd`` command line."""

from __future__ import annotations

import argparse
import errno
import functools
import importlib.util
import json
import logging
import sys
import time
import types
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import trio

from config.settings import ConfigError, Settings, default_config_path
from config.units import format_bytes


def _load(path: str | None) -> Settings:
    if path is not None:
        return Settings.from_toml(Path(path))
    default = default_config_path()
    return Settings.from_toml(default) if default.is_file() else Settings()


def keep_daemon_light() -> None:
    """Keep PyTorch and MLX out of the daemon process, which computes nothing.

    PyTorch: ``transformers`` (the tokenizers, through mlx-lm) imports it
    wherever it is installed, 10-20 s and hundreds of MB (see
    runner/__main__.py). MLX: the daemon needs mlx-lm's tokenizer module, but
    the ``mlx_lm`` package's ``__init__`` imports MLX, and on a CUDA host
    importing MLX opens a context that holds 518 MiB of GPU memory outside the
    ledger. An empty package in its place lets its submodules (the tokenizer,
    chat templates, tool parsers: none imports MLX) load without it."""
    sys.modules.setdefault("torch", None)  # type: ignore[arg-type]
    spec = importlib.util.find_spec("mlx_lm")
    if "mlx_lm" not in sys.modules and spec is not None and spec.submodule_search_locations:
        package = types.ModuleType("mlx_lm")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        sys.modules["mlx_lm"] = package


def cmd_serve(args: argparse.Namespace) -> int:
    keep_daemon_light()
    from daemon.serve import serve

    settings = _load(args.config)
    path = Path(args.config) if args.config else default_config_path()
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    settings = attrs.evolve(settings, **overrides)
    logging.basicConfig(
        level=(args.log_level or settings.log_level).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        trio.run(functools.partial(serve, settings, config_path=path if path.is_file() else None))
    except BaseExceptionGroup as group:
        in_use, _ = group.split(lambda e: isinstance(e, OSError) and e.errno == errno.EADDRINUSE)
        if in_use is None:
            raise
        print(
            f"mlxd: {settings.host}:{settings.port} is already in use (is another mlxd running?)",
            file=sys.stderr,
        )
        return 1
    return 0


def _call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    """Call the running daemon's lifecycle API; errors come back as its message."""
    settings = _load(args.config)
    host = args.host or settings.host
    host = "127.0.0.1" if host in {"0.0.0.0", "::"} else host
    url = f"http://{host}:{args.port or settings.port}{path}"
    headers = {"Content-Type": "application/json"}
    if settings.api_keys:
        headers["Authorization"] = f"Bearer {settings.api_keys[0]}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as response:
            return json.load(response)
    except urllib.error.HTTPError as e:
        try:
            message = json.load(e)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {e.code}"
        raise DaemonError(message) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DaemonError(f"cannot reach mlxd at {url}: {reason}") from None


class DaemonError(Exception):
    pass


def cmd_ps(args: argparse.Namespace) -> int:
    if args.watch is None:
        print(ps_text(_call(args, "GET", "/api/ps")), end="")
        return 0
    try:
        while True:
            try:
                text = ps_text(_call(args, "GET", "/api/ps"))
            except DaemonError as e:
                text = f"mlxd is not answering: {e}\n"
            stamp = time.strftime("%H:%M:%S")
            # home, clear: the view redrawn in place, as `watch` does
            print(f"\x1b[H\x1b[2J{stamp}, every {args.watch:g} s (Ctrl-C to stop)\n{text}", end="")
            sys.stdout.flush()
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0


def ps_text(pool: dict[str, Any]) -> str:
    """``/api/ps`` as ``mlxd ps`` prints it."""
    lines = [f"memory: {format_bytes(pool['used'])} of {format_bytes(pool['budget'])} in use"]
    lines.append(
        f"{'MODEL':28} {'STATE':9} {'BYTES':>10} {'WEIGHTS':>10} {'KV':>10} {'PREFIXES':>10} "
        f"{'MEASURED':>10} {'ON DISK':>10} {'RUN':>4} {'QUEUE':>5}  UNTIL"
    )
    for m in pool["models"]:
        until = "-"
        if m["pinned"]:
            until = "pinned"
        elif m["expires_at"] is not None:
            until = time.strftime("%H:%M:%S", time.localtime(m["expires_at"]))
        elif m["state"] == "ready":
            until = "in use" if m["running"] or m["queued"] else "forever"
        if m["waiting_for_memory"]:
            until += f" ({m['waiting_for_memory']} waiting for memory)"
        prefixes, sizes = m["prefix_cache"], [m["bytes"], m["weights"], m["kv_reserved"]]
        sizes += [prefixes["bytes"], m["measured"], prefixes["disk_bytes"]]
        cells = " ".join(f"{format_bytes(b) if b is not None else '-':>10}" for b in sizes)
        name = m["model"] + (" (vision)" if "vision" in (m.get("capabilities") or ()) else "")
        lines.append(
            f"{name:28} {m['state']:9} {cells} {m['running']:>4} {m['queued']:>5}  {until}"
        )
        for c in m.get("clients", []):
            who = f"  {c['client'] or '(anonymous)'} ({c['priority']})"
            paused = f"  ({c['paused']} paused)" if c.get("paused") else ""
            lines.append(f"{who:<28.28} {'':>76} {c['running']:>4} {c['queued']:>5}{paused}")
    spare = pool["spare"]
    pid = f" (pid {spare['pid']})" if spare["pid"] else ""
    held = f", holding {format_bytes(pool['spare_bytes'])}" if pool["spare_bytes"] else ""
    lines.append(f"spare runner: {spare['state']}{pid}{held}")
    if pool["runner_bytes"]:
        lines.append(
            f"each runner holds {format_bytes(pool['runner_bytes'])} before its model (in BYTES)"
        )
    return "\n".join(lines) + "\n"


def cmd_load(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"model": args.name}
    if args.keep_alive is not None:
        body["keep_alive"] = args.keep_alive
    _call(args, "POST", "/api/load", body)
    print(f"{args.name}: loaded")
    return 0


def model_action(path: str, done: str) -> Callable[[argparse.Namespace], int]:
    """A command that posts ``{"model": NAME}`` to ``path`` and says ``done``."""

    def run(args: argparse.Namespace) -> int:
        _call(args, "POST", path, {"model": args.name})
        print(f"{args.name}: {done}")
        return 0

    return run


def cmd_pull(args: argparse.Namespace) -> int:
    from runner import hub
    from runner.errors import SourceError

    try:
        path = hub.pull(args.repo, args.revision)
    except SourceError as e:
        print(f"mlxd: {e}", file=sys.stderr)
        return 1
    print(f"{args.repo}: {path}")
    print(f'use it with:  [[models]]  name = "..."  repo = "{args.repo}"')
    return 0


def cmd_service(args: argparse.Namespace) -> int:
    from daemon import service

    try:
        if args.action == "install":
            config = Path(args.config) if args.config else default_config_path()
            if args.config:
                Settings.from_toml(config)  # refuse a broken config now, not at launch
            path = service.install(config if config.is_file() else None)
            print(f"installed {path}; logs in {service.log_dir()}")
        elif args.action == "uninstall":
            removed = service.uninstall()
            print("uninstalled" if removed else "mlxd was not installed as a service")
        else:
            print(service.status())
    except service.ServiceError as e:
        print(f"mlxd: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """What a bug report needs: versions, the device, the config, the daemon."""
    import platform
    from importlib import metadata

    from daemon.cachedir import problem
    from scheduler.memory import resolve_budget

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    print(f"mlxd {version('mlxd')}, Python {platform.python_version()}, {platform.platform()}")
    dists = ("mlx", "mlx-lm", "transformers", "tokenizers", "llguidance", "trio", "quart-trio")
    print("packages: " + ", ".join(f"{d} {version(d)}" for d in dists))
    try:
        import mlx.core as mx

        info = ", ".join(f"{k}={v}" for k, v in mx.device_info().items())
        print(f"device: {mx.default_device()} ({info})")
    except Exception as e:  # a broken MLX install is what doctor is for
        print(f"device: MLX does not load: {type(e).__name__}: {e}")
    path = Path(args.config) if args.config else default_config_path()
    print(f"config: {path if path.is_file() else 'built-in default (no file)'}")
    settings = _load(args.config)
    budget, where = resolve_budget(settings.memory_budget)
    print("  " + settings.describe().replace("\n", "\n  "))
    print(f"  memory budget resolves to {format_bytes(budget)} ({where})")
    why = problem(settings.cache_dir)
    print(f"  cache folder {settings.cache_dir}: {'ok' if why is None else f'unusable ({why})'}")
    try:
        pool = _call(args, "GET", "/api/ps")
        errors = _call(args, "GET", "/api/errors")["errors"]
    except DaemonError as e:
        print(f"daemon: {e}")
        return 0
    print(f"daemon: running; {format_bytes(pool['used'])} of {format_bytes(pool['budget'])} in use")
    for m in pool["models"]:
        print(f"  {m['model']}: {m['state']}, {format_bytes(m['bytes'])}, pid {m['pid']}")
    print(f"recent errors ({len(errors)}):" if errors else "recent errors: none")
    for err in errors:
        print(f"  {err['time']} {err['level']} {err['logger']}: {err['message']}")
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    settings = Settings.from_toml(Path(args.file))
    print(f"{args.file}: ok")
    print(settings.describe())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlxd",
        description="Share local MLX language models between tools, "
        "through one OpenAI-compatible endpoint.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the daemon in the foreground")
    serve.add_argument(
        "--config",
        metavar="FILE",
        help=f"TOML config (default: {default_config_path()} if it exists, "
        "else the bundled SmolLM2-135M-Instruct on 127.0.0.1:8642)",
    )
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8642)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(func=cmd_serve)

    def client(name: str, help: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help)
        cmd.add_argument("--config", metavar="FILE", help="config naming the daemon's address")
        cmd.add_argument("--host", help="the daemon's address (default: from the config)")
        cmd.add_argument("--port", type=int, help="the daemon's port (default: from the config)")
        cmd.add_argument("--timeout", type=float, default=600, help="seconds to wait")
        return cmd

    ps = client(
        "ps", "list models (state, the memory ledger, requests by client, expiry), the spare runner"
    )
    ps.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=2.0,
        metavar="SECONDS",
        help="redraw every SECONDS (2 if not given) until Ctrl-C",
    )
    ps.set_defaults(func=cmd_ps)
    load = client("load", "load a model into the running daemon now")
    load.add_argument("name")
    load.add_argument("--keep-alive", help="how long it stays once idle ('5m', 'forever')")
    load.set_defaults(func=cmd_load)
    unload = client("unload", "unload a model once its requests are done")
    unload.add_argument("name")
    unload.set_defaults(func=model_action("/api/unload", "unloading once its requests are done"))
    pin = client("pin", "load a model and keep it loaded whatever its keep-alive")
    pin.add_argument("name")
    pin.set_defaults(func=model_action("/api/pin", "loaded and pinned"))
    unpin = client("unpin", "let a pinned model go by its keep-alive again")
    unpin.add_argument("name")
    unpin.set_defaults(func=model_action("/api/unpin", "unpinned (it goes by its keep-alive)"))

    client(
        "doctor", "print versions, device, config and the daemon's state for a bug report"
    ).set_defaults(func=cmd_doctor)

    pull = sub.add_parser("pull", help="download a model from Hugging Face into its cache")
    pull.add_argument("repo", help="a repo id, e.g. mlx-community/Qwen3-4B-4bit")
    pull.add_argument("--revision", help="a branch, tag or commit (default: main)")
    pull.set_defaults(func=cmd_pull)

    svc = sub.add_parser("service", help="run mlxd in the background under launchd (macOS)")
    svc.add_argument("action", choices=["install", "uninstall", "status"])
    svc.add_argument(
        "--config",
        metavar="FILE",
        help=f"config for the service (default: {default_config_path()})",
    )
    svc.set_defaults(func=cmd_service)

    config = sub.add_parser("config", help="work with config files")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser("check", help="validate a config file and print it")
    check.add_argument("file")
    check.set_defaults(func=cmd_config_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as e:
        print(f"mlxd: config error: {e}", file=sys.stderr)
        return 1
    except DaemonError as e:
        print(f"mlxd: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
