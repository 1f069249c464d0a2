"""Benchmark: the per-client circuit breaker — ns per state check, allow(), success/failure record."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tether import Hub, HubConfig
from tether.clock import SystemClock
from tether.resilience import BreakerPolicy, CircuitBreaker

from ._common import Result, check, cli_main, make_result, rnd, timeit_ns

NAME = "circuit_breaker_latency"


def _breakers() -> dict[str, Any]:
    clock = SystemClock()
    closed = CircuitBreaker(BreakerPolicy(failure_threshold=10**9), clock)
    opened = CircuitBreaker(BreakerPolicy(failure_threshold=1, recovery_timeout=3600.0), clock)
    opened.record_failure()  # OPEN for an hour: every state read checks the clock
    half = CircuitBreaker(
        BreakerPolicy(
            failure_threshold=1,
            recovery_timeout=1e-9,
            half_open_max_calls=10**12,
            success_threshold=10**12,
        ),
        clock,
    )
    half.record_failure()
    _ = half.state  # HALF_OPEN, and it stays there: success_threshold is out of reach
    hub = Hub(HubConfig())
    hub.join("alice", "bench")  # tracked, so circuit_state() finds its breaker
    return {"closed": closed, "opened": opened, "half": half, "hub": hub}


CASES: tuple[tuple[str, str], ...] = (
    ("state (CLOSED)", "closed.state"),
    ("state (OPEN, clock read)", "opened.state"),
    ("allow() CLOSED", "closed.allow()"),
    ("allow() OPEN", "opened.allow()"),
    ("allow()+record_success() HALF_OPEN", "half.allow(); half.record_success()"),
    ("record_success() CLOSED", "closed.record_success()"),
    ("record_failure() CLOSED", "closed.record_failure()"),
    ("hub.circuit_state(id)", "hub.circuit_state('alice')"),
)


def run(quick: bool = False) -> Result:
    """ns per breaker operation (median of repetitions)."""
    number = 50_000 if quick else 1_000_000
    repeat = 3 if quick else 7
    ns = _breakers()
    rows: list[dict[str, Any]] = []
    worst_check = 0.0
    worst_record = 0.0
    for case, stmt in CASES:
        timing = timeit_ns(stmt, ns, number=number, repeat=repeat)
        rows.append(
            {
                "case": case,
                "median_ns": rnd(timing["median_ns"]),
                "min_ns": rnd(timing["min_ns"]),
                "loop_ns": rnd(timing["loop_ns"]),
            }
        )
        if "record" in case:
            worst_record = max(worst_record, timing["median_ns"])
        else:
            worst_check = max(worst_check, timing["median_ns"])
    targets = {
        "state_check_worst_ns": check(worst_check, unit="ns", target=100_000, goal=1_000),
        "record_worst_ns": check(worst_record, unit="ns", target=100_000, goal=1_000),
    }
    params = {"quick": quick, "number": number, "repeat": repeat}
    return make_result(NAME, params, rows, targets)


def main(argv: Sequence[str] | None = None) -> None:
    cli_main(NAME, run, argv)


if __name__ == "__main__":
    main()
