"""The pool's decisions, called directly: no trio, no processes, time passed in."""

from collections.abc import Sequence

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from scheduler import events as pe
from scheduler import policy as p
from scheduler.errors import (
    ModelLoadFailed,
    ModelNotFound,
    ModelTooLarge,
    QueueFull,
    QueueTimeout,
    RequestTooLarge,
    ShuttingDown,
)
from scheduler.ledger import KV_STEP

RUNNER = object()
GB = 10**9


def policy(budget: int = 100 * GB, max_turn_s: float = 10.0, **specs: pe.ModelSpec) -> p.Policy:
    return p.Policy(specs, budget, max_turn_s)


def spec(cost: int = 10 * GB, **kw: float | int | bool) -> pe.ModelSpec:
    return pe.ModelSpec(cost=cost, **kw)  # type: ignore[arg-type]


def tickets(model: str, n: int) -> list[pe.Ticket]:
    return [pe.Ticket(model) for _ in range(n)]


def submit_all(pol: p.Policy, ts: list[pe.Ticket], now: float = 0.0) -> list[pe.Effect]:
    return [e for t in ts for e in pol.handle(pe.Submitted(t, now))]


def serve_once(pol: p.Policy, model: str, now: float) -> None:
    """Load ``model`` (it must fit), run one request on it and finish it."""
    (t,) = tickets(model, 1)
    assert pol.handle(pe.Submitted(t, now)) == [pe.StartRunner(model)]
    assert pol.handle(pe.Loaded(model, RUNNER, now)) == [pe.Grant(t, RUNNER)]
    pol.handle(pe.Released(t, now))


def rejected(effects: list[pe.Effect]) -> list[pe.Reject]:
    return [e for e in effects if isinstance(e, pe.Reject)]


def one_reject(effects: list[pe.Effect]) -> pe.Reject:
    """The one effect, a ``Reject``."""
    (effect,) = effects
    assert isinstance(effect, pe.Reject), effect
    return effect


# -- one model ----------------------------------------------------------------


def test_ten_first_requests_start_one_load() -> None:
    pol = policy(a=spec(max_concurrency=4))
    assert submit_all(pol, tickets("a", 10)) == [pe.StartRunner("a")]


def test_grants_up_to_max_concurrency_then_one_per_release() -> None:
    pol = policy(a=spec(max_concurrency=2))
    ts = tickets("a", 3)
    submit_all(pol, ts)
    assert pol.handle(pe.Loaded("a", RUNNER)) == [pe.Grant(ts[0], RUNNER), pe.Grant(ts[1], RUNNER)]
    assert pol.handle(pe.Released(ts[0])) == [pe.Grant(ts[2], RUNNER)]
    assert pol.handle(pe.Released(ts[1])) == []


class Newest:
    """An order that serves the newest request first: not one mlxd uses, but
    it shows every grant and load asks the order."""

    def first(self, queue: Sequence[pe.Ticket], now: float) -> pe.Ticket:
        return max(queue, key=lambda t: (t.since, t.id))

    def rank(self, ticket: pe.Ticket, now: float) -> tuple[float, ...]:
        return -ticket.since, -ticket.id

    def granted(self, ticket: pe.Ticket) -> None:
        pass


def test_the_order_hook_chooses_who_is_granted_and_loaded_next() -> None:
    pol = p.Policy({"a": spec(max_concurrency=1), "b": spec()}, 15 * GB, order=Newest())
    ts = tickets("a", 3)
    for i, t in enumerate(ts):
        pol.handle(pe.Submitted(t, float(i)))
    assert pol.handle(pe.Loaded("a", RUNNER, 3.0)) == [pe.Grant(ts[2], RUNNER)]
    assert pol.handle(pe.Released(ts[2], 4.0)) == [pe.Grant(ts[1], RUNNER)]
    # Across models too: with room for one model, c's newer request loads
    # it before b's older one, once a is done and goes.
    pol = p.Policy({m: spec() for m in "abc"}, 15 * GB, order=Newest())
    serve_once(pol, "a", 0.0)
    (busy,) = tickets("a", 1)
    pol.handle(pe.Submitted(busy, 1.0))  # a is busy: nothing can go
    (older,), (newer,) = tickets("b", 1), tickets("c", 1)
    assert pol.handle(pe.Submitted(older, 2.0)) == []
    assert pol.handle(pe.Submitted(newer, 3.0)) == []
    assert pol.handle(pe.Released(busy, 4.0)) == [pe.StopRunner("a", RUNNER, "memory")]
    assert pol.handle(pe.RunnerExited("a", 5.0)) == [pe.StartRunner("c")]


def test_resident_model_grants_at_once() -> None:
    pol = policy(a=spec())
    serve_once(pol, "a", 0)
    (u,) = tickets("a", 1)
    assert pol.handle(pe.Submitted(u, 1)) == [pe.Grant(u, RUNNER)]


def test_withdrawn_ticket_leaves_queue_and_is_never_granted() -> None:
    pol = policy(a=spec(max_concurrency=1))
    ts = tickets("a", 3)
    submit_all(pol, ts)
    pol.handle(pe.Withdrawn(ts[1]))
    pol.handle(pe.Loaded("a", RUNNER))
    assert pol.handle(pe.Released(ts[0])) == [pe.Grant(ts[2], RUNNER)]


def test_withdrawn_before_load_never_causes_one() -> None:
    pol = policy(b=spec(cost=80 * GB), a=spec(cost=80 * GB))
    serve_once(pol, "b", 0)
    (t,) = tickets("a", 1)
    effects = pol.handle(pe.Submitted(t, 1))  # b is idle: evicted to make room
    assert effects == [pe.StopRunner("b", RUNNER, "memory")]
    pol.handle(pe.Withdrawn(t, 2))  # the client hangs up while b stops
    assert pol.handle(pe.RunnerExited("b", 3)) == []  # nothing loads for nobody


def test_withdrawn_after_grant_frees_the_slot() -> None:
    pol = policy(a=spec(max_concurrency=1))
    ts = tickets("a", 2)
    submit_all(pol, ts)
    pol.handle(pe.Loaded("a", RUNNER))
    assert pol.handle(pe.Withdrawn(ts[0])) == [pe.Grant(ts[1], RUNNER)]


