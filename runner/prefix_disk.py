"""Where cached prefixes live on disk, and the bookkeeping of their files.

Layout: ``<cache_dir>/prefixes/<fingerprint>/<key>-<digest>.safetensors``,
one file per cached prefix, written by mlx-lm's ``save_prompt_cache`` with the
tokens it holds in its metadata (``runner/prefix.py`` reads and writes them).
The key hashes the tokens; the digest hashes samples of the file's bytes.

- The fingerprint names the model's weights: a hash of its config and, for
  every safetensors file, its size, its header and samples of its bytes. A
  model whose weights change gets another directory, so it never reads a
  cache computed by other weights; reading a few megabytes keeps it fast for
  models of any size.
- A file is written under a temporary name and renamed into place, so a file
  with the final name is complete unless the disk itself lost it. Before a
  file is used, its size must match its header and its samples its digest;
  one that fails (or then cannot be read) is skipped with a warning and
  deleted. Sampling keeps the check to a few reads whatever the size: it
  catches truncated and overwritten files, not a flipped bit.
- The whole ``prefixes`` tree is bounded in bytes: after a write, the files
  least recently used (their mtime, touched on every read) go first.
- And in what it writes (an SSD wears with every byte): ``Writes`` keeps,
  in ``<cache_dir>/prefixes/writes.json``, what every runner wrote in the
  last hour, and grants each unload only what is left of the hourly bound.

No MLX here: the daemon uses this module for its metrics and ``/api/ps``.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import stat
import struct
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("mlxd.prefix")

FORMAT = "mlxd-prefix-1"  # part of the fingerprint: a new layout starts afresh
SUFFIX = ".safetensors"
TMP = ".tmp-"
LEDGER = "writes.json"
HOUR_S = 3600.0
MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's limit
_SAMPLES = 8  # blocks read from each weights file
_SAMPLE_BYTES = 64 * 1024


def fingerprint(model_dir: Path) -> str:
    """A short hash that changes whenever the model's weights do: their
    names, sizes, modification times and sampled bytes, and the config."""
    h = hashlib.sha256(FORMAT.encode())
    config = model_dir / "config.json"
    if config.exists():
        h.update(config.read_bytes())
    for path in sorted(model_dir.glob("*.safetensors")):
        h.update(f"{path.name}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode())
        h.update(_sampled(path).digest())
    return h.hexdigest()[:24]


def stamp(model_dir: Path) -> tuple[tuple[str, int, int], ...]:
    """What the weights' files are now (names, sizes, modification times):
    cheap to read, and a change in it calls for a new ``fingerprint``."""
    stats = ((p.name, p.stat()) for p in sorted(model_dir.glob("*.safetensors")))
    return tuple((name, st.st_size, st.st_mtime_ns) for name, st in stats)


def digest(path: Path) -> str:
    """A hash of a safetensors file's header and samples of its data."""
    return _sampled(path).hexdigest()[:16]


