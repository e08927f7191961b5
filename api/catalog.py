"""The configured models, by name and alias, and their tokenizers.

This is the one registry of model names: the routes resolve a request's
model here, and the daemon hands the scheduler and the launcher the configs
it names. A reload swaps it whole (``reconfigure``). A model's tokenizer is
loaded once per config, on first need (finding the model's files through
the daemon's launcher, which may convert the bundled model); a per-model lock
makes concurrent first requests share that work.
"""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from api.texts import Texts
from config.settings import ModelConfig, Settings
from scheduler.errors import ModelLoadFailed, ModelNotFound


class Catalog:
    def __init__(
        self, settings: Settings, model_dir: Callable[[ModelConfig], Awaitable[Path]]
    ) -> None:
        self.settings = settings
        self.models = {m.name: m for m in settings.models}
        self._by_name = {n: m for m in settings.models for n in m.names}
        self._model_dir = model_dir
        self._texts: dict[ModelConfig, Texts] = {}  # a changed config is a new key
        self._locks: collections.defaultdict[str, trio.Lock] = collections.defaultdict(trio.Lock)

    def reconfigure(self, settings: Settings) -> tuple[set[str], set[str], set[str]]:
        """Take a new config's models; returns the names added, removed and
        changed (requests already holding a model keep theirs)."""
        old, new = self.models, {m.name: m for m in settings.models}
        added = new.keys() - old.keys()
        removed = old.keys() - new.keys()
        changed = {n for n in new.keys() & old.keys() if new[n] != old[n]}
        for name in removed | changed:
            self._texts.pop(old[name], None)
        self.settings, self.models = settings, new
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
        if (texts := self._texts.get(model)) is not None:
            return texts
        async with self._locks[model.name]:
            if model not in self._texts:
                model_dir = await self._model_dir(model)
                try:
                    texts = await trio.to_thread.run_sync(Texts, model_dir, model.max_context)
                except (OSError, ValueError) as e:
                    raise ModelLoadFailed(
                        f"cannot load the tokenizer of {model.name!r} from {model_dir}: {e}"
                    ) from e
                self._texts[model] = texts
        return self._texts[model]