def test_a_failed_load_rejects_its_waiters_and_is_not_retried_for_a_growing_while() -> None:
    pol = policy(a=spec())
    ts = tickets("a", 2)
    submit_all(pol, ts)
    err = ModelLoadFailed("broken weights")
    assert pol.handle(pe.LoadFailed("a", err)) == [pe.Reject(ts[0], err), pe.Reject(ts[1], err)]
    assert pol.used == 0
    (t,) = tickets("a", 1)
    reject = one_reject(pol.handle(pe.Submitted(t, 3)))  # at once, without a load
    assert isinstance(reject.error, ModelLoadFailed)
    assert "broken weights" in reject.error.message and "again in 2 s" in reject.error.message
    (t,) = tickets("a", 1)
    assert pol.handle(pe.Submitted(t, 5)) == [pe.StartRunner("a")]  # 5 s on: tried again
    pol.handle(pe.LoadFailed("a", err, 6))
    (t,) = tickets("a", 1)
    assert rejected(pol.handle(pe.Submitted(t, 15)))  # 10 s after a second failure
    (t,) = tickets("a", 1)
    assert pol.handle(pe.Submitted(t, 16)) == [pe.StartRunner("a")]
    pol.handle(pe.Loaded("a", RUNNER, 17))
    pol.handle(pe.Released(t, 18))
    pol.handle(pe.Tick(10_000))  # expired
    pol.handle(pe.RunnerExited("a", 10_000))
    (t,) = tickets("a", 1)
    assert pol.handle(pe.Submitted(t, 10_001)) == [pe.StartRunner("a")]
    pol.handle(pe.LoadFailed("a", err, 10_002))  # a first failure again: the success reset them
    (t,) = tickets("a", 1)
    assert pol.handle(pe.Submitted(t, 10_008)) == [pe.StartRunner("a")]


def test_retry_after_estimates_the_wait_from_the_queue() -> None:
    pol = policy(a=spec(max_concurrency=2, queue_limit=4))
    first = tickets("a", 2)
    submit_all(pol, first)
    pol.handle(pe.Loaded("a", RUNNER, 0))
    for t in first:
        pol.handle(pe.Released(t, 30))  # requests hold a slot 30 s
    submit_all(pol, tickets("a", 6), now=31)  # 2 running, 4 waiting: full
    reject = one_reject(pol.handle(pe.Submitted(pe.Ticket("a"), 32)))
    assert isinstance(reject.error, QueueFull)
    assert reject.error.retry_after_s == 75  # 5 ahead, two at a time, 30 s each


def test_runner_exit_frees_its_bytes_and_reloads_only_if_requests_wait() -> None:
    pol = policy(a=spec(max_concurrency=1))
    ts = tickets("a", 2)
    submit_all(pol, ts)
    pol.handle(pe.Loaded("a", RUNNER))
    assert pol.handle(pe.RunnerExited("a")) == [pe.StartRunner("a")]  # ts[1] still waits
    quiet = policy(a=spec())
    serve_once(quiet, "a", 0)
    assert quiet.used == 10 * GB
    assert quiet.handle(pe.RunnerExited("a", 1)) == []
    assert quiet.models["a"].state is p.State.ABSENT
    assert quiet.used == 0


# -- queues ---------------------------------------------------------------------


def test_one_more_than_running_plus_queue_limit_is_refused() -> None:
    pol = policy(a=spec(max_concurrency=1, queue_limit=2))
    ts = tickets("a", 3)
    submit_all(pol, ts)
    pol.handle(pe.Loaded("a", RUNNER))  # one runs, two wait
    (extra,) = tickets("a", 1)
    (reject,) = rejected(pol.handle(pe.Submitted(extra)))
    assert isinstance(reject.error, QueueFull)
    assert "1 requests running and 2 waiting" in reject.error.message
    pol.handle(pe.Released(ts[0]))  # room again
    (late,) = tickets("a", 1)
    assert pol.handle(pe.Submitted(late)) == []


def test_a_request_that_waits_past_its_queue_timeout_is_rejected() -> None:
    pol = policy(a=spec(max_concurrency=1, queue_timeout_s=5))
    ts = tickets("a", 2)
    submit_all(pol, ts, now=0)
    pol.handle(pe.Loaded("a", RUNNER, 1))
    assert pol.next_deadline() == 5
    assert pol.handle(pe.Tick(4.9)) == []
    reject = one_reject(pol.handle(pe.Tick(5)))
    assert reject.ticket is ts[1] and isinstance(reject.error, QueueTimeout)
    assert "queue timeout 5 s" in reject.error.message


# -- memory ---------------------------------------------------------------------


def test_a_model_that_cannot_fit_alone_is_refused_naming_the_bytes() -> None:
    pol = policy(budget=100 * GB, big=spec(cost=150 * GB))
    (t,) = tickets("big", 1)
    reject = one_reject(pol.handle(pe.Submitted(t)))
    assert isinstance(reject.error, ModelTooLarge)
    assert str(150 * GB) in reject.error.message and str(100 * GB) in reject.error.message
    assert pol.used == 0


def test_pinned_models_count_against_what_another_model_can_ever_have() -> None:
    pol = policy(budget=100 * GB, pin=spec(cost=40 * GB, pinned=True), b=spec(cost=70 * GB))
    serve_once(pol, "pin", 0)
    (t,) = tickets("b", 1)
    reject = one_reject(pol.handle(pe.Submitted(t, 1)))
    assert isinstance(reject.error, ModelTooLarge)
    assert "pinned" in reject.error.message


def test_a_load_evicts_the_least_recently_used_idle_model_and_waits_for_its_exit() -> None:
    pol = policy(budget=100 * GB, a=spec(cost=40 * GB), b=spec(cost=40 * GB), c=spec(cost=40 * GB))
    serve_once(pol, "a", 1)
    serve_once(pol, "b", 2)
    (t,) = tickets("c", 1)
    assert pol.handle(pe.Submitted(t, 3)) == [pe.StopRunner("a", RUNNER, "memory")]
    assert pol.used == 80 * GB  # a's bytes stay charged until its process is gone
    assert pol.handle(pe.RunnerExited("a", 4)) == [pe.StartRunner("c")]
    assert pol.used == 80 * GB <= pol.budget


def test_ties_in_last_use_evict_the_shorter_keep_alive_first() -> None:
    pol = policy(
        budget=100 * GB,
        long=spec(cost=40 * GB, keep_alive_s=3600),
        short=spec(cost=40 * GB, keep_alive_s=60),
        c=spec(cost=40 * GB),
    )
    serve_once(pol, "long", 1)
    serve_once(pol, "short", 1)
    (t,) = tickets("c", 1)
    assert pol.handle(pe.Submitted(t, 2)) == [pe.StopRunner("short", RUNNER, "memory")]


def test_pinned_and_busy_models_are_never_evicted_and_a_swap_waits_for_requests() -> None:
    pol = policy(
        budget=100 * GB,
        pin=spec(cost=40 * GB, pinned=True),
        a=spec(cost=40 * GB),
        b=spec(cost=40 * GB),
    )
    serve_once(pol, "pin", 0)
    (busy,) = tickets("a", 1)
    pol.handle(pe.Submitted(busy, 1))
    pol.handle(pe.Loaded("a", RUNNER, 1))  # a is running a request
    (t,) = tickets("b", 1)
    assert pol.handle(pe.Submitted(t, 2)) == []  # nothing can go: b waits
    assert pol.handle(pe.Released(busy, 3)) == [pe.StopRunner("a", RUNNER, "memory")]
    assert pol.handle(pe.RunnerExited("a", 4)) == [pe.StartRunner("b")]


