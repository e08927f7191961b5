"""A model's prefix cache: the KV caches of earlier requests, found by the
longest token prefix they share with a new prompt.

Inside the runner, beside the engine. Two tiers:

- **Memory**: entries keyed by the tokens their cache holds, in mlx-lm's
  ``PromptTrie`` for the prefix search, bounded in bytes and evicted least
  recently used (a hit or a store makes an entry the most recent). A request
  gets a copy (MLX copies share buffers until written), trimmed with mlx-lm's
  ``trim_prompt_cache`` where the entry runs past the shared prefix.
  An entry is stored when a request ends with every token it has seen in its
  cache; storing a longer entry drops the entries that are its prefixes.
- **Disk** (optional): when the model is unloaded, ``persist`` writes the
  entries most worth keeping with ``save_prompt_cache``, as many as the hourly
  write bound leaves room for (``runner/prefix_disk.py`` says where and how
  the files are kept). Worth is reuse: an entry counts the hits of the entries
  it grew from (an agent's conversation, turn after turn), then recency. A
  prompt whose longest prefix is on disk rather than in memory loads it with
  ``load_prompt_cache``. The prompt that made the model load has its file
  read while the weights load (``read_ahead``), in a thread with its own MLX
  stream.

Models whose caches cannot be trimmed (rotating windows, state-space layers)
reuse an entry only when the prompt extends it exactly.

Only the runner's main thread calls into this module (``read_ahead`` starts
the one other thread, and its result is taken before any request is served).
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import attrs
import mlx.core as mx
from mlx_lm.models.cache import (
    KVCache,
    PromptTrie,
    RotatingKVCache,
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
    trim_prompt_cache,
)

from runner import prefix_disk
from runner.steps import Hit

log = logging.getLogger("mlxd.prefix")
Tokens = tuple[int, ...]
_MODEL = "m"  # PromptTrie keys entries by model too; a runner has one
MIN_DISK_GAIN = 32  # tokens a prefix file must save to be worth reading


def trimmable(model: Any) -> bool:
    """Whether the model's caches can be cut back to any shorter prefix."""
    fresh = make_prompt_cache(model)
    return all(c.is_trimmable() for c in fresh) and not any(
        isinstance(c, RotatingKVCache) for c in fresh
    )


def nbytes(cache: list[Any]) -> int:
    return sum(c.nbytes for c in cache)


@attrs.define
class Stats:
    hits: int = 0
    misses: int = 0
    cached_tokens: int = 0
    disk_hits: int = 0
    disk_writes: int = 0
    disk_written_bytes: int = 0
    disk_skipped_bytes: int = 0  # entries not written: over the hourly bound


class Index:
    """Token sequences in a trie, and the best one to reuse for a prompt."""

    def __init__(self) -> None:
        self._trie = PromptTrie()

    def add(self, tokens: Tokens) -> None:
        self._trie.add(_MODEL, list(tokens), True)

    def remove(self, tokens: Tokens) -> None:
        self._trie.pop(_MODEL, list(tokens))

    def best(self, tokens: list[int], can_trim: bool) -> tuple[Tokens, int] | None:
        """The entry to use for ``tokens`` and how many of its tokens to keep
        (at least one prompt token is always left to compute); an entry that
        runs past the prompt needs a cache that ``can_trim``."""
        found = self._trie.search(_MODEL, tokens)
        options = []
        if found.exact is not None and can_trim:
            options.append((tuple(found.exact), len(tokens) - 1))
        if found.shorter is not None:
            options.append((tuple(found.shorter), len(found.shorter)))
        if found.longer is not None and can_trim:
            options.append((tuple(found.longer), min(len(tokens) - 1, found.common_prefix)))
        options = [o for o in options if o[1] > 0]
        return max(options, key=lambda o: o[1]) if options else None


