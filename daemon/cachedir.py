"""Whether the cache folder can be used: told once at start (and by
``mlxd doctor``), and the daemon then serves without what needs it (prefix
files on disk, stored responses on disk) rather than failing every load."""

from __future__ import annotations

import os
from pathlib import Path


def problem(cache_dir: Path) -> str | None:
    """Why ``cache_dir`` cannot hold mlxd's files (None if it can)."""
    probe = cache_dir / f".mlxd-probe-{os.getpid()}"
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}"
    return None