def test_requests_to_a_resident_model_are_served_while_another_loads() -> None:
    pol = policy(a=spec(), b=spec())
    serve_once(pol, "a", 0)
    (b,) = tickets("b", 1)
    assert pol.handle(pe.Submitted(b, 1)) == [pe.StartRunner("b")]
    (a,) = tickets("a", 1)
    assert pol.handle(pe.Submitted(a, 2)) == [pe.Grant(a, RUNNER)]  # b is still loading


def test_measured_bytes_replace_a_smaller_estimate_and_overflow_evicts_idle_models() -> None:
    pol = policy(budget=100 * GB, a=spec(cost=40 * GB), b=spec(cost=40 * GB))
    serve_once(pol, "a", 1)
    serve_once(pol, "b", 2)
    assert pol.handle(pe.Measured("a", 30 * GB, 3)) == []
    assert pol.models["a"].bytes == 40 * GB  # never below the reservation
    assert pol.handle(pe.Measured("b", 70 * GB, 4)) == [pe.StopRunner("a", RUNNER, "memory")]


def test_sized_updates_the_estimate_before_a_first_load() -> None:
    pol = policy(budget=100 * GB, a=spec(cost=0))
    pol.handle(pe.Sized("a", 120 * GB))
    (t,) = tickets("a", 1)
    reject = one_reject(pol.handle(pe.Submitted(t)))
    assert isinstance(reject.error, ModelTooLarge)


# -- prefix caches ---------------------------------------------------------------


def loaded_with_prefixes(pol: p.Policy, model: str, used: int, now: float = 0.0) -> pe.Ticket:
    """Load ``model`` and have its runner report ``used`` bytes of cached
    prefixes; returns its ticket, still running."""
    (t,) = tickets(model, 1)
    assert pol.handle(pe.Submitted(t, now)) == [pe.StartRunner(model)]
    pol.handle(pe.Loaded(model, RUNNER, now))
    m = pol.models[model]
    pol.handle(pe.Measured(model, m.cost + used, used, now))
    return t


def test_a_loaded_model_reserves_free_memory_for_its_prefixes_up_to_its_limit() -> None:
    pol = policy(budget=100 * GB, a=spec(prefix_cache=30 * GB), b=spec(prefix_cache=80 * GB))
    (t,) = tickets("a", 1)
    pol.handle(pe.Submitted(t))
    assert pol.handle(pe.Loaded("a", RUNNER)) == [
        pe.Grant(t, RUNNER),
        pe.PrefixLimit("a", RUNNER, 30 * GB),
    ]
    (u,) = tickets("b", 1)
    pol.handle(pe.Submitted(u))
    assert pol.handle(pe.Loaded("b", RUNNER)) == [
        pe.Grant(u, RUNNER),
        pe.PrefixLimit("b", RUNNER, 50 * GB),  # what the budget has left
    ]
    assert pol.used == 100 * GB


def test_a_load_takes_back_prefix_reservations_that_are_not_used_first() -> None:
    pol = policy(budget=100 * GB, a=spec(40 * GB, prefix_cache=60 * GB), b=spec(40 * GB))
    loaded_with_prefixes(pol, "a", used=10 * GB)  # still running
    (t,) = tickets("b", 1)
    assert pol.handle(pe.Submitted(t)) == [
        pe.PrefixLimit("a", RUNNER, 10 * GB),  # what it holds, nothing dropped
        pe.StartRunner("b"),
    ]
    assert pol.used == 90 * GB


def test_memory_pressure_drops_idle_models_prefixes_before_evicting_any_model() -> None:
    pol = policy(budget=100 * GB, a=spec(40 * GB, prefix_cache=60 * GB), b=spec(50 * GB))
    t = loaded_with_prefixes(pol, "a", used=40 * GB)
    pol.handle(pe.Released(t, 1))
    (u,) = tickets("b", 1)
    assert pol.handle(pe.Submitted(u, 2)) == [
        pe.PrefixLimit("a", RUNNER, 0, dropped=True),
        pe.StartRunner("b"),
    ]
    assert pol.models["a"].state is p.State.READY  # still resident


def test_a_busy_models_prefixes_are_kept_while_it_runs() -> None:
    pol = policy(budget=100 * GB, a=spec(40 * GB, prefix_cache=60 * GB), b=spec(50 * GB))
    t = loaded_with_prefixes(pol, "a", used=40 * GB)
    (u,) = tickets("b", 1)
    assert pol.handle(pe.Submitted(u, 1)) == [pe.PrefixLimit("a", RUNNER, 40 * GB)]
    assert pol.handle(pe.Released(t, 2)) == [
        pe.PrefixLimit("a", RUNNER, 0, dropped=True),
        pe.StartRunner("b"),
    ]


def test_a_model_that_must_go_anyway_keeps_its_prefixes_for_the_disk() -> None:
    pol = policy(budget=100 * GB, a=spec(40 * GB, prefix_cache=60 * GB), b=spec(80 * GB))
    t = loaded_with_prefixes(pol, "a", used=30 * GB)
    pol.handle(pe.Released(t, 1))
    (u,) = tickets("b", 1)
    effects = pol.handle(pe.Submitted(u, 2))
    # Its unused reservation goes at once; its cached prefixes leave with it.
    assert effects == [pe.PrefixLimit("a", RUNNER, 30 * GB), pe.StopRunner("a", RUNNER, "memory")]
    assert pol.handle(pe.Measured("a", 25 * GB, 0, 3)) == []  # freed its weights, writing
    assert pol.models["a"].bytes == 25 * GB and pol.models["a"].prefixes == 0
    assert pol.handle(pe.RunnerExited("a", 4)) == [pe.StartRunner("b")]


def test_a_load_for_a_prompt_gets_free_memory_to_read_its_cached_prefix_ahead() -> None:
    pol = policy(budget=100 * GB, a=spec(40 * GB, prefix_cache=30 * GB), b=spec(40 * GB))
    t = pe.Ticket("a", prompt=(1, 2, 3))
    assert pol.handle(pe.Submitted(t)) == [pe.StartRunner("a", 30 * GB, (1, 2, 3))]
    assert pol.used == 70 * GB  # charged from the start: the budget holds
    # It read 12 GB ahead; the rest of the reservation stays its own.
    pol.handle(pe.Loaded("a", RUNNER, 1, 12 * GB))
    pol.handle(pe.Measured("a", 52 * GB, 12 * GB, 1))
    assert (pol.models["a"].bytes, pol.models["a"].prefixes) == (40 * GB, 30 * GB)