class Disk:
    """One model's prefix files in ``where`` (see ``runner/prefix_disk.py``),
    whose parent holds every model's and is bounded by ``limit`` bytes, and
    ``per_hour`` bytes written (``None``: unbounded)."""

    def __init__(self, where: Path, limit: int, per_hour: int | None = None) -> None:
        self.where, self.limit = where, limit
        self.writes = prefix_disk.Writes(where.parent, per_hour) if per_hour is not None else None
        self.index = Index()
        self.paths: dict[Tokens, Path] = {}
        where.mkdir(parents=True, exist_ok=True)
        prefix_disk.remove_stale(where)
        for path in prefix_disk.files(where):
            try:
                tokens = prefix_disk.read_tokens(path)
            except ValueError as e:
                log.warning("skipping the cached prefix %s: %s", path, e)
                prefix_disk.remove(path)
                continue
            self.paths[tokens] = path
            self.index.add(tokens)

    def size(self, tokens: Tokens) -> int:
        try:
            return self.paths[tokens].stat().st_size
        except OSError:
            return 0

    def read(self, tokens: Tokens, when: str = "") -> list[Any] | None:
        path = self.paths[tokens]
        try:
            started = time.perf_counter()
            cache = load_prompt_cache(str(path))
            mx.eval([c.state for c in cache])
            os.utime(path)
            log.info(
                "read a cached prefix of %d tokens (%d bytes) in %.3f s%s",
                len(tokens),
                nbytes(cache),
                time.perf_counter() - started,
                when,
            )
            return cache
        except Exception as e:  # a damaged file costs a prefill, never the request
            log.warning("cannot read the cached prefix %s, deleting it: %s", path, e)
            self.forget(tokens)
            prefix_disk.remove(path)
            return None

    def write(self, tokens: Tokens, cache: list[Any]) -> bool:
        """Save one prefix, unless it is there already; False if it failed."""
        if tokens in self.paths:
            os.utime(self.paths[tokens])
            return True
        tmp = prefix_disk.temporary(self.where, tokens)
        try:
            save_prompt_cache(str(tmp), cache, {"tokens": prefix_disk.pack_tokens(tokens)})
            path = prefix_disk.final_name(tmp, tokens)
            os.replace(tmp, path)
        except Exception as e:
            log.warning("cannot write a cached prefix to %s: %s", self.where, e)
            prefix_disk.remove(tmp)
            return False
        self.paths[tokens] = path
        self.index.add(tokens)
        return True

    def forget(self, tokens: Tokens) -> None:
        if self.paths.pop(tokens, None) is not None:
            self.index.remove(tokens)

    def enforce(self, written: list[Path]) -> None:
        for path in prefix_disk.enforce(self.where.parent, self.limit, keep=written):
            for tokens, p in list(self.paths.items()):
                if p == path:
                    self.forget(tokens)


