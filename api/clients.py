"""Which client a request comes from, and at what priority.

A client is a ``[[clients]]`` table of the config: known by its API key, or,
where it has none, by the ``X-Mlxd-Client`` header naming it. With no
clients configured, any name in that header is a client of its own (normal
priority, weight 1), and a request naming none is the anonymous client. A
request may lower its priority (``X-Mlxd-Priority``, or OpenAI's
``service_tier: "flex"``, which is background), never raise it above its
client's. The scheduler's order (``scheduler/order.py``) shares turns by it.
"""

from __future__ import annotations

import attrs
from quart import Request

from api.guard import presented_key
from config.settings import PRIORITIES, ClientConfig, Settings
from scheduler.errors import InvalidRequest
from scheduler.events import NORMAL

CLIENT_HEADER = "X-Mlxd-Client"
PRIORITY_HEADER = "X-Mlxd-Priority"
MAX_NAME = 64
LEVELS = {name: level for level, name in enumerate(PRIORITIES)}


@attrs.frozen
class Client:
    name: str = ""  # "": anonymous
    priority: int = NORMAL  # the scheduler's level (``LEVELS``)
    weight: float = 1.0

    @property
    def who(self) -> tuple[str, int, float]:
        """As the scheduler's lease takes it: name, priority, weight."""
        return self.name, self.priority, self.weight

    def lowered(self, to: str) -> Client:
        """At priority ``to``, unless that is above its own."""
        return attrs.evolve(self, priority=max(self.priority, LEVELS[to]))


class Clients:
    def __init__(self, configured: tuple[ClientConfig, ...]) -> None:
        self._by_name = {c.name: c for c in configured}
        self._by_key = {c.key: c for c in configured if c.key is not None}

    @classmethod
    def from_settings(cls, settings: Settings) -> Clients:
        return cls(settings.clients)

    def identify(self, request: Request) -> Client:
        """The request's client, at the priority it asks for (never above
        its client's); ``InvalidRequest`` for a name or priority mlxd does
        not know."""
        config = self._by_key.get(presented_key(request) or "")
        named = request.headers.get(CLIENT_HEADER)
        if config is not None and named not in (None, config.name):
            raise InvalidRequest(f"{CLIENT_HEADER}: this API key belongs to client {config.name!r}")
        if config is None and named is not None:
            config = self._by_name.get(named)
            if config is None and self._by_name:
                known = ", ".join(sorted(self._by_name))
                raise InvalidRequest(
                    f"{CLIENT_HEADER}: no client {named[:MAX_NAME]!r} is configured "
                    f"(configured: {known})"
                )
            if config is not None and config.key is not None:
                raise InvalidRequest(f"{CLIENT_HEADER}: client {named!r} is known by its key")
        if config is not None:
            client = Client(config.name, LEVELS[config.priority], config.weight)
        else:
            client = Client((named or "")[:MAX_NAME])
        asked = request.headers.get(PRIORITY_HEADER)
        if asked is not None:
            if asked not in PRIORITIES:
                raise InvalidRequest(
                    f"{PRIORITY_HEADER}: expected one of {', '.join(PRIORITIES)}, got {asked!r}"
                )
            client = client.lowered(asked)
        return client
