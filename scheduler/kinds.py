"""What a model does: generate text ("chat") or embed it ("embed").

The API refuses a chat request to an embedding model (and the reverse)
before anything is queued, the ledger charges an embedding model no KV cache,
and its runner loads an embedding engine instead of a generating one; all
three ask here. A model's ``kind`` in the config decides; "auto" reads its
directory: a sentence-transformers model (``modules.json``: Qwen3-Embedding
has one, though its config calls it ``Qwen3ForCausalLM``), or a config whose
``architectures`` are none of the generating ones (``BertModel``,
``XLMRobertaModel``...), embeds. A config without ``architectures`` (as some
converters write them) is taken as a chat model, what most MLX models are.
"""

from __future__ import annotations

import json
from pathlib import Path

from config.settings import ModelConfig

GENERATING = ("ForCausalLM", "ForConditionalGeneration")


def kind_of(model: ModelConfig, model_dir: Path) -> str:
    """What ``model`` does ("chat" or "embed"); its files are in ``model_dir``."""
    if (known := model.known_kind) is not None:
        return known
    return kind_of_directory(model_dir)


def kind_of_directory(model_dir: Path) -> str:
    if (model_dir / "modules.json").is_file():
        return "embed"
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return "chat"  # its load will say what is wrong
    architectures = config.get("architectures") if isinstance(config, dict) else None
    if not isinstance(architectures, list) or not architectures:
        return "chat"
    generating = any(str(a).endswith(GENERATING) for a in architectures)
    return "chat" if generating else "embed"
