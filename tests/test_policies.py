"""The pure delivery policies on a manual clock: breaker, retry schedule, dedup window."""

from __future__ import annotations

import random
import tracemalloc

import pytest

from tether.clock import ManualClock
from tether.resilience import BreakerPolicy, CircuitBreaker, CircuitState, DedupWindow, RetryPolicy
from tether.testing import assert_backoff_schedule


def make_breaker(clock: ManualClock, **overrides: float) -> tuple[CircuitBreaker, list[str]]:
    moves: list[str] = []
    policy = BreakerPolicy(
        **{
            "failure_threshold": 5,
            "success_threshold": 2,
            "recovery_timeout": 60.0,
            "half_open_max_calls": 3,
            **overrides,
        }
    )  # type: ignore[arg-type]
    breaker = CircuitBreaker(
        policy, clock, lambda old, new: moves.append(f"{old.value}>{new.value}")
    )
    return breaker, moves


def test_breaker_opens_after_threshold_consecutive_failures(clock: ManualClock) -> None:
    breaker, moves = make_breaker(clock)
    for _ in range(4):
        breaker.record_failure()
    breaker.record_success()  # not consecutive any more
    for _ in range(4):
        breaker.record_failure()
    assert breaker.state is CircuitState.CLOSED
    breaker.record_failure()
    assert breaker.state is CircuitState.OPEN
    assert moves == ["closed>open"]
    assert not breaker.allow()


def test_breaker_recovers_by_itself_through_half_open(clock: ManualClock) -> None:
    breaker, moves = make_breaker(clock)
    for _ in range(5):
        breaker.record_failure()
    clock.advance(59.9)
    assert breaker.state is CircuitState.OPEN
    clock.advance(0.1)
    assert breaker.state is CircuitState.HALF_OPEN  # nobody called allow(): still recovers
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state is CircuitState.HALF_OPEN
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state is CircuitState.CLOSED
    assert moves == ["closed>open", "open>half_open", "half_open>closed"]


def test_half_open_failure_reopens_and_limits_trials(clock: ManualClock) -> None:
    breaker, moves = make_breaker(clock, half_open_max_calls=2)
    for _ in range(5):
        breaker.record_failure()
    clock.advance(60)
    assert breaker.allow() and breaker.allow()
    assert not breaker.allow()  # third concurrent trial refused
    breaker.record_failure()
    assert breaker.state is CircuitState.OPEN
    assert breaker.retry_at == clock.now() + 60
    assert moves[-1] == "half_open>open"


def test_breaker_state_check_allocates_nothing(clock: ManualClock) -> None:
    breaker, _ = make_breaker(clock)
    breaker.state  # noqa: B018 - warm up
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for _ in range(10_000):
            breaker.allow()
            breaker.state  # noqa: B018
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename") if "breaker" in str(s))
    assert grown <= 0


def test_backoff_ceilings_double_and_cap() -> None:
    policy = RetryPolicy(base_delay=1.0, max_delay=60.0, max_retries=5)
    assert [policy.ceiling(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert policy.ceiling(10_000) == 60.0  # no overflow


def test_backoff_is_full_jitter_within_bounds() -> None:
    policy = RetryPolicy(base_delay=0.5, max_delay=10.0, rng=random.Random(7))
    samples = [[policy.delay(n) for n in range(1, 8)] for _ in range(300)]
    for delays in samples:
        assert_backoff_schedule(delays, policy)
    # Full jitter: delays spread over the whole [0, ceiling] range, not clustered at the cap.
    after_five = [s[4] for s in samples]
    assert min(after_five) < 1.0 and max(after_five) > 7.0


def test_retry_budget() -> None:
    policy = RetryPolicy(max_retries=3)
    assert [policy.exhausted(n) for n in range(1, 6)] == [False, False, False, True, True]


def test_dedup_window_expires_keys_in_order(clock: ManualClock) -> None:
    window = DedupWindow(window=10.0, max_entries=100, clock=clock)
    window.record("a")
    clock.advance(5)
    window.record("b")
    assert window.seen("a") and window.seen("b")
    clock.advance(5)
    assert not window.seen("a") and window.seen("b")
    assert len(window) == 1  # evicted, not just hidden


def test_dedup_window_is_bounded(clock: ManualClock) -> None:
    window = DedupWindow(window=1000.0, max_entries=3, clock=clock)
    for key in "abcde":
        window.record(key)
    assert len(window) == 3
    assert not window.seen("a") and window.seen("e")


@pytest.mark.parametrize("bad", [-1.0, -0.001])
def test_manual_clock_never_goes_backwards(clock: ManualClock, bad: float) -> None:
    with pytest.raises(ValueError):
        clock.advance(bad)
