"""The ``mlxd`` command line."""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from pathlib import Path

import attrs
import trio

from config.settings import ConfigError, Settings, default_config_path


def _load(path: str | None) -> Settings:
    if path is not None:
        return Settings.from_toml(Path(path))
    default = default_config_path()
    return Settings.from_toml(default) if default.is_file() else Settings()


def cmd_serve(args: argparse.Namespace) -> int:
    from daemon.serve import serve

    settings = _load(args.config)
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    settings = attrs.evolve(settings, **overrides)
    logging.basicConfig(
        level=(args.log_level or settings.log_level).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        trio.run(serve, settings)
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


if __name__ == "__main__":
    sys.exit(main())
