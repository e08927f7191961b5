"""The pool's decisions, called directly: no trio, no processes."""

from scheduler import policy as p
from scheduler.errors import ModelLoadFailed, ShuttingDown

RUNNER = object()


def tickets(model: str, n: int) -> list[p.Ticket]:
    return [p.Ticket(model) for _ in range(n)]


def submit_all(pol: p.Policy, ts: list[p.Ticket]) -> list[p.Effect]:
    return [e for t in ts for e in pol.handle(p.Submitted(t))]


def test_ten_first_requests_start_one_load() -> None:
    pol = p.Policy({"a": 4})
    effects = submit_all(pol, tickets("a", 10))
    assert effects == [p.StartRunner("a")]


def test_grants_up_to_max_concurrency_then_one_per_release() -> None:
    pol = p.Policy({"a": 2})
    ts = tickets("a", 3)
    submit_all(pol, ts)
    assert pol.handle(p.Loaded("a", RUNNER)) == [p.Grant(ts[0], RUNNER), p.Grant(ts[1], RUNNER)]
    assert pol.handle(p.Released(ts[0])) == [p.Grant(ts[2], RUNNER)]
    assert pol.handle(p.Released(ts[1])) == []


def test_resident_model_grants_at_once() -> None:
    pol = p.Policy({"a": 1})
    (t,) = tickets("a", 1)
    pol.handle(p.Submitted(t))
    pol.handle(p.Loaded("a", RUNNER))
    pol.handle(p.Released(t))
    (u,) = tickets("a", 1)
    assert pol.handle(p.Submitted(u)) == [p.Grant(u, RUNNER)]


def test_withdrawn_ticket_leaves_queue_and_is_never_granted() -> None:
    pol = p.Policy({"a": 1})
    ts = tickets("a", 3)
    submit_all(pol, ts)
    pol.handle(p.Withdrawn(ts[1]))
    pol.handle(p.Loaded("a", RUNNER))
    assert pol.handle(p.Released(ts[0])) == [p.Grant(ts[2], RUNNER)]


def test_withdrawn_after_grant_frees_the_slot() -> None:
    pol = p.Policy({"a": 1})
    ts = tickets("a", 2)
    submit_all(pol, ts)
    pol.handle(p.Loaded("a", RUNNER))
    assert pol.handle(p.Withdrawn(ts[0])) == [p.Grant(ts[1], RUNNER)]


def test_load_failure_rejects_waiters_and_does_not_retry() -> None:
    pol = p.Policy({"a": 1})
    ts = tickets("a", 2)
    submit_all(pol, ts)
    err = ModelLoadFailed("broken weights")
    assert pol.handle(p.LoadFailed("a", err)) == [p.Reject(ts[0], err), p.Reject(ts[1], err)]
    # The next request tries again, once.
    (t,) = tickets("a", 1)
    assert pol.handle(p.Submitted(t)) == [p.StartRunner("a")]


def test_runner_exit_reloads_only_if_requests_wait() -> None:
    pol = p.Policy({"a": 1})
    ts = tickets("a", 2)
    submit_all(pol, ts)
    pol.handle(p.Loaded("a", RUNNER))
    assert pol.handle(p.RunnerExited("a")) == [p.StartRunner("a")]  # ts[1] still waits
    pol2 = p.Policy({"a": 1})
    (t,) = tickets("a", 1)
    pol2.handle(p.Submitted(t))
    pol2.handle(p.Loaded("a", RUNNER))
    assert pol2.handle(p.RunnerExited("a")) == []
    assert pol2.models["a"].state is p.State.ABSENT


def test_models_are_independent() -> None:
    pol = p.Policy({"a": 1, "b": 1})
    (a,), (b,) = tickets("a", 1), tickets("b", 1)
    pol.handle(p.Submitted(a))
    pol.handle(p.Loaded("a", RUNNER))
    assert pol.handle(p.Submitted(b)) == [p.StartRunner("b")]
    assert pol.models["a"].running == {a}


def test_shutdown_rejects_waiters_stops_runners_and_refuses_new() -> None:
    pol = p.Policy({"a": 1, "b": 1})
    ts = tickets("a", 2)
    submit_all(pol, ts)
    pol.handle(p.Loaded("a", RUNNER))
    (b,) = tickets("b", 1)
    pol.handle(p.Submitted(b))  # b is loading
    effects = pol.handle(p.Shutdown())
    assert p.StopRunner("a", RUNNER) in effects
    assert [e.ticket for e in effects if isinstance(e, p.Reject)] == [ts[1], b]
    assert all(isinstance(e.error, ShuttingDown) for e in effects if isinstance(e, p.Reject))
    (late,) = tickets("a", 1)
    (reject,) = pol.handle(p.Submitted(late))
    assert isinstance(reject, p.Reject)
    # b finishes loading during shutdown: it is stopped at once.
    assert pol.handle(p.Loaded("b", RUNNER)) == [p.StopRunner("b", RUNNER)]
    assert not pol.finished
    pol.handle(p.RunnerExited("a"))
    pol.handle(p.RunnerExited("b"))
    assert pol.finished
