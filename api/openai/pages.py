"""A page of a list, as OpenAI's list endpoints give one (stored responses'
input items, conversations' items)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from scheduler.errors import InvalidRequest


def page(items: list[dict[str, Any]], args: Mapping[str, str]) -> dict[str, Any]:
    """A page of a list, as OpenAI's list endpoints give it (``limit`` 1-100,
    20 by default; ``order`` "desc", newest first, by default; ``after`` an id)."""
    try:
        limit = int(args.get("limit", 20))
    except ValueError:
        limit = 0
    if not 1 <= limit <= 100:
        raise InvalidRequest("'limit' must be an integer from 1 to 100", param="limit")
    order = args.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequest("'order' must be 'asc' or 'desc'", param="order")
    ordered = items if order == "asc" else items[::-1]
    after = args.get("after")
    if after is not None:
        ids = [item.get("id") for item in ordered]
        if after not in ids:
            raise InvalidRequest(f"'after' names no item of this list: {after!r}", param="after")
        ordered = ordered[ids.index(after) + 1 :]
    return listing(ordered[:limit], has_more=len(ordered) > limit)


def listing(items: list[dict[str, Any]], has_more: bool = False) -> dict[str, Any]:
    """``items`` as OpenAI's list object holds them."""
    return {
        "object": "list",
        "data": items,
        "first_id": items[0]["id"] if items else None,
        "last_id": items[-1]["id"] if items else None,
        "has_more": has_more,
    }
