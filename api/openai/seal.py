"""Reasoning that a client keeps for mlxd: ``encrypted_content``.

A Responses client that stores nothing on the server (``store: false``, as
Codex runs) asks for ``include: ["reasoning.encrypted_content"]`` and sends
each reasoning item back on the next turn, so that the model sees its own
reasoning again where its template writes it (Qwen3's writes the reasoning
of a tool loop's turns back; the prompt then repeats what the model
generated, and the prefix cache reuses those tokens). The text is sealed
with a key of the daemon's (Fernet, from ``cryptography``: AES with an
HMAC), so a client can neither read it nor slip text into the prompt as the
model's own: a blob that does not open (forged, damaged, or sealed by
another daemon) is ignored.

The key lives in ``<cache_dir>/reasoning.key`` (made on first use, readable
by its owner only), so sealed reasoning outlives a restart; where that file
cannot be kept, a key for this run only.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

log = logging.getLogger("mlxd.api")


class Sealer:
    def __init__(self, key: bytes) -> None:
        self._fernet = Fernet(key)

    @classmethod
    def in_dir(cls, cache_dir: Path) -> Sealer:
        path = cache_dir / "reasoning.key"
        try:
            return cls(path.read_bytes().strip())
        except (OSError, ValueError):
            pass
        key = Fernet.generate_key()
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(key)
            os.replace(tmp, path)
        except OSError as e:
            log.warning("cannot keep a reasoning key in %s (%s): one for this run only", path, e)
        return cls(key)

    def seal(self, reasoning: str) -> str:
        return self._fernet.encrypt(json.dumps({"reasoning": reasoning}).encode()).decode()

    def open(self, blob: object) -> str | None:
        """The reasoning sealed in ``blob``; None if it was not sealed here."""
        if not isinstance(blob, str):
            return None
        try:
            data = json.loads(self._fernet.decrypt(blob.encode()))
        except (InvalidToken, ValueError):
            log.info("ignoring an encrypted_content this daemon did not seal")
            return None
        reasoning = data.get("reasoning") if isinstance(data, dict) else None
        return reasoning if isinstance(reasoning, str) else None
