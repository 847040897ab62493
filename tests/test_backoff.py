from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest
from fireclaw.pool.backoff import (
    MAX_EXPONENT,
    Decision,
    ExitClass,
    RestartTracker,
    classify_exit,
)


@dataclass(frozen=True)
class Backoff:
    base: float = 1.0
    max: float = 60.0


@dataclass(frozen=True)
class Policy:
    """The attributes of ``fireclaw.config.RestartPolicy`` that the tracker reads."""

    policy: str = "permanent"
    max_restarts: int = 5
    window: float = 600.0
    stable_after: float = 10.0
    reset_after: float = 300.0
    fatal_exit_codes: tuple[int, ...] = (78,)
    backoff: Backoff = field(default_factory=Backoff)


def cap(a: float, b: float) -> float:
    return b


def many(**kw: object) -> Policy:
    """A policy whose circuit breaker does not get in the way."""
    return replace(Policy(max_restarts=10_000), **kw)  # type: ignore[arg-type]


FAIL = ExitClass.FAILURE


def test_classify_exit() -> None:
    p = Policy(fatal_exit_codes=(78, 3))
    assert classify_exit(0, p) is ExitClass.CLEAN
    assert classify_exit(78, p) is ExitClass.FATAL
    assert classify_exit(3, p) is ExitClass.FATAL
    assert classify_exit(1, p) is ExitClass.FAILURE
    assert classify_exit(-9, p) is ExitClass.FAILURE
    assert classify_exit(None, p) is ExitClass.FAILURE


def test_exact_doubling_sequence_up_to_cap() -> None:
    t = RestartTracker(many(), uniform=cap)
    delays = [t.exited(float(i), FAIL).delay for i in range(9)]
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert t.consecutive == 9


def test_full_jitter_draws_from_zero_to_cap() -> None:
    calls: list[tuple[float, float]] = []

    def uniform(a: float, b: float) -> float:
        calls.append((a, b))
        return (a + b) / 2

    t = RestartTracker(many(backoff=Backoff(base=0.5, max=3.0)), uniform=uniform)
    decisions = [t.exited(float(i), FAIL) for i in range(5)]
    assert calls == [(0, 0.5), (0, 1.0), (0, 2.0), (0, 3.0), (0, 3.0)]
    assert [d.delay for d in decisions] == [0.25, 0.5, 1.0, 1.5, 1.5]
    assert all(d.restart and not d.failed and d.reason == "backoff" for d in decisions)


def test_exponent_is_capped_and_never_overflows() -> None:
    t = RestartTracker(many(backoff=Backoff(base=1e-300, max=float("inf"))), uniform=cap)
    for i in range(5000):
        d = t.exited(float(i), FAIL)
    assert t.consecutive == MAX_EXPONENT
    assert d.delay == 1e-300 * 2.0**MAX_EXPONENT


def test_stable_run_restarts_at_once_and_keeps_n() -> None:
    t = RestartTracker(many(), uniform=cap)
    t.exited(0.0, FAIL)
    t.exited(1.0, FAIL)
    assert t.consecutive == 2
    t.ready(100.0)
    d = t.exited(110.0, FAIL)
    assert d == Decision(restart=True, delay=0.0, failed=False, reason="stable run")
    assert t.consecutive == 2
    # Not ready for long enough: back to backoff where it left off.
    t.ready(200.0)
    assert t.exited(209.999, FAIL).delay == 4.0


def test_never_ready_is_not_stable() -> None:
    t = RestartTracker(many(), uniform=cap)
    t.exited(0.0, FAIL)
    # A long boot that never reached readiness is still a crash loop.
    assert t.exited(1000.0, FAIL).delay == 2.0


def test_readiness_ends_at_exit() -> None:
    t = RestartTracker(many(), uniform=cap)
    t.ready(0.0)
    assert t.exited(50.0, FAIL).delay == 0.0
    # The next run never became ready: its predecessor's readiness does not count.
    assert t.exited(100.0, FAIL).delay == 1.0


def test_second_ready_keeps_first_start() -> None:
    t = RestartTracker(many(), uniform=cap)
    t.ready(0.0)
    t.ready(9.0)  # idle -> active: still the same continuous readiness
    assert t.exited(10.0, FAIL).delay == 0.0


def test_reset_after_resets_n() -> None:
    t = RestartTracker(many(), uniform=cap)
    for i in range(4):
        t.exited(float(i), FAIL)
    assert t.consecutive == 4
    t.ready(10.0)
    assert t.exited(310.0, FAIL).delay == 0.0
    assert t.consecutive == 0
    assert t.exited(311.0, FAIL).delay == 1.0