def test_a_load_without_a_prompt_or_with_others_waiting_reads_nothing_ahead() -> None:
    pol = policy(budget=100 * GB, a=spec(40 * GB, prefix_cache=30 * GB))
    assert pol.handle(pe.Submitted(pe.Ticket("a"))) == [pe.StartRunner("a")]  # ``mlxd load``
    pol = policy(
        budget=100 * GB,
        x=spec(90 * GB),
        a=spec(40 * GB, prefix_cache=30 * GB),
        c=spec(50 * GB, prefix_cache=30 * GB),
        d=spec(30 * GB),
    )
    (tx,) = tickets("x", 1)
    pol.handle(pe.Submitted(tx))
    pol.handle(pe.Loaded("x", RUNNER))
    waiting = [
        pe.Ticket("a", prompt=(1,)),
        pe.Ticket("c", prompt=(2,)),
        pe.Ticket("d", prompt=(3,)),
    ]
    assert submit_all(pol, waiting, 1) == []  # "x" is busy
    assert pol.handle(pe.Released(tx, 2)) == [pe.StopRunner("x", RUNNER, "memory")]
    # "d" still waits for memory after "a" and "c" start: they take none for prefixes.
    assert pol.handle(pe.RunnerExited("x", 3)) == [
        pe.StartRunner("a", 0, (1,)),
        pe.StartRunner("c", 0, (2,)),
    ]


def test_a_later_load_waits_for_a_loading_models_reservation_rather_than_evict() -> None:
    pol = policy(
        budget=100 * GB, a=spec(40 * GB, prefix_cache=60 * GB), b=spec(20 * GB), c=spec(30 * GB)
    )
    serve_once(pol, "c", 0)  # idle, evictable
    t = pe.Ticket("a", prompt=(1,))
    assert pol.handle(pe.Submitted(t, 1)) == [pe.StartRunner("a", 30 * GB, (1,))]
    (u,) = tickets("b", 1)
    assert pol.handle(pe.Submitted(u, 2)) == []  # "c" stays
    # It read 10 GB of cached prefixes: the rest of its reservation goes to "b".
    assert pol.handle(pe.Loaded("a", RUNNER, 3, 10 * GB)) == [
        pe.Grant(t, RUNNER),
        pe.PrefixLimit("a", RUNNER, 10 * GB),
        pe.StartRunner("b"),
    ]
    assert pol.models["c"].state is p.State.READY


def test_a_busy_model_outgrowing_its_charge_takes_back_a_loads_read_ahead() -> None:
    """A model measured above its estimate while another load's read-ahead
    has all the free memory: the read-ahead gives way, so the charges stay
    within the budget, and the loaded runner trims what it read beyond it."""
    pol = policy(budget=100 * GB, a=spec(40 * GB), b=spec(40 * GB, prefix_cache=30 * GB))
    (t,) = tickets("a", 1)
    pol.handle(pe.Submitted(t))
    pol.handle(pe.Loaded("a", RUNNER))
    u = pe.Ticket("b", prompt=(1, 2))
    assert pol.handle(pe.Submitted(u, 1)) == [pe.StartRunner("b", 20 * GB, (1, 2))]
    assert pol.used == 100 * GB
    assert pol.handle(pe.Measured("a", 43 * GB, 0, 2)) == []  # 3 GB over its estimate
    assert pol.used == 100 * GB and pol.models["b"].prefixes == 17 * GB
    assert pol.handle(pe.Loaded("b", RUNNER, 3, 19 * GB)) == [
        pe.PrefixLimit("b", RUNNER, 17 * GB, dropped=True),
        pe.Grant(u, RUNNER),
    ]
    assert pol.used == 100 * GB


# -- keep-alive and unload ------------------------------------------------------


def test_idle_model_is_unloaded_when_its_keep_alive_runs_out() -> None:
    pol = policy(a=spec(keep_alive_s=60))
    serve_once(pol, "a", 10)
    assert pol.next_deadline() == 70
    assert pol.handle(pe.Tick(69)) == []
    assert pol.handle(pe.Tick(70)) == [pe.StopRunner("a", RUNNER, "expired")]


def test_a_request_keep_alive_overrides_the_model_and_zero_unloads_when_idle() -> None:
    pol = policy(a=spec(keep_alive_s=60))
    serve_once(pol, "a", 0)
    t = pe.Ticket("a", keep_alive_s=0)
    assert pol.handle(pe.Submitted(t, 1)) == [pe.Grant(t, RUNNER)]
    assert pol.handle(pe.Released(t, 2)) == [pe.StopRunner("a", RUNNER, "idle")]
    forever = policy(a=spec(keep_alive_s=60))
    serve_once(forever, "a", 0)
    u = pe.Ticket("a", keep_alive_s=pe.FOREVER)
    forever.handle(pe.Submitted(u, 1))
    forever.handle(pe.Released(u, 2))
    assert forever.next_deadline() == pe.FOREVER


def test_pinned_model_never_expires() -> None:
    pol = policy(a=spec(keep_alive_s=0, pinned=True))
    serve_once(pol, "a", 0)
    assert pol.next_deadline() == pe.FOREVER
    assert pol.handle(pe.Tick(10**6)) == []


def test_a_model_pinned_at_run_time_stays_until_unpinned() -> None:
    pol = policy(budget=20 * GB, a=spec(keep_alive_s=60), b=spec(15 * GB))
    serve_once(pol, "a", 0)
    assert pol.handle(pe.Pin("a", True, 1)) == []
    assert pol.handle(pe.Tick(1000)) == []  # past its keep-alive
    assert pol.next_deadline() == pe.FOREVER
    refused = one_reject(pol.handle(pe.Submitted(pe.Ticket("b"), 1001)))
    assert isinstance(refused.error, ModelTooLarge)
    assert "held by pinned models" in refused.error.message
    assert pol.handle(pe.Pin("a", False, 1002)) == [pe.StopRunner("a", RUNNER, "expired")]


def test_unloading_a_pinned_model_unpins_it() -> None:
    pol = policy(a=spec(pinned=True))
    serve_once(pol, "a", 0)
    assert pol.handle(pe.Unload("a", 1)) == [pe.StopRunner("a", RUNNER, "manual")]
    pol.handle(pe.RunnerExited("a", 2))
    serve_once(pol, "a", 3)  # loaded again: expires by its keep-alive now
    assert pol.next_deadline() == 3 + pol.models["a"].spec.keep_alive_s


def test_unload_waits_for_running_requests() -> None:
    pol = policy(a=spec())
    (t,) = tickets("a", 1)
    pol.handle(pe.Submitted(t))
    pol.handle(pe.Loaded("a", RUNNER))
    assert pol.handle(pe.Unload("a", 1)) == []
    assert pol.handle(pe.Released(t, 2)) == [pe.StopRunner("a", RUNNER, "manual")]


# -- taking turns -----------------------------------------------------------------


def loads(effects: list[pe.Effect]) -> list[str]:
    return [e.model for e in effects if isinstance(e, pe.StartRunner)]


def test_waiting_requests_are_served_together_not_a_b_a_b() -> None:
    pol = policy(budget=10 * GB, a=spec(max_concurrency=4), b=spec(max_concurrency=4))
    effects: list[pe.Effect] = []
    for i in range(3):  # interleaved arrivals: a, b, a, b, a, b
        effects += submit_all(pol, tickets("a", 1), now=i)
        effects += submit_all(pol, tickets("b", 1), now=i)
    effects += pol.handle(pe.Loaded("a", RUNNER, 3))
    grants_a = [e.ticket for e in effects if isinstance(e, pe.Grant)]
    assert len(grants_a) == 3  # all of a's waiting requests at once
    for t in grants_a:
        effects += pol.handle(pe.Released(t, 4))
    effects += pol.handle(pe.RunnerExited("a", 5))
    effects += pol.handle(pe.Loaded("b", RUNNER, 6))
    assert loads(effects) == ["a", "b"]  # two loads for six requests
    assert sum(isinstance(e, pe.Grant) for e in effects) == 6


