"""What the daemon hands the scheduler: runners for the models it loads.

The scheduler decides when a model loads (``StartRunner``) and owns the
runner it gets back; it knows nothing of files or processes. This module
knows them: where each model's files are (the bundled one converted on first
use), what it will cost in memory (``scheduler/memory.py``'s estimate),
where its cached prefixes live on disk, and the spare runner process a load
takes over. Each is found once per model config, under a per-model lock, so
concurrent first requests share the work; a changed config is a new key.

Models are named through the API's catalog (``api/catalog.py``), the one
registry of names; this module is handed their configs.
"""

from __future__ import annotations

import collections
import logging
import struct
from pathlib import Path

import trio

from config.settings import ModelConfig, Settings
from runner import prefix_disk, sources
from runner.client import RunnerProcess, RunnerSpec
from runner.errors import SourceError
from runner.spares import Spares
from scheduler import memory
from scheduler.errors import ModelLoadFailed
from scheduler.events import StartRunner
from scheduler.kinds import kind_of

log = logging.getLogger("mlxd.launcher")


class Launcher:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings  # what a reload may change is per model, not here
        self.spares = Spares(enabled=settings.spare_runner)
        self._dirs: dict[ModelConfig, Path] = {}
        self._sizes: dict[ModelConfig, memory.Size] = {}
        # by model, the weights' files as they were (``prefix_disk.stamp``) and
        # their prefix folder then: new files, a new fingerprint
        self._prefix_dirs: dict[ModelConfig, tuple[object, Path | None]] = {}
        self._on_disk: dict[str, Path] = {}  # by model name, for the pool's status
        self._locks: collections.defaultdict[str, trio.Lock] = collections.defaultdict(trio.Lock)

    async def model_dir(self, model: ModelConfig) -> Path:
        """The model's MLX directory (converting the bundled model on first use)."""
        async with self._locks[model.name]:
            if model not in self._dirs:
                try:
                    self._dirs[model] = await sources.resolve(model.source, self.settings.cache_dir)
                except SourceError as e:
                    raise ModelLoadFailed(f"model {model.name!r}: {e}") from e
        return self._dirs[model]

    async def kind(self, model: ModelConfig) -> str:
        """What the model does ("chat" or "embed"; see ``scheduler/kinds.py``)."""
        if (known := model.known_kind) is not None:
            return known
        return await trio.to_thread.run_sync(kind_of, model, await self.model_dir(model))

    async def size(self, model: ModelConfig) -> memory.Size:
        """The model's estimated bytes when loaded and KV bytes per token."""
        if model not in self._sizes:
            model_dir = await self.model_dir(model)
            try:
                size = await trio.to_thread.run_sync(memory.estimate, model_dir, model)
            except (OSError, ValueError, KeyError, struct.error) as e:
                raise ModelLoadFailed(
                    f"cannot size model {model.name!r} from {model_dir}: {e}"
                ) from e
            self._sizes[model] = size
        return self._sizes[model]

    async def prefix_dir(self, model: ModelConfig) -> Path | None:
        """Where the model's cached prefixes are kept on disk (see
        ``runner/prefix_disk.py``; the runner is told); ``None`` if it keeps
        none there: no disk tier, no prefix cache, or unreadable weights
        (whose load will say more)."""
        if self.settings.prefix_disk_bytes <= 0 or model.prefix_cache_bytes <= 0:
            return None
        root, model_dir = self.settings.cache_dir / "prefixes", await self.model_dir(model)
        try:
            now = await trio.to_thread.run_sync(prefix_disk.stamp, model_dir)
        except OSError:
            now = None
        known = self._prefix_dirs.get(model)
        if known is None or known[0] != now:  # weights replaced: their prefixes are not ours
            try:
                where = await trio.to_thread.run_sync(prefix_disk.directory, root, model_dir)
            except (OSError, ValueError, struct.error) as e:
                log.warning("cannot fingerprint the weights of %s: %s", model.name, e)
                where = None
            self._prefix_dirs[model] = (now, where)
            if where is not None:
                self._on_disk[model.name] = where
        return self._prefix_dirs[model][1]

    def prefix_disk_bytes(self, name: str) -> int:
        """Bytes of the model's prefixes on disk (0 until its files are known)."""
        where = self._on_disk.get(name)
        return prefix_disk.usage(where) if where is not None else 0

    def prefix_disk_writes_left(self) -> int:
        """Bytes the disk tier may still write this hour (all models')."""
        if self.settings.prefix_disk_bytes <= 0:
            return 0
        root = self.settings.cache_dir / "prefixes"
        try:
            return prefix_disk.Writes(root, self.settings.prefix_disk_writes).left()
        except OSError:
            return 0

    async def runner(self, model: ModelConfig, start: StartRunner) -> RunnerProcess:
        """A runner process for ``start``: the spare if there is one, loading
        the model with what the policy gave it (prefix-cache bytes, the prompt
        whose cached prefix it may read ahead)."""
        size = await self.size(model)
        spec = RunnerSpec(
            model.name,
            await self.model_dir(model),
            model.max_concurrency,
            prefill_chunk=model.prefill_chunk,
            prefix_cache=start.prefixes,
            prefix_dir=await self.prefix_dir(model),
            prefix_disk=self.settings.prefix_disk_bytes,
            prefix_disk_writes=self.settings.prefix_disk_writes,
            cache_limit=size.working,
            prompt=start.prompt,
            kind=await self.kind(model),
            image_features=size.images,
        )
        return RunnerProcess(spec, stop_grace_s=self.settings.shutdown_grace_s, spares=self.spares)
