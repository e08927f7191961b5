"""What a Responses request continues, and what it leaves in the store.

A request may continue a stored response (``previous_response_id``: its
whole conversation comes first, as OpenAI's API does; instructions and tools
are the new request's own) and may refer to stored items by id
(``item_reference``). Both are resolved here, before the model is touched,
so an unknown or evicted id is a 404 that costs nothing. The request's own
input becomes items with ids, as the store keeps them and
``GET /v1/responses/{id}/input_items`` lists them.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from api.store import ResponseStore
from scheduler.errors import InvalidRequest

_PREFIXES = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}


@attrs.frozen
class Turn:
    """One Responses request's place in its conversation."""

    items: Any  # its own input as items with ids (as given if not a list: refused later)
    context: list[dict[str, Any]]  # the conversation it continues (oldest first)
    previous: str | None
    store: bool  # whether the response is kept

    @classmethod
    def read(cls, body: Mapping[str, Any], store: ResponseStore, owner: str) -> Turn:
        keep = body.get("store", True)
        if not isinstance(keep, bool):
            raise InvalidRequest("'store' must be true or false", param="store")
        previous = body.get("previous_response_id")
        if previous is not None and not isinstance(previous, str):
            raise InvalidRequest("'previous_response_id' must be a string", "previous_response_id")
        context = store.conversation(owner, previous) if previous else []
        raw = body.get("input")
        if isinstance(raw, str):
            raw = [{"type": "message", "role": "user", "content": raw}]
        items = raw
        if isinstance(raw, list):
            items = [_resolved(item, store, owner) for item in raw]
        return cls(items, context, previous, keep)

    def keeper(self, store: ResponseStore, owner: str) -> Callable[[dict[str, Any]], None] | None:
        """What keeps the finished response (None if the request said not to)."""
        if not self.store:
            return None
        return lambda response: store.put(owner, response, self.items, self.previous)


def _resolved(item: Any, store: ResponseStore, owner: str) -> Any:
    """An input item as the store keeps it: a reference replaced by the item
    it names, a message's text as content parts, and an id."""
    if not isinstance(item, dict):
        return item  # refused by the input check, with its index
    kind = item.get("type", "message")
    if kind == "item_reference":
        if not isinstance(item.get("id"), str):
            raise InvalidRequest("an item_reference needs an 'id'", param="input")
        return store.item(owner, item["id"])
    item = {"type": kind, **item}
    if kind == "message" and isinstance(item.get("content"), str):
        part = "output_text" if item.get("role") == "assistant" else "input_text"
        item["content"] = [{"type": part, "text": item["content"]}]
    if not isinstance(item.get("id"), str):
        item["id"] = f"{_PREFIXES.get(kind, 'item')}_{uuid.uuid4().hex}"
    return item