def test_a_busy_model_drains_after_max_turn_so_a_waiting_model_gets_its_turn() -> None:
    pol = policy(budget=10 * GB, max_turn_s=10, a=spec(max_concurrency=2), b=spec())
    (first,) = tickets("a", 1)
    pol.handle(pe.Submitted(first, 0))
    pol.handle(pe.Loaded("a", RUNNER, 0))
    (wb,) = tickets("b", 1)
    assert pol.handle(pe.Submitted(wb, 1)) == []  # a is busy: b waits
    assert pol.next_deadline() == 11
    (more,) = tickets("a", 1)
    assert pol.handle(pe.Submitted(more, 5)) == [pe.Grant(more, RUNNER)]  # within b's wait bound
    pol.handle(pe.Released(more, 6))
    assert pol.handle(pe.Tick(11)) == []  # a now drains
    (late,) = tickets("a", 1)
    assert pol.handle(pe.Submitted(late, 12)) == []  # not granted: a is draining
    assert pol.handle(pe.Released(first, 13)) == [pe.StopRunner("a", RUNNER, "memory")]
    assert pol.handle(pe.RunnerExited("a", 14)) == [pe.StartRunner("b")]
    assert pol.handle(pe.Loaded("b", RUNNER, 15)) == [pe.Grant(wb, RUNNER)]
    # a's waiting request has its turn next.
    assert pol.handle(pe.Released(wb, 16)) == [pe.StopRunner("b", RUNNER, "memory")]
    assert pol.handle(pe.RunnerExited("b", 17)) == [pe.StartRunner("a")]


# -- shutdown -----------------------------------------------------------------------


def test_shutdown_rejects_waiters_stops_runners_and_refuses_new() -> None:
    pol = policy(a=spec(max_concurrency=1), b=spec())
    ts = tickets("a", 2)
    submit_all(pol, ts)
    pol.handle(pe.Loaded("a", RUNNER))
    (b,) = tickets("b", 1)
    pol.handle(pe.Submitted(b))  # b is loading
    effects = pol.handle(pe.Shutdown())
    assert pe.StopRunner("a", RUNNER, "shutdown") in effects
    assert [e.ticket for e in rejected(effects)] == [ts[1], b]
    assert all(isinstance(e.error, ShuttingDown) for e in rejected(effects))
    (late,) = tickets("a", 1)
    assert isinstance(pol.handle(pe.Submitted(late))[0], pe.Reject)
    # b finishes loading during shutdown: it is stopped at once.
    assert pol.handle(pe.Loaded("b", RUNNER)) == [pe.StopRunner("b", RUNNER, "shutdown")]
    assert not pol.finished
    pol.handle(pe.RunnerExited("a"))
    pol.handle(pe.RunnerExited("b"))
    assert pol.finished


# -- a new config (SIGHUP) ------------------------------------------------------


def test_reconfigure_adds_and_forgets_models_after_their_requests() -> None:
    pol = policy(a=spec(keep_alive_s=600, max_concurrency=1), b=spec(keep_alive_s=600))
    (t,) = tickets("a", 1)
    pol.handle(pe.Submitted(t, 0))
    pol.handle(pe.Loaded("a", RUNNER, 0))  # t is running on a
    (q,) = tickets("a", 1)
    effects = pol.handle(pe.Reconfigure({"b": spec(), "c": spec()}, now=1))
    assert effects == [] and set(pol.models) == {"a", "b", "c"}
    assert pol.handle(pe.Submitted(q, 2)) == []  # queued before the reload: still served
    assert pol.handle(pe.Released(t, 3)) == [pe.Grant(q, RUNNER)]
    assert pol.handle(pe.Released(q, 4)) == [pe.StopRunner("a", RUNNER, "manual")]
    pol.handle(pe.RunnerExited("a", 5))
    assert set(pol.models) == {"b", "c"}
    assert pol.handle(pe.Measured("a", GB, 6)) == []  # late news of a is ignored
    # A request that named "a" before the reload gets a 404, not a crash.
    (late,) = tickets("a", 1)
    reject = one_reject(pol.handle(pe.Submitted(late, 7)))
    assert isinstance(reject.error, ModelNotFound) and "removed" in reject.error.message


def test_reconfigure_refuses_what_waits_for_a_removed_absent_model() -> None:
    pol = policy(a=spec(cost=80 * GB), b=spec(cost=80 * GB))
    (t,) = tickets("b", 1)
    pol.handle(pe.Submitted(t, 0))
    pol.handle(pe.Loaded("b", RUNNER, 0))
    (u,) = tickets("a", 1)
    assert pol.handle(pe.Submitted(u, 1)) == []  # a waits for b's memory
    reject = one_reject(pol.handle(pe.Reconfigure({"b": spec(cost=80 * GB)}, now=2)))
    assert isinstance(reject, pe.Reject) and reject.ticket is u
    assert "removed" in reject.error.message and "a" not in pol.models


def test_a_changed_model_reloads_when_idle_even_if_pinned() -> None:
    pol = policy(a=spec(pinned=True))
    serve_once(pol, "a", 0)
    new = spec(pinned=True, max_concurrency=4)
    assert pol.handle(pe.Reconfigure({"a": new}, frozenset({"a"}), now=1)) == [
        pe.StopRunner("a", RUNNER, "manual")
    ]
    pol.handle(pe.RunnerExited("a", 2))
    assert pol.models["a"].spec == new
    (t,) = tickets("a", 1)
    assert pol.handle(pe.Submitted(t, 3)) == [pe.StartRunner("a")]


def test_a_model_added_back_while_its_old_runner_stops_is_served() -> None:
    pol = policy(a=spec(keep_alive_s=600))
    serve_once(pol, "a", 0)
    assert pol.handle(pe.Reconfigure({}, now=1)) == [pe.StopRunner("a", RUNNER, "manual")]
    new = spec(max_concurrency=4)
    assert pol.handle(pe.Reconfigure({"a": new}, now=2)) == []  # before the runner exits
    (t,) = tickets("a", 1)
    assert pol.handle(pe.Submitted(t, 3)) == []  # waits for the old runner
    assert pol.handle(pe.RunnerExited("a", 4)) == [pe.StartRunner("a")]
    assert "a" in pol.models and pol.models["a"].spec == new


# -- KV reservations -------------------------------------------------------------

MB = 10**6
KV = 1 * MB  # KV bytes per token in these tests: 256 tokens take 256 MB


def request(model: str, prompt: int, max_tokens: int) -> pe.Ticket:
    return pe.Ticket(model, prompt=(1,) * prompt, max_tokens=max_tokens)


