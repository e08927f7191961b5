"""The configured models, by name and alias, and their prepared files.

Preparing a model (finding its directory, converting the bundled model on
first use, loading its tokenizer) happens once per model, on first need; a
per-model lock makes concurrent first requests share that work.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import trio

from api.texts import Texts
from config.settings import ModelConfig, Settings
from runner import prefix_disk, sources
from runner.client import RunnerProcess, RunnerSpec, Spares
from scheduler import memory
from scheduler.errors import ModelLoadFailed, ModelNotFound
from scheduler.policy import StartRunner

log = logging.getLogger("mlxd.catalog")


class Catalog:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.models = {m.name: m for m in settings.models}
        self._by_name = {n: m for m in settings.models for n in m.names}
        self._dirs: dict[str, Path] = {}
        self._texts: dict[str, Texts] = {}
        self._sizes: dict[str, memory.Size] = {}
        self._prefix_dirs: dict[str, Path] = {}
        self._locks = {m.name: trio.Lock() for m in settings.models}
        self.spares = Spares()

    def reconfigure(self, settings: Settings) -> tuple[set[str], set[str], set[str]]:
        """Take a new config's models; returns the names added, removed and
        changed. What was prepared for a removed or changed model is dropped
        (requests already holding it keep theirs)."""
        old, new = self.models, {m.name: m for m in settings.models}
        added = new.keys() - old.keys()
        removed = old.keys() - new.keys()
        changed = {n for n in new.keys() & old.keys() if new[n] != old[n]}
        for name in removed | changed:
            for cache in (self._dirs, self._texts, self._sizes, self._prefix_dirs):
                cache.pop(name, None)
        for name in added:
            self._locks[name] = trio.Lock()
        self.settings = settings
        self.models = new
        self._by_name = {n: m for m in settings.models for n in m.names}
        return set(added), set(removed), changed

    def get(self, name: str) -> ModelConfig:
        try:
            return self._by_name[name]
        except KeyError:
            known = ", ".join(sorted(self.models))
            raise ModelNotFound(
                f"the model {name!r} does not exist; available models: {known}", param="model"
            ) from None

    async def texts(self, name: str) -> Texts:
        model = self.get(name)
        if (texts := self._texts.get(model.name)) is not None:
            return texts
        async with self._locks[model.name]:
            if model.name not in self._texts:
                model_dir = await self._model_dir(model)
                try:
                    texts = await trio.to_thread.run_sync(Texts, model_dir, model.max_context)
                except (OSError, ValueError) as e:
                    raise ModelLoadFailed(
                        f"cannot load the tokenizer of {model.name!r} from {model_dir}: {e}"
                    ) from e
                self._texts[model.name] = texts
        await self._prefix_dir(model)
        return self._texts[model.name]

    async def size(self, name: str) -> memory.Size:
        """The model's estimated bytes when loaded and KV bytes per token
        (``scheduler/memory.py``)."""
        if name not in self._sizes:
            model = self.get(name)
            model_dir = await self._model_dir(model)
            try:
                self._sizes[name] = await trio.to_thread.run_sync(memory.estimate, model_dir, model)
            except (OSError, ValueError, KeyError, struct.error) as e:
                raise ModelLoadFailed(f"cannot size model {name!r} from {model_dir}: {e}") from e
        return self._sizes[name]

    async def _prefix_dir(self, model: ModelConfig) -> Path | None:
        """Where the model's cached prefixes are kept on disk (see
        ``runner/prefix_disk.py``; the runner is told), found once; ``None``
        if it keeps none there: no disk tier, or no prefix cache at all."""
        if self.settings.prefix_disk_bytes <= 0 or model.prefix_cache_bytes <= 0:
            return None
        if model.name not in self._prefix_dirs:
            root = self.settings.cache_dir / "prefixes"
            try:
                self._prefix_dirs[model.name] = await trio.to_thread.run_sync(
                    prefix_disk.directory, root, await self._model_dir(model)
                )
            except (OSError, ValueError, struct.error) as e:  # the load will say more
                log.warning("cannot fingerprint the weights of %s: %s", model.name, e)
                return None
        return self._prefix_dirs[model.name]

    def prefix_disk_bytes(self, name: str) -> int:
        """Bytes of the model's prefixes on disk (0 until its files are known)."""
        where = self._prefix_dirs.get(name)
        return prefix_disk.usage(where) if where is not None else 0

    async def make_runner(self, start: StartRunner) -> RunnerProcess:
        model = self.get(start.model)
        async with self._locks[model.name]:
            model_dir = await self._model_dir(model)
            prefix_dir = await self._prefix_dir(model)
        size = await self.size(model.name)
        spec = RunnerSpec(
            model.name,
            model_dir,
            model.max_concurrency,
            prefill_chunk=model.prefill_chunk,
            prefix_cache=start.prefixes,
            prefix_dir=prefix_dir,
            prefix_disk=self.settings.prefix_disk_bytes,
            cache_limit=size.working,
            prompt=start.prompt,
        )
        return RunnerProcess(
            spec,
            stop_grace_s=self.settings.shutdown_grace_s,
            spares=self.spares,
        )

    async def _model_dir(self, model: ModelConfig) -> Path:
        if model.name not in self._dirs:
            try:
                self._dirs[model.name] = await sources.resolve(
                    model.source, self.settings.cache_dir
                )
            except sources.SourceError as e:
                raise ModelLoadFailed(f"model {model.name!r}: {e}") from e
        return self._dirs[model.name]