class PrefixCache:
    def __init__(self, model: Any, limit: int, disk: Disk | None = None) -> None:
        self.can_trim = trimmable(model)
        self.limit = limit
        self.disk = disk
        self.stats = Stats()
        self._index = Index()
        self._entries: OrderedDict[Tokens, list[Any]] = OrderedDict()  # least recent first
        self._bytes: dict[Tokens, int] = {}
        self._uses: dict[Tokens, int] = {}  # hits of an entry and of those it grew from
        self._ahead: tuple[threading.Thread, dict[Tokens, list[Any]]] | None = None
        self._from_disk: set[Tokens] = set()  # read ahead, not yet used

    @property
    def nbytes(self) -> int:
        return sum(self._bytes.values())

    def describe(self) -> str:
        """A line for the log at load: what reuse this model gets."""
        if self.can_trim:
            how = "reuses the longest prefix a prompt shares with an earlier request"
        else:
            how = (
                "has caches that cannot be trimmed (rotating or state-space layers): it "
                "reuses an earlier request's cache only when the prompt extends it exactly"
            )
        where = f"; kept on disk in {self.disk.where}" if self.disk is not None else ""
        return f"prefix cache: {how}{where}"

    def read_ahead(self, tokens: list[int]) -> None:
        """Start reading the file ``lookup`` would read for ``tokens`` (the
        prompt that made the model load), if it fits the limit, in a thread
        with its own stream: the read overlaps the weights' (on an H200, 0.5 s
        for the 1.7 GB of a 12k-token prompt of an 8B model). ``settle`` takes
        the result."""
        disk = self.disk
        found = disk.index.best(tokens, self.can_trim) if disk is not None else None
        if disk is None or found is None or not self._worth_reading(found, None):
            return
        key, box = found[0], {}
        if disk.size(key) > self.limit:
            return

        def read() -> None:
            with mx.stream(mx.new_stream(mx.default_device())):
                cache = disk.read(key, " while the weights loaded")
            if cache is not None:
                box[key] = cache

        thread = threading.Thread(target=read, name="prefix-read-ahead", daemon=True)
        thread.start()
        self._ahead = thread, box

    def settle(self) -> None:
        """Wait for ``read_ahead`` and keep what it read: the next ``lookup``
        finds it in memory and reports it read from disk."""
        if self._ahead is None:
            return
        thread, box = self._ahead
        self._ahead = None
        thread.join()
        for key, cache in box.items():
            self.store(key, cache)
            if key in self._entries:
                self._from_disk.add(key)

    def lookup(self, tokens: list[int]) -> Hit:
        """The cache to start ``tokens`` from: a private copy of the best entry
        in memory or on disk (counted as a hit), or an empty ``Hit``."""
        best = self._index.best(tokens, self.can_trim)
        cache = None
        source = "memory"
        if self.disk is not None:
            on_disk = self.disk.index.best(tokens, self.can_trim)
            if on_disk is not None and self._worth_reading(on_disk, best):
                loaded = self.disk.read(on_disk[0])
                if loaded is not None:
                    self.stats.disk_hits += 1
                    self.store(on_disk[0], loaded)
                    best, source = on_disk, "disk"
                    if on_disk[0] not in self._entries:  # larger than the memory limit
                        cache = loaded
        if best is None:
            self.stats.misses += 1
            return Hit()
        key, keep = best
        if cache is None:
            self._entries.move_to_end(key)
            cache = copy.deepcopy(self._entries[key])
            if key in self._from_disk:  # read ahead, at load
                self._from_disk.discard(key)
                self.stats.disk_hits += 1
                source = "disk"
        if keep < len(key):
            trim_prompt_cache(cache, len(key) - keep)
        if key in self._uses and _continues(best):
            self._uses[key] += 1
        self.stats.hits += 1
        self.stats.cached_tokens += keep
        return Hit(cache, keep, source)

    @staticmethod
    def _worth_reading(on_disk: tuple[Tokens, int], best: tuple[Tokens, int] | None) -> bool:
        """Read a file only for a real gain: it saves at least ``MIN_DISK_GAIN``
        tokens over memory's best, and at least half of what is read is used
        (a file is read whole, so a few shared tokens of a long one would cost
        more to read than to compute, and stall the streams meanwhile)."""
        (key, keep), have = on_disk, best[1] if best is not None else 0
        return keep - have >= MIN_DISK_GAIN and keep * 2 >= len(key)

    def store(self, tokens: Tokens, cache: list[Any]) -> None:
        """Keep ``cache``, which holds exactly ``tokens``, as the most recent entry."""
        if not tokens or self.limit <= 0:
            return
        held = {c.size() for c in cache if type(c) is KVCache}
        if held - {len(tokens)}:  # a bug would make every later hit wrong: refuse it
            log.warning("not caching a prefix of %d tokens: its cache holds %s", len(tokens), held)
            return
        size = nbytes(cache)
        if size > self.limit:
            return
        grew_from = self._index.best(list(tokens), self.can_trim)
        uses = self._uses.get(grew_from[0], 0) if grew_from and _continues(grew_from) else 0
        if tokens in self._entries:
            self._drop(tokens)
        self._entries[tokens] = cache
        self._bytes[tokens] = size
        self._uses[tokens] = uses
        self._index.add(tokens)
        if self.can_trim:  # an entry a longer one extends is no longer needed
            for shorter in [t for t in self._entries if len(t) < len(tokens)]:
                if tokens[: len(shorter)] == shorter:
                    self._drop(shorter)
        self._shrink()

    def set_limit(self, limit: int) -> None:
        self.limit = limit
        self._shrink()

    def persist(self) -> int:
        """Write the entries most worth keeping to disk (most reused, then
        most recent), as many as its size bound and the hourly write bound
        take, and drop every entry from memory (unloading frees the memory
        early that way). Returns the number written."""
        disk = self.disk
        if disk is None:
            return 0
        recent_first = reversed(self._entries)
        ranked = sorted(recent_first, key=self._uses.__getitem__, reverse=True)  # stable
        wanted = {t for t in ranked if len(t) >= MIN_DISK_GAIN and t not in disk.paths}
        want = min(sum(self._bytes[t] for t in wanted), disk.limit)
        rid, room = disk.writes.reserve(want) if disk.writes is not None else ("", want)
        written: list[Path] = []
        nbytes = 0
        for tokens in ranked:
            cache, size = self._entries[tokens], self._bytes[tokens]
            self._drop(tokens)
            if tokens in disk.paths:
                disk.write(tokens, cache)  # there already: marked as used
            elif tokens in wanted and size <= room and disk.write(tokens, cache):
                self.stats.disk_writes += 1
                written.append(disk.paths[tokens])
                nbytes += size
                room -= size
            elif tokens in wanted:
                self.stats.disk_skipped_bytes += size
            del cache
            mx.clear_cache()
        self.stats.disk_written_bytes += nbytes
        if disk.writes is not None:
            disk.writes.settle(rid, nbytes)
        if written:
            disk.enforce(written)
        return len(written)

    def summary(self) -> dict[str, Any]:
        """For the runner's stats: bytes and entries in memory, the limit, counters."""
        return {
            "bytes": self.nbytes,
            "entries": len(self._entries),
            "limit": self.limit,
            **attrs.asdict(self.stats),
        }

    def _drop(self, tokens: Tokens) -> None:
        del self._entries[tokens]
        del self._bytes[tokens]
        del self._uses[tokens]
        self._from_disk.discard(tokens)
        self._index.remove(tokens)

    def _shrink(self) -> None:
        freed = False
        while self._entries and self.nbytes > self.limit:
            self._drop(next(iter(self._entries)))
            freed = True
        if freed:
            mx.clear_cache()


def _continues(found: tuple[Tokens, int]) -> bool:
    """Whether a prompt that keeps ``found[1]`` tokens of entry ``found[0]``
    carries it on (keeps at least half of it), rather than sharing a few
    opening tokens with it: only that counts as the entry's reuse."""
    return found[1] * 2 >= len(found[0])