def test_a_model_is_charged_its_weights_and_what_its_running_requests_reserve() -> None:
    pol = policy(budget=100 * GB, a=spec(4 * GB, kv_per_token=KV))
    t = request("a", 1000, 1000)  # 2000 tokens, in the cache's steps of 256: 2048
    pol.handle(pe.Submitted(t))
    assert pol.handle(pe.Loaded("a", RUNNER)) == [pe.Grant(t, RUNNER)]
    assert pol.used == 4 * GB + 2048 * KV
    pol.handle(pe.Released(t, 1))
    assert pol.used == 4 * GB
    # What the runner measures counts when it is more than the reservations.
    pol.handle(pe.Measured("a", 5 * GB, 0, 2))
    assert pol.used == 5 * GB


def growing(model: str, prompt: int, max_tokens: int, reserve: int) -> pe.Ticket:
    t = request(model, prompt, max_tokens)
    t.reserve = reserve
    return t


def test_a_sequence_reserves_a_first_step_and_grows_when_it_fits() -> None:
    """Claude Code asks for 32,000 tokens on every turn: it is charged its
    prompt and a first step of output, and more as it writes."""
    pol = policy(budget=100 * GB, a=spec(4 * GB, kv_per_token=KV))
    t = growing("a", 200, 32_000, reserve=256)
    pol.handle(pe.Submitted(t))
    assert pol.handle(pe.Loaded("a", RUNNER)) == [pe.Grant(t, RUNNER)]
    assert pol.used == 4 * GB + 512 * KV  # 456 tokens, in steps of 256
    assert pol.handle(pe.Grow(t, 512, 1)) == [pe.Grown(t)]
    assert t.reserved == 512 and pol.used == 4 * GB + 768 * KV
    assert pol.handle(pe.Grow(t, 10**6, 2)) == [pe.Grown(t)]  # never past max_tokens
    assert t.reserved == 32_000


def test_a_growth_that_does_not_fit_waits_and_goes_before_new_requests() -> None:
    step = 256 * KV
    pol = policy(budget=4 * GB + 5 * step, a=spec(4 * GB, kv_per_token=KV, max_concurrency=4))
    t, u = growing("a", 256, 1024, 256), growing("a", 256, 1024, 256)  # all of it fits alone
    submit_all(pol, [t, u])
    assert pol.handle(pe.Loaded("a", RUNNER)) == [pe.Grant(t, RUNNER), pe.Grant(u, RUNNER)]
    assert pol.ledger.free == step
    assert pol.handle(pe.Grow(u, 768, 1)) == []  # two steps more: one is free
    v = growing("a", 1, 1000, 1)  # one step: it would fit, but u's growth comes first
    assert pol.handle(pe.Submitted(v, 2)) == []
    assert pol.handle(pe.Released(t, 3)) == [pe.Grown(u), pe.Grant(v, RUNNER)]
    assert u.reserved == 768 and pol.used <= pol.budget


def test_a_sequence_that_cannot_grow_pauses_the_lowest_priority_newest_one() -> None:
    step = 256 * KV
    pol = policy(budget=4 * GB + 6 * step, a=spec(4 * GB, kv_per_token=KV, max_concurrency=4))
    old, new = growing("a", 256, 1024, 256), growing("a", 256, 1024, 256)
    batch = growing("a", 256, 1024, 256)
    batch.priority = pe.BACKGROUND
    submit_all(pol, [old, batch], now=0)
    pol.handle(pe.Loaded("a", RUNNER, 0))
    assert pol.handle(pe.Submitted(new, 1)) == [pe.Grant(new, RUNNER)]  # all six steps taken
    assert pol.handle(pe.Grow(new, 512, 2)) == [pe.Pause(batch)]  # lower priority, though older
    assert pol.handle(pe.Released(batch, 3)) == [pe.Grown(new)]
    assert pol.handle(pe.Grow(old, 512, 4)) == [pe.Grown(old)]  # one step free: it fits
    assert pol.handle(pe.Grow(new, 1024, 5)) == []  # no room, nobody below it: it waits
    assert pol.handle(pe.Grow(old, 1024, 6)) == [pe.Pause(new)]  # the same priority, newer


def test_a_sequence_that_leaves_drops_its_growth() -> None:
    pol = policy(budget=4 * GB + 4 * 256 * KV, a=spec(4 * GB, kv_per_token=KV, max_concurrency=4))
    t, w = growing("a", 256, 768, 256), growing("a", 1, 1, 1)  # 2 steps, and 1
    submit_all(pol, [t, w])
    pol.handle(pe.Loaded("a", RUNNER))
    assert pol.handle(pe.Grow(t, 768, 1)) == []  # two steps more: one is free
    assert pol.handle(pe.Released(t, 2)) == []  # paused, say: it asks again when it is back
    u = growing("a", 256, 768, 256)
    assert pol.handle(pe.Submitted(u, 3)) == [pe.Grant(u, RUNNER)]


def pausable(model: str, priority: int) -> pe.Ticket:
    return pe.Ticket(model, prompt=(1,) * 10, max_tokens=100, priority=priority, reserve=100)


def test_an_interactive_request_waiting_for_a_slot_pauses_the_newest_background_one() -> None:
    pol = policy(a=spec(kv_per_token=KV, max_concurrency=2))
    old, new = pausable("a", pe.BACKGROUND), pausable("a", pe.BACKGROUND)
    pol.handle(pe.Submitted(old, 0))
    pol.handle(pe.Loaded("a", RUNNER, 0))
    assert pol.handle(pe.Submitted(new, 1)) == [pe.Grant(new, RUNNER)]
    editor, again = pausable("a", pe.INTERACTIVE), pausable("a", pe.INTERACTIVE)
    assert pol.handle(pe.Submitted(editor, 2)) == [pe.Pause(new)]
    assert pol.handle(pe.Submitted(again, 3)) == []  # one at a time
    assert pol.handle(pe.Released(new, 4)) == [pe.Grant(editor, RUNNER), pe.Pause(old)]
    back = pausable("a", pe.BACKGROUND)  # the paused one, for the rest of its tokens
    assert pol.handle(pe.Submitted(back, 5)) == []
    assert pol.handle(pe.Released(old, 6)) == [pe.Grant(again, RUNNER)]
    assert pol.handle(pe.Released(editor, 7)) == [pe.Grant(back, RUNNER)]


def test_an_interactive_request_waiting_for_memory_pauses_a_background_one_elsewhere() -> None:
    step = 256 * KV
    pol = policy(
        budget=8 * GB + 3 * step,
        a=spec(4 * GB, kv_per_token=KV),
        b=spec(4 * GB, kv_per_token=KV, max_concurrency=4),
    )
    serve_once(pol, "a", 0)
    batch = pausable("b", pe.BACKGROUND)
    pol.handle(pe.Submitted(batch, 1))
    pol.handle(pe.Loaded("b", RUNNER, 1))
    assert batch in pol.models["b"].running
    hog = request("b", 256, 200)  # 2 steps; can't go on later (a grammar, say): never paused
    hog.priority = pe.BACKGROUND
    assert pol.handle(pe.Submitted(hog, 2)) == [pe.Grant(hog, RUNNER)]
    normal = pausable("a", pe.NORMAL)  # waits for memory, but is not interactive
    assert pol.handle(pe.Submitted(normal, 3)) == []
    assert pol.handle(pe.Withdrawn(normal, 4)) == []
    editor = pausable("a", pe.INTERACTIVE)
    assert pol.handle(pe.Submitted(editor, 5)) == [pe.Pause(batch)]
    assert pol.handle(pe.Released(batch, 6)) == [pe.Grant(editor, RUNNER)]


