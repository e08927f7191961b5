"""Work on a request's body: in place when the body is small, in a worker
thread when it is not.

A hop to a thread and back costs more CPU than parsing, validating,
templating and tokenizing a short request (it was about 15% of the daemon's
samples for short chat requests), while a big one (10,000 messages, a JSON
schema of megabytes) must not hold the event loop that every stream shares:
an 8 MB schema's validation took it for seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import trio

T = TypeVar("T")

INLINE_BYTES = 16 * 1024  # a request body up to this is worked on in place


async def off_loop(small: bool, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, in a worker thread unless the request is ``small``."""
    return fn(*args) if small else await trio.to_thread.run_sync(fn, *args)