def _sampled(path: Path) -> Any:
    h = hashlib.sha256()
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        (header,) = struct.unpack("<Q", f.read(8))
        if header > min(size - 8, MAX_HEADER):
            raise ValueError(f"{path.name} is not a safetensors file (a {header}-byte header)")
        h.update(f.read(header))
        data = 8 + header
        span = max(size - data - _SAMPLE_BYTES, 0)
        for i in range(_SAMPLES):
            f.seek(data + span * i // (_SAMPLES - 1))
            h.update(f.read(_SAMPLE_BYTES))
    return h


def directory(root: Path, model_dir: Path) -> Path:
    """The directory of ``model_dir``'s prefixes under ``root`` (``<cache_dir>/prefixes``)."""
    return root / fingerprint(model_dir)


def key(tokens: Sequence[int]) -> str:
    """The start of a prefix file's name: the hash of its tokens."""
    return hashlib.sha256(np.asarray(tokens, dtype=np.int32).tobytes()).hexdigest()[:32]


def final_name(tmp: Path, tokens: Sequence[int]) -> Path:
    """The name a written file takes: its key, then its digest."""
    return tmp.parent / f"{key(tokens)}-{digest(tmp)}{SUFFIX}"


def pack_tokens(tokens: Sequence[int]) -> str:
    """Tokens as a metadata string (safetensors metadata holds strings only)."""
    return base64.b64encode(np.asarray(tokens, dtype=np.int32).tobytes()).decode()


def read_tokens(path: Path) -> tuple[int, ...]:
    """The tokens a prefix file holds, after checking its size and digest
    (the KV arrays are sampled, not read). ``ValueError`` if the file is not
    one of ours or is damaged."""
    try:
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 64 * 1024 * 1024:
                raise ValueError("header too large")
            header = json.loads(f.read(size))
        packed = header["__metadata__"]["0.tokens"]
        data = base64.b64decode(packed, validate=True)
        total = os.path.getsize(path)
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (OSError, struct.error, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"not a readable prefix file: {e}") from None
    if 8 + size + max(ends, default=0) != total:
        raise ValueError("its size is not what its header says (a partial write?)")
    if not path.stem.endswith(f"-{digest(path)}"):
        raise ValueError("its bytes do not match its digest (damaged on disk?)")
    return tuple(int(t) for t in np.frombuffer(data, dtype=np.int32))


def files(where: Path) -> list[Path]:
    """The prefix files under ``where`` (not those still being written); an
    entry named like one that is not a regular file (a folder, a FIFO, a
    link) is skipped with a warning: opening a FIFO would wait for ever."""
    if not where.is_dir():
        return []
    out = []
    for path in where.rglob(f"*{SUFFIX}"):
        if path.name.startswith(TMP):
            continue
        try:
            regular = stat.S_ISREG(path.lstat().st_mode)
        except OSError:
            continue
        if regular:
            out.append(path)
        else:
            log.warning("skipping %s in the prefix folder: not a regular file", path)
    return sorted(out)


def temporary(where: Path, tokens: Sequence[int]) -> Path:
    """Where a prefix file is written before it takes its final name."""
    return where / f"{TMP}{os.getpid()}-{key(tokens)}{SUFFIX}"


def remove_stale(where: Path, older_than_s: float = 600.0) -> None:
    """Remove what writes cut short (a runner killed mid-write) left behind."""
    now = time.time()
    for path in where.glob(f"{TMP}*"):
        try:
            if now - path.stat().st_mtime > older_than_s:
                path.unlink()
        except FileNotFoundError:
            pass


def usage(where: Path) -> int:
    """Bytes of the prefix files under ``where``."""
    return sum(_size(p) for p in files(where))


def enforce(root: Path, limit: int, keep: Iterable[Path] = ()) -> list[Path]:
    """Delete the least recently used prefix files under ``root`` until they
    take at most ``limit`` bytes (never one of ``keep`` if others can go).
    Returns the files deleted."""
    kept = set(keep)
    entries = []
    for p in files(root):
        try:
            st = p.stat()
        except FileNotFoundError:
            continue  # another runner just removed it
        entries.append((p in kept, st.st_mtime, st.st_size, p))
    total = sum(e[2] for e in entries)
    removed = []
    for _, _, size, path in sorted(entries):
        if total <= limit:
            break
        remove(path)
        total -= size
        removed.append(path)
    return removed


def remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


class Writes:
    """The hourly bound on bytes written under ``root`` (every model's
    prefix folders), shared by every runner through ``root/writes.json``:
    each write is a record ``[time, bytes, id]``, and records older than an
    hour no longer count. A runner reserves before it writes and settles
    after, under an exclusive lock; one killed in between leaves its
    reservation counted (too little written, never too much). A damaged
    ledger is started afresh, with a warning."""

    def __init__(self, root: Path, per_hour: int) -> None:
        self.root, self.per_hour = root, per_hour

    def left(self) -> int:
        """Bytes that may still be written this hour."""
        with self._ledger() as records:
            return self._left(records)

    def reserve(self, want: int) -> tuple[str, int]:
        """Reserve up to ``want`` bytes: the reservation's id and its bytes."""
        rid = f"{os.getpid()}-{time.time_ns()}"
        with self._ledger() as records:
            granted = max(min(want, self._left(records)), 0)
            records.append([time.time(), granted, rid])
        return rid, granted

    def settle(self, rid: str, written: int) -> None:
        """Replace reservation ``rid`` with the bytes really written."""
        with self._ledger() as records:
            for record in records:
                if record[2] == rid:
                    record[1] = written

    def _left(self, records: list[list[Any]]) -> int:
        return self.per_hour - sum(int(r[1]) for r in records)

    @contextlib.contextmanager
    def _ledger(self) -> Iterator[list[list[Any]]]:
        """The last hour's records, locked; written back when the block ends."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / LEDGER
        with (self.root / f"{LEDGER}.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            records = _records(path)
            since = time.time() - HOUR_S
            records = [r for r in records if r[0] > since]
            yield records
            tmp = path.with_name(f"{TMP}{os.getpid()}-{LEDGER}")
            tmp.write_text(json.dumps(records))
            os.replace(tmp, path)


def _records(path: Path) -> list[list[Any]]:
    try:
        records = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError, RecursionError) as e:
        log.warning("starting the prefix write ledger %s afresh: %s", path, e)
        return []
    valid = isinstance(records, list) and all(
        isinstance(r, list)
        and len(r) == 3
        and all(isinstance(x, (int, float)) for x in r[:2])
        and isinstance(r[2], str)
        for r in records
    )
    if not valid:
        log.warning("starting the prefix write ledger %s afresh: not a list of records", path)
        return []
    return records
