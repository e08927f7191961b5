"""Server-sent events, as OpenAI streams them."""

from __future__ import annotations

import json
from typing import Any

DONE = b"data: [DONE]\n\n"


def event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def typed(data: dict[str, Any]) -> bytes:
    """An event of the Responses API stream, named after its ``type``."""
    return f"event: {data['type']}\n".encode() + event(data)
