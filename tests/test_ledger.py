"""The memory ledger on its own: what models are charged, and where room
comes from. (``test_policy.py`` covers the decisions made with it.)"""

from __future__ import annotations

import pytest

from scheduler.errors import ModelTooLarge, RequestTooLarge
from scheduler.events import ModelSpec, PrefixLimit, StartRunner, Ticket
from scheduler.ledger import KV_STEP, Ledger, ModelState, State

GB = 10**9
RUNNER = object()


def ready(
    cost: int, *, prefixes: int = 0, used: int = 0, last_used: float = 0.0, **spec: int
) -> ModelState:
    """A loaded model whose prefix cache has ``prefixes`` reserved, ``used`` in use."""
    m = ModelState(ModelSpec(cost=cost, **spec), state=State.READY, runner=RUNNER)  # type: ignore[arg-type]
    m.prefixes, m.prefixes_used, m.last_used = prefixes, used, last_used
    return m


def test_every_model_is_charged_its_bytes_and_prefix_reservation_and_the_spare_its_own() -> None:
    busy = ready(10 * GB, prefixes=2 * GB, kv_per_token=1000)
    busy.running.add(Ticket("busy", prompt=(1,) * 100, max_tokens=156))  # one KV step
    loading = ModelState(ModelSpec(cost=5 * GB), state=State.LOADING, held=5 * GB)
    ledger = Ledger({"busy": busy, "loading": loading}, 40 * GB)
    ledger.spare = GB
    assert busy.charged == 10 * GB + KV_STEP * 1000 + 2 * GB
    assert ledger.used == busy.charged + 5 * GB + GB
    assert ledger.free == 40 * GB - ledger.used
    busy.measured = 20 * GB  # its runner says it holds more than estimated
    assert busy.charged == 22 * GB


def test_room_is_taken_from_unused_reservations_first_then_idle_models_prefixes() -> None:
    old = ready(GB, prefixes=4 * GB, used=3 * GB, last_used=1.0)
    new = ready(GB, prefixes=4 * GB, used=3 * GB, last_used=2.0)
    busy = ready(GB, prefixes=4 * GB, used=4 * GB, last_used=0.0)
    busy.running.add(Ticket("busy"))
    ledger = Ledger({"old": old, "new": new, "busy": busy}, 100 * GB)
    effects, freed = ledger.make_room(2 * GB)  # the unused gigabyte of each idle one
    assert freed == 2 * GB
    assert {(e.model, e.bytes, e.dropped) for e in effects} == {
        ("old", 3 * GB, False),
        ("new", 3 * GB, False),
    }
    # Then cached prefixes, a model's all at once, least recently used first.
    effects, freed = ledger.make_room(GB)
    assert [(e.model, e.bytes, e.dropped) for e in effects] == [("old", 0, True)]
    assert freed == 3 * GB and new.prefixes == 3 * GB
    assert busy.prefixes == 4 * GB  # a busy model's cached prefixes are never taken


def test_free_memory_grows_prefix_caches_most_recent_first_but_not_during_a_load() -> None:
    old = ready(GB, last_used=1.0, prefix_cache=8 * GB)
    new = ready(GB, last_used=2.0, prefix_cache=8 * GB)
    ledger = Ledger({"old": old, "new": new}, 12 * GB)  # 10 GB free
    loading = ModelState(ModelSpec(cost=GB), state=State.LOADING, held=GB)
    ledger.models["loading"] = loading
    assert ledger.grow() == []  # its load may need the memory
    del ledger.models["loading"]
    assert ledger.grow() == [
        PrefixLimit("new", RUNNER, 8 * GB),
        PrefixLimit("old", RUNNER, 2 * GB),
    ]
    assert ledger.free == 0


def test_a_loads_read_ahead_gets_free_memory_up_to_its_prefix_cache() -> None:
    m = ModelState(ModelSpec(cost=GB, prefix_cache=4 * GB), state=State.LOADING, held=GB)
    ledger = Ledger({"m": m}, 10 * GB)
    assert ledger.read_ahead(StartRunner("m", 0, ())).prefixes == 0  # nothing to read
    assert ledger.read_ahead(StartRunner("m", 0, (1, 2, 3))).prefixes == 4 * GB
    assert m.prefixes == 4 * GB


@pytest.mark.parametrize("max_tokens", [10_000, 10**9])
def test_a_request_that_never_fits_says_why_and_what_would(max_tokens: int) -> None:
    m = ModelState(ModelSpec(cost=8 * GB, kv_per_token=10**6))
    ledger = Ledger({"m": m}, 10 * GB)
    ticket = Ticket("m", prompt=(1,) * 1000, max_tokens=max_tokens)
    error = ledger.too_large(ticket, 10 * GB, 0)
    assert isinstance(error, RequestTooLarge)
    fits = 2 * GB // 10**6 // KV_STEP * KV_STEP  # tokens the 2 GB left hold
    assert f"max_tokens {fits - 1000} would fit" in error.message
    huge = Ledger({"m": ModelState(ModelSpec(cost=11 * GB))}, 10 * GB)
    assert isinstance(huge.too_large(Ticket("m"), 10 * GB, 0), ModelTooLarge)
