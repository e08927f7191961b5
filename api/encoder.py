"""Text on the daemon's side of an embedding model: its tokenizer and limits.

Embedding models' ``tokenizer.json`` files often pad every input to a fixed
length (all-MiniLM-L6-v2's pads to 128) and truncate silently; neither is
wanted here. Padding is the runner's business (it pads a batch to its longest
input, with a mask), and an input longer than the model reads is refused with
``context_length_exceeded`` rather than cut, so a client never gets the vector
of text it did not send. So the Hugging Face ``tokenizers`` backend is used
directly, with both turned off; special tokens ([CLS] ... [SEP], an end token)
are added, as the model was trained with them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer

# Model types trained so that a prefix of the vector is itself an embedding
# (Matryoshka representation learning): a smaller ``dimensions`` is allowed.
MATRYOSHKA = frozenset({"qwen3"})
DEFAULT_LENGTH = 512


class Encoder:
    def __init__(self, model_dir: Path, max_context: int | None) -> None:
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        config = json.loads((model_dir / "config.json").read_text())
        config = config.get("text_config", config)
        self.dims = int(config["hidden_size"])
        self.matryoshka = config.get("model_type") in MATRYOSHKA
        self.vocabulary = int(config.get("vocab_size") or self.tokenizer.get_vocab_size())
        self.max_context = max_context or int(
            config.get("max_position_embeddings") or DEFAULT_LENGTH
        )

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts))]