def test_max_concurrency_is_a_cap_not_a_charge() -> None:
    """Eight short requests run together on a model whose worst case (eight
    sequences of its whole context) is far beyond the budget."""
    pol = policy(budget=8 * GB, a=spec(4 * GB, kv_per_token=KV, max_concurrency=8))
    ts = [request("a", 200, 56) for _ in range(9)]  # 256 MB each
    submit_all(pol, ts)
    effects = pol.handle(pe.Loaded("a", RUNNER))
    assert effects == [pe.Grant(t, RUNNER) for t in ts[:8]]  # the ninth waits for a slot
    assert pol.used == 4 * GB + 8 * 256 * MB


def test_a_request_waits_for_memory_and_is_granted_when_another_ends() -> None:
    pol = policy(budget=10 * GB, a=spec(4 * GB, kv_per_token=KV))
    first, second = request("a", 3000, 1000), request("a", 3000, 1000)  # 4096 tokens each
    submit_all(pol, [first, second])
    assert pol.handle(pe.Loaded("a", RUNNER)) == [pe.Grant(first, RUNNER)]
    assert pol.waiting_for_memory() == {"a": 1}
    assert pol.handle(pe.Released(first, 1)) == [pe.Grant(second, RUNNER)]


def test_a_request_takes_memory_from_idle_prefix_caches_then_idle_models() -> None:
    pol = policy(
        budget=20 * GB,
        a=spec(4 * GB, kv_per_token=KV),
        b=spec(4 * GB, prefix_cache=2 * GB),
        c=spec(4 * GB),
    )
    (tb,) = tickets("b", 1)
    pol.handle(pe.Submitted(tb, 0))
    pol.handle(pe.Loaded("b", RUNNER, 0))
    pol.handle(pe.Released(tb, 0))
    pol.handle(pe.Measured("b", 5 * GB, 1 * GB, 0))  # 1 GB of its 2 GB reservation used
    serve_once(pol, "c", 1)
    (running,) = tickets("a", 1)
    pol.handle(pe.Submitted(running, 2))
    pol.handle(pe.Loaded("a", RUNNER, 2))  # 4+2+4+4 = 14 GB used, 6 GB free
    big = request("a", 6000, 1500)  # 7680 MB of KV: b's cached prefixes make up the rest
    assert pol.handle(pe.Submitted(big, 3)) == [
        pe.PrefixLimit("b", RUNNER, 0, dropped=True),
        pe.Grant(big, RUNNER),
    ]
    more = request("a", 1000, 1000)  # 2048 MB: now a model must go, the least recently used
    assert pol.handle(pe.Submitted(more, 4)) == [pe.StopRunner("b", RUNNER, "memory")]
    assert pol.handle(pe.RunnerExited("b", 5)) == [pe.Grant(more, RUNNER)]
    assert pol.models["c"].state is p.State.READY
    assert pol.used <= pol.budget


def test_a_large_request_is_not_starved_by_a_stream_of_small_ones() -> None:
    pol = policy(budget=10 * GB, a=spec(4 * GB, kv_per_token=KV, max_concurrency=8))
    small = [request("a", 100, 100) for _ in range(4)]  # 256 MB each
    submit_all(pol, small)
    pol.handle(pe.Loaded("a", RUNNER))  # 4976 MB free
    hog = request("a", 1000, 4500)  # 5632 MB
    assert pol.handle(pe.Submitted(hog, 1)) == []
    later = request("a", 100, 100)
    assert pol.handle(pe.Submitted(later, 2)) == []  # it would fit, but waits its turn
    assert pol.handle(pe.Released(small[0], 3)) == []
    assert pol.handle(pe.Released(small[1], 4)) == []
    assert pol.handle(pe.Released(small[2], 5)) == [pe.Grant(hog, RUNNER)]
    assert pol.handle(pe.Released(small[3], 6)) == [pe.Grant(later, RUNNER)]


def test_a_request_that_could_never_fit_gets_400_if_fewer_tokens_would_fit() -> None:
    pol = policy(budget=10 * GB, a=spec(4 * GB, kv_per_token=KV))
    reject = one_reject(pol.handle(pe.Submitted(request("a", 1000, 100_000))))
    assert isinstance(reject.error, RequestTooLarge) and reject.error.param == "max_tokens"
    message = reject.error.message
    assert str(10 * GB) in message and str(101_120 * KV) in message
    most = int(message.rsplit("max_tokens ", 1)[1].split()[0])
    assert 4 * GB + pol.models["a"].kv(request("a", 1000, most)) <= 10 * GB
    assert 4 * GB + pol.models["a"].kv(request("a", 1000, most + KV_STEP)) > 10 * GB
    reject = one_reject(
        pol.handle(pe.Submitted(request("a", 7000, 10)))
    )  # the prompt alone is too big
    assert isinstance(reject.error, ModelTooLarge)
    assert pol.used == 0


def test_a_laptop_budget_takes_an_8b_model_whatever_its_declared_context() -> None:
    """A 16 GB Mac's default budget (Metal's working set, about 10.7 GB) and
    an 8B model at 4 bits (4.5 GB of weights, 128 KiB of KV a token, a 131k
    context): loading is about the weights, each request about its tokens."""
    pol = policy(budget=int(10.7 * GB), m=spec(int(5.3 * GB), kv_per_token=128 * 1024))
    ts = [request("m", 12_000, 4096) for _ in range(2)]  # two agents, 2.2 GB of KV each
    effects = submit_all(pol, ts)
    assert effects == [pe.StartRunner("m", 0, ts[0].prompt)]
    assert pol.handle(pe.Loaded("m", RUNNER)) == [pe.Grant(t, RUNNER) for t in ts]
    assert pol.used <= pol.budget
    long = request("m", 30_000, 4096)  # 4.5 GB: it waits for them, it is not refused
    assert pol.handle(pe.Submitted(long, 1)) == []
    pol.handle(pe.Released(ts[0], 2))
    assert pol.handle(pe.Released(ts[1], 3)) == [pe.Grant(long, RUNNER)]


