"""The stored responses' file: a snapshot, and a journal of the changes since.

With ``persist_responses``, every change to the store (a response kept or
deleted, a conversation made, grown or deleted) is appended to
``responses.jsonl`` as one JSON line the moment it is made, and the file is
flushed to the kernel at once and to the disk within a second (``sync``):
what a client was answered survives the daemon being killed (SIGKILL, the
OOM killer) a moment later, and a power cut a second later. Now and then the
store is written whole to ``responses.json`` (``compact``: in a worker
thread, after the journal so far is set aside as ``responses.jsonl.old``,
which the snapshot then covers), and the journal starts again.

Reading it back never stops the daemon: each line, and the snapshot, is read
on its own; what is damaged, cut off by a crash, of the wrong shape or
nested too deep is skipped, with one warning naming the file. A file mlxd
cannot read or write (a directory in its place, a cache folder that is not
one) is one warning, and the store then lives in memory only.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("mlxd.store")

Record = dict[str, Any]


class Journal:
    def __init__(self, snapshot: Path) -> None:
        self.snapshot = snapshot
        self.path = snapshot.with_name(snapshot.stem + ".jsonl")
        self.old = self.path.with_name(self.path.name + ".old")
        self.usable = True  # false once it cannot be written: the store lives in memory
        self.appended = 0  # bytes in the journal since the last snapshot
        self._unsynced = False

    # -- reading back --------------------------------------------------------

    def read(self) -> tuple[Any, list[Record]]:
        """The snapshot (as parsed; None if there is none or it is damaged)
        and the journal's records after it, oldest first."""
        snapshot = None
        try:
            if self.snapshot.exists():
                snapshot = json.loads(self.snapshot.read_text())
        except (OSError, ValueError, RecursionError, UnicodeDecodeError) as e:
            log.warning("ignoring the stored responses in %s: %s", self.snapshot, e)
        records = [*self._lines(self.old), *self._lines(self.path)]
        return snapshot, records

    def _lines(self, path: Path) -> Iterator[Record]:
        if not path.exists():
            return
        bad = 0
        try:
            with path.open(encoding="utf-8", errors="replace") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except (ValueError, RecursionError):
                        bad += 1  # a line cut off by a crash, or damaged
                        continue
                    if isinstance(record, dict):
                        yield record
                    else:
                        bad += 1
        except OSError as e:
            log.warning("ignoring the stored responses journal %s: %s", path, e)
        if bad:
            log.warning("skipped %d damaged lines of the stored responses journal %s", bad, path)

    # -- writing -------------------------------------------------------------

    def append(self, record: Record) -> None:
        """Add a change; the kernel has it when this returns."""
        if not self.usable:
            return
        line = json.dumps(record, ensure_ascii=False) + "\n"
        try:
            if not self.appended:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:  # closed: the kernel has it
                f.write(line)
        except OSError as e:
            self._give_up(e)
            return
        self.appended += len(line)
        self._unsynced = True

    def sync(self) -> None:
        """Put what was appended on the disk (a worker thread's call)."""
        if not self._unsynced:
            return
        self._unsynced = False
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:  # set aside meanwhile: its snapshot syncs
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def set_aside(self) -> bool:
        """Start a new journal, the old one kept until the next snapshot covers
        it; false if a snapshot is still being written or there is no file."""
        if not self.usable or self.old.exists():
            return False
        try:
            if self.path.exists():
                os.replace(self.path, self.old)
        except OSError as e:
            self._give_up(e)
            return False
        self.appended = 0
        return True

    def write_snapshot(self, content: Any) -> None:
        """Write the store whole, then drop the journal it covers (a worker
        thread's call, after ``set_aside``)."""
        try:
            tmp = self.snapshot.with_suffix(".tmp")
            with tmp.open("w", encoding="utf-8") as f:
                json.dump(content, f, ensure_ascii=False)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.snapshot)
            self.old.unlink(missing_ok=True)
        except OSError as e:
            log.warning("cannot write the stored responses to %s: %s", self.snapshot, e)

    def _give_up(self, e: OSError) -> None:
        log.warning(
            "cannot write the stored responses journal %s (%s): they are kept in memory only",
            self.path,
            e,
        )
        self.usable = False