def test_reset_after_resets_n_before_computing_the_delay() -> None:
    # stable_after above reset_after: the restart is backed off, from n = 0.
    t = RestartTracker(many(stable_after=400.0, reset_after=300.0), uniform=cap)
    for i in range(4):
        t.exited(float(i), FAIL)
    t.ready(10.0)
    assert t.exited(310.0, FAIL).delay == 1.0
    assert t.consecutive == 1


def test_ready_below_reset_after_keeps_n() -> None:
    t = RestartTracker(many(), uniform=cap)
    for i in range(4):
        t.exited(float(i), FAIL)
    t.ready(10.0)
    t.exited(309.0, FAIL)
    assert t.consecutive == 4


def test_circuit_opens_at_max_restarts_plus_one_within_window() -> None:
    t = RestartTracker(Policy(max_restarts=5, window=600.0), uniform=cap)
    for i in range(5):
        assert t.exited(i * 100.0, FAIL).restart
    assert t.restarts_in_window(400.0) == 5
    d = t.exited(599.0, FAIL)
    assert d == Decision(
        restart=False, delay=0.0, failed=True, reason="more than 5 restarts in 600s"
    )
    assert t.failed
    # Stays open, even long after, even for an exit that looks stable.
    t.ready(10_000.0)
    assert t.exited(20_000.0, FAIL) == Decision(
        restart=False, delay=0.0, failed=True, reason="circuit open"
    )


def test_circuit_counts_stable_restarts_too() -> None:
    t = RestartTracker(Policy(max_restarts=2, window=600.0), uniform=cap)
    for now in (20.0, 40.0):
        t.ready(now - 15.0)
        assert t.exited(now, FAIL).delay == 0.0
    t.ready(45.0)
    assert t.exited(60.0, FAIL).failed


def test_failures_spread_beyond_the_window_never_open_the_circuit() -> None:
    t = RestartTracker(Policy(max_restarts=5, window=600.0), uniform=cap)
    # Six restarts within any 600 s would trip it; one every 120 s puts the
    # sixth exactly at the edge, where the first has just left the window.
    for i in range(50):
        d = t.exited(i * 120.0, FAIL)
        assert d.restart and not d.failed, i
    assert t.restarts_in_window(49 * 120.0) == 5
    assert t.restarts_in_window(49 * 120.0 + 600.0) == 0


def test_reset_closes_the_circuit_and_clears_n() -> None:
    t = RestartTracker(Policy(max_restarts=1, window=600.0), uniform=cap)
    t.exited(0.0, FAIL)
    assert t.exited(1.0, FAIL).failed
    t.reset()
    assert not t.failed and t.consecutive == 0 and t.restarts_in_window(2.0) == 0
    assert t.exited(2.0, FAIL) == Decision(restart=True, delay=1.0, failed=False, reason="backoff")


@pytest.mark.parametrize("cls", list(ExitClass))
def test_temporary_never_restarts(cls: ExitClass) -> None:
    t = RestartTracker(Policy(policy="temporary"), uniform=cap)
    assert t.exited(0.0, cls) == Decision(
        restart=False, delay=0.0, failed=False, reason="temporary"
    )
    assert not t.failed


def test_transient_restarts_only_after_failure() -> None:
    t = RestartTracker(Policy(policy="transient"), uniform=cap)
    assert t.exited(0.0, ExitClass.CLEAN) == Decision(
        restart=False, delay=0.0, failed=False, reason="clean exit"
    )
    assert t.restarts_in_window(0.0) == 0
    assert t.exited(1.0, FAIL).restart


def test_permanent_restarts_after_clean_exit() -> None:
    t = RestartTracker(Policy(policy="permanent"), uniform=cap)
    assert t.exited(0.0, ExitClass.CLEAN) == Decision(
        restart=True, delay=1.0, failed=False, reason="backoff"
    )


@pytest.mark.parametrize("policy", ["permanent", "transient"])
def test_fatal_exit_fails_without_restart(policy: str) -> None:
    t = RestartTracker(Policy(policy=policy), uniform=cap)
    t.ready(0.0)
    assert t.exited(1000.0, ExitClass.FATAL) == Decision(
        restart=False, delay=0.0, failed=True, reason="fatal exit"
    )
    assert t.failed
    assert t.exited(1001.0, FAIL).failed
    t.reset()
    assert t.exited(1002.0, FAIL).restart


def test_works_with_the_config_restart_policy() -> None:
    config = pytest.importorskip("fireclaw.config")
    if not hasattr(config, "RestartPolicy"):
        pytest.skip("fireclaw.config does not export RestartPolicy yet")
    policy = config.RestartPolicy(policy="permanent", backoff=config.Backoff())
    assert classify_exit(78, policy) is ExitClass.FATAL
    t = RestartTracker(policy, uniform=cap)
    assert t.exited(0.0, FAIL).delay == policy.backoff.base
