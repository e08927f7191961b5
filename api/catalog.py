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
from typing import TypeVar

import trio

from api.encoder import Encoder
from api.images import Sizing
from api.texts import Texts, texts_of
from config.settings import ModelConfig, Settings
from scheduler.errors import InvalidRequest, ModelLoadFailed, ModelNotFound
from scheduler.kinds import kind_of

T = TypeVar("T")

SERVES = {
    "chat": "a chat model: it generates text (chat, completions, responses, messages)",
    "embed": "an embedding model: it serves /v1/embeddings",
}


class Catalog:
    def __init__(
        self, settings: Settings, model_dir: Callable[[ModelConfig], Awaitable[Path]]
    ) -> None:
        self.settings = settings
        self.models = {m.name: m for m in settings.models}
        self._by_name = {n: m for m in settings.models for n in m.names}
        self._model_dir = model_dir
        self._texts: dict[ModelConfig, Texts] = {}  # a changed config is a new key
        self._encoders: dict[ModelConfig, Encoder] = {}
        self._kinds: dict[ModelConfig, str] = {}
        self._sees: dict[ModelConfig, bool] = {}  # whether it takes images
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
            self._encoders.pop(old[name], None)
            self._kinds.pop(old[name], None)
            self._sees.pop(old[name], None)
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

    async def kind(self, name: str) -> str:
        """What the model does: "chat" or "embed" (``scheduler/kinds.py``),
        from its config, or from its files (found, not loaded) under "auto"."""
        model = self.get(name)
        if (known := model.known_kind) is not None:
            return known
        if model not in self._kinds:
            model_dir = await self._model_dir(model)
            self._kinds[model] = await trio.to_thread.run_sync(kind_of, model, model_dir)
        return self._kinds[model]

    async def sees(self, name: str) -> bool:
        """Whether the model takes images (a vision-language model that mlxd
        can size images for: ``api/images.py``), from its files."""
        model = self.get(name)
        if model not in self._sees:
            model_dir = await self._model_dir(model)
            sizing = await trio.to_thread.run_sync(Sizing.of, model_dir)
            self._sees[model] = sizing is not None
        return self._sees[model]

    async def capabilities(self, name: str) -> list[str]:
        """What the model takes and does, as Ollama names it: "completion"
        and, for a model that takes images, "vision"; or "embedding"."""
        if await self.kind(name) == "embed":
            return ["embedding"]
        return ["completion", "vision"] if await self.sees(name) else ["completion"]

    def known_capabilities(self, name: str) -> list[str] | None:
        """``capabilities`` where what they rest on is already known (found
        by a request, a model card or a load); None where finding out would
        mean resolving the model's source (a download, or a conversion)."""
        model = self.get(name)
        kind = model.known_kind or self._kinds.get(model)
        if kind == "embed":
            return ["embedding"]
        sees, texts = self._sees.get(model), self._texts.get(model)
        if sees is None and texts is not None:
            sees = texts.sizing is not None
        if sees is None:
            return None
        return ["completion", "vision"] if sees else ["completion"]

    async def require(self, name: str, kind: str) -> None:
        """Refuse a request that asks ``name`` for what it does not do."""
        does = await self.kind(name)
        if does != kind:
            asked = "embeddings" if kind == "embed" else "text generation"
            raise InvalidRequest(
                f"model {self.get(name).name!r} is {SERVES[does]}; this request asks for {asked}",
                param="model",
            )

    async def encoder(self, name: str) -> Encoder:
        """An embedding model's tokenizer and limits (``api/encoder.py``)."""
        return await self._loaded(self._encoders, name, Encoder)

    async def texts(self, name: str) -> Texts:
        return await self._loaded(self._texts, name, texts_of)

    async def _loaded(
        self,
        cache: dict[ModelConfig, T],
        name: str,
        load: Callable[[Path, int | None], T],
    ) -> T:
        """``load(model_dir, max_context)`` once per model config, in a thread;
        concurrent first requests wait for the one load."""
        model = self.get(name)
        if (done := cache.get(model)) is not None:
            return done
        async with self._locks[model.name]:
            if model not in cache:
                model_dir = await self._model_dir(model)
                try:
                    cache[model] = await trio.to_thread.run_sync(load, model_dir, model.max_context)
                except Exception as e:  # tokenizers raises its own errors for a bad file
                    raise ModelLoadFailed(
                        f"cannot load the tokenizer of {model.name!r} from {model_dir}: {e}"
                    ) from e
        return cache[model]
