"""What the daemon asks of a runner, as typed values.

``runner/protocol.py`` describes the wire (one JSON object a line, its kind
in ``op``) and holds ``Generate``, the request to generate, which the API
builds. The daemon's client (``runner/client.py``) writes these with
``line``; the runner (``runner/__main__.py``) reads each back with ``read``
and matches on its type. Like the protocol, no MLX and no trio here.
"""

from __future__ import annotations

import attrs

from runner import protocol
from runner.protocol import Generate


@attrs.frozen
class Load:
    """Load a model (the first command to a runner started without one: a
    spare). ``prefix_cache``: bytes its prefix cache may hold at first;
    ``prefix_dir`` and ``prefix_disk`` (bytes, all models'): its disk tier,
    ``prefix_disk_writes`` bytes all write per hour; ``prompt``: the first
    request's, whose cached prefix is read while the weights load;
    ``cache_limit``: bytes of freed buffers MLX may keep; ``kind``: "chat", or
    "embed" for an embedding model; ``image_features``: bytes a vision
    model's cache of image features may hold."""

    model_dir: str
    max_batch: int = 8
    prefill_chunk: int | None = None
    prefix_cache: int = 0
    prefix_dir: str | None = None
    prefix_disk: int = 0
    prefix_disk_writes: int | None = None
    prompt: list[int] = attrs.field(factory=list)
    cache_limit: int | None = None
    kind: str = "chat"
    image_features: int = 0


@attrs.frozen
class Embed:
    """Embed each input (token ids, special tokens included)."""

    id: int
    inputs: list[list[int]]


@attrs.frozen
class Cancel:
    """Drop a request (its client left); its cache is kept for reuse."""

    id: int


@attrs.frozen
class PrefixLimit:
    """The prefix cache may hold at most ``bytes`` from now on (0 drops it)."""

    bytes: int


@attrs.frozen
class Ping:
    """Answered at once with a ``Pong``, whatever the runner computes."""

    id: int | None = None


@attrs.frozen
class AskStats:
    """Answered between two steps with a ``Stats`` event."""


@attrs.frozen
class Shutdown:
    """Finish nothing more, write the prefixes worth keeping to disk, exit."""


Command = Load | Generate | Embed | Cancel | PrefixLimit | Ping | AskStats | Shutdown
WIRE = protocol.Wire[Command](
    "op",
    "command",
    {
        Load: "load",
        Generate: "generate",
        Embed: "embed",
        Cancel: "cancel",
        PrefixLimit: "prefix_limit",
        Ping: "ping",
        AskStats: "stats",
        Shutdown: "shutdown",
    },
)


line, read = WIRE.line, WIRE.read  # a command as a line of the wire; the command a line holds
