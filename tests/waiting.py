"""Waiting in tests: poll until something holds, and fail saying what never did.

A fixed sleep is a guess at how long something takes; on a loaded machine the
guess is wrong and the test flakes, and on an idle one it wastes the time.
``eventually`` polls instead, up to a deadline far beyond any honest wait, so a
slow machine only makes a test slower, never red.

A check is "not yet" while it returns something falsy or raises
``AssertionError``; anything else it raises ends the wait at once (a daemon
that exited will not start answering). On the deadline the failure names what
was awaited and the last "not yet" (the assertion's message, or the value).

``eventually_blocking`` is the same for the few tests that drive a daemon
process from plain (not trio) code.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar, overload

import pytest
import trio

T = TypeVar("T")

TIMEOUT_S = 120.0  # far beyond any honest wait: a model loads in seconds, even on a busy CPU
INTERVAL_S = 0.05


def _give_up(what: str, timeout_s: float, last: str) -> NoReturn:
    pytest.fail(f"gave up after {timeout_s:g} s waiting for {what}; last: {last}")


@overload
async def eventually(
    check: Callable[[], Awaitable[T | None]],
    *,
    what: str,
    timeout_s: float = ...,
    interval: float = ...,
) -> T: ...


@overload
async def eventually(
    check: Callable[[], T | None],
    *,
    what: str,
    timeout_s: float = ...,
    interval: float = ...,
) -> T: ...


async def eventually(
    check: Callable[[], Any],
    *,
    what: str,
    timeout_s: float = TIMEOUT_S,
    interval: float = INTERVAL_S,
) -> Any:
    """Call ``check`` (a function, or an async one) until it returns something
    truthy, and return that."""
    last = "never checked"
    with trio.move_on_after(timeout_s):
        while True:
            try:
                result = check()
                if inspect.isawaitable(result):
                    result = await result
            except AssertionError as e:
                last = f"AssertionError: {e}"
            else:
                if result:
                    return result
                last = repr(result)
            await trio.sleep(interval)
    _give_up(what, timeout_s, last)


def eventually_blocking(
    check: Callable[[], T | None],
    *,
    what: str,
    timeout_s: float = TIMEOUT_S,
    interval: float = INTERVAL_S,
) -> T:
    """``eventually`` for code outside trio: ``check`` may block."""
    last = "never checked"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = check()
        except AssertionError as e:
            last = f"AssertionError: {e}"
        else:
            if result:
                return result
            last = repr(result)
        if time.monotonic() >= deadline:
            _give_up(what, timeout_s, last)
        time.sleep(interval)