def test_what_a_model_measures_beyond_its_requests_kv_becomes_its_cost_for_later_loads() -> None:
    pol = policy(budget=30 * GB, a=spec(10 * GB, kv_per_token=KV), b=spec(10 * GB))
    t = request("a", 3000, 1000)  # reserves 4096 tokens' KV: 4.096 GB
    pol.handle(pe.Submitted(t, 0))
    pol.handle(pe.Loaded("a", RUNNER, 1))
    pol.handle(pe.Measured("a", 14 * GB, 0, 2))  # busy: its requests' KV is in there
    assert pol.models["a"].cost == 10 * GB
    pol.handle(pe.Measured("a", 15 * GB, 0, 2))  # more than its KV explains
    assert pol.models["a"].cost == 15 * GB - 4096 * KV
    pol.handle(pe.Released(t, 3))
    pol.handle(pe.Measured("a", 12 * GB, 0, 4))  # idle: weights, buffers and cache
    assert pol.models["a"].cost == 12 * GB and pol.used == 12 * GB
    (u,) = tickets("b", 1)
    assert pol.handle(pe.Submitted(u, 5)) == [pe.StartRunner("b", 0, ())]
    pol.handle(pe.Measured("a", 9 * GB, 0, 6))  # less, later: it keeps the most it was seen to hold
    assert pol.models["a"].cost == 12 * GB
    pol.handle(pe.Unload("a", 7))
    pol.handle(pe.RunnerExited("a", 8))
    (v,) = tickets("a", 1)
    pol.handle(pe.Submitted(v, 9))
    assert pol.models["a"].held == 12 * GB  # its next load is charged what it held


def test_every_runner_is_charged_what_the_spare_runner_holds() -> None:
    """On a CUDA host each runner process holds a CUDA context before any
    model: the spare measures it, the spare is charged it while it waits, and
    each model is charged it on top of its weights. A load takes the spare
    over, with its bytes."""
    pol = policy(budget=10 * GB, a=spec(int(8.5 * GB)), b=spec(int(9.5 * GB)))
    pol.handle(pe.SpareHeld(None))  # starting: the first one's size is not known yet
    assert pol.used == 0
    pol.handle(pe.SpareHeld(GB))
    assert pol.used == GB and pol.ledger.context == GB
    (t,) = tickets("a", 1)
    assert pol.handle(pe.Submitted(t)) == [pe.StartRunner("a", 0, ())]
    assert pol.used == int(9.5 * GB)  # the spare's gigabyte is the load's now, not twice
    pol.handle(pe.SpareHeld(0))  # the pool says so too, once it has taken it
    assert pol.handle(pe.Loaded("a", RUNNER)) == [pe.Grant(t, RUNNER)]
    assert pol.used == int(9.5 * GB)
    assert not pol.spare_fits()  # 0.5 GB left: no room for another runner
    pol.handle(pe.Released(t, 1))
    (u,) = tickets("b", 1)
    reject = one_reject(pol.handle(pe.Submitted(u, 2)))  # 9.5 GB of weights and a 1 GB runner
    assert isinstance(reject.error, ModelTooLarge)
    assert "runner process" in reject.error.message and str(int(10.5 * GB)) in reject.error.message


def test_a_spare_runner_waits_while_a_model_waits_for_memory() -> None:
    pol = policy(budget=20 * GB, a=spec(8 * GB), b=spec(8 * GB), c=spec(8 * GB))
    pol.handle(pe.SpareHeld(GB))
    serve_once(pol, "a", 0)
    pol.handle(pe.SpareHeld(GB))  # the next spare
    (t,) = tickets("b", 1)
    assert pol.handle(pe.Submitted(t, 1)) == [pe.StartRunner("b", 0, ())]
    assert pol.spare_fits()  # 2 GB free
    (u,) = tickets("c", 1)
    assert pol.handle(pe.Submitted(u, 2)) == [pe.StopRunner("a", RUNNER, "memory")]
    assert not pol.spare_fits()  # c waits for a's memory: a spare must not take it
    assert pol.handle(pe.RunnerExited("a", 3)) == [pe.StartRunner("c", 0, ())]
    assert pol.spare_fits()  # nobody waits, and 2 GB are free


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 8), st.integers(0, 2), st.integers(0, 9)), max_size=80))
# A first spare measured after a model loaded: the model is not charged that runner again.
@example([(0, 0, 5), (0, 1, 0), (4, 0, 0), (7, 0, 8)])
def test_no_sequence_of_events_charges_more_than_the_budget(
    steps: list[tuple[int, int, int]],
) -> None:
    """Whatever arrives, grows, finishes, loads, exits or is measured (a
    runner never holds more than it was charged), the charges stay within the
    budget."""
    pol = policy(
        budget=16 * GB,
        a=spec(4 * GB, kv_per_token=KV, max_concurrency=3, prefix_cache=2 * GB),
        b=spec(6 * GB, kv_per_token=2 * KV, max_concurrency=2, queue_limit=3),
        c=spec(3 * GB, kv_per_token=KV // 2, pinned=True),
    )
    names = sorted(pol.models)
    now = 0.0
    for kind, which, size in steps:
        now += 1.0
        name = names[which]
        m = pol.models[name]
        if kind == 0:
            event: pe.Event = pe.Submitted(request(name, 300 * size + 1, 500 * size), now)
        elif kind == 1:  # a sequence that reserves a first step and grows (or pauses)
            t = growing(name, 300 * size + 1, 5000, 256)
            t.priority = size % 3  # interactive, normal, background
            event = pe.Submitted(t, now)
        elif kind == 8 and m.running:
            t = max(m.running, key=lambda t: t.id)
            event = pe.Grow(t, t.reserved + 256 * (size + 1), now)
        elif kind == 2 and m.running:
            event = pe.Released(next(iter(m.running)), now)
        elif kind == 3 and m.queue:
            event = pe.Withdrawn(m.queue[-1], now)
        elif kind == 4 and m.state is p.State.LOADING:
            event = pe.Loaded(name, RUNNER, now)
        elif kind == 5 and m.state is p.State.STOPPING:
            event = pe.RunnerExited(name, now)
        elif kind == 6 and m.state is p.State.READY:
            prefixes = min(m.prefixes, size * GB // 4)
            event = pe.Measured(name, m.bytes * size // 9 + prefixes, prefixes, now)
        elif kind == 7 and which == 0 and not pol.ledger.spare and pol.spare_fits():
            pol.handle(pe.SpareHeld(None, now))  # a spare starts, and says what it holds
            event = pe.SpareHeld(min(pol.ledger.free, size * GB // 8), now)
        elif kind == 7 and which == 1:
            event = pe.SpareHeld(0, now)  # it died (or a load took it)
        else:
            event = pe.Tick(now + 60 * size)
        for effect in pol.handle(event):
            if isinstance(effect, pe.Pause):  # only a running sequence that can go on later
                t = effect.ticket
                assert t.reserve is not None and t in pol.models[t.model].running
                waiting = [g for m in pol.models.values() for g in m.growing]
                # for an interactive request (it is background then), or a sequence above it
                assert t.priority == pe.BACKGROUND or any(
                    (g.priority, g.granted) < (t.priority, t.granted) for g in waiting
                ), (t, waiting)
        assert pol.used <= pol.budget, (event, pol.models)
        for m in pol.models.values():
            assert len(m.running) <= m.spec.max_concurrency
