"""Helpers for tests of code that uses a Hub: mock fleets, clock driving, metric deltas."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..clock import ManualClock
from ..metrics import COUNTER_FIELDS, MetricsSnapshot
from ..resilience import CircuitState, RetryPolicy
from .mock import MockWebSocket

if TYPE_CHECKING:
    from ..hub import Hub


def create_mock_clients(
    count: int, *, prefix: str = "client", **options: Any
) -> dict[str, MockWebSocket]:
    """`count` mock connections keyed `"{prefix}-{i}"`; options go to MockWebSocket
    (a `seed` is offset per client so failures differ but stay reproducible)."""
    seed = options.pop("seed", None)
    return {
        f"{prefix}-{i}": MockWebSocket(
            name=f"{prefix}-{i}", seed=None if seed is None else seed + i, **options
        )
        for i in range(count)
    }


async def connect_mock_clients(
    hub: Hub, count: int, *, prefix: str = "client", **options: Any
) -> dict[str, MockWebSocket]:
    """Create and connect `count` mock clients to `hub` in plain mode."""
    mocks = create_mock_clients(count, prefix=prefix, **options)
    for client_id, mock in mocks.items():
        await hub.connect(client_id, mock)
    return mocks


async def drive_until(
    hub: Hub,
    clock: ManualClock,
    condition: Callable[[], bool],
    *,
    step: float | None = None,
    max_steps: int = 10_000,
) -> int:
    """Advance `clock` by `step` (default: the retry interval) and run a retry cycle,
    until `condition()` holds. Returns the steps taken; raises AssertionError if it
    never does."""
    step = hub.config.retry_interval if step is None else step
    for steps in range(max_steps + 1):
        if condition():
            return steps
        clock.advance(step)
        await hub.retry_now()
        await asyncio.sleep(0)
    raise AssertionError(f"condition not met after {max_steps} steps of {step}s")


async def wait_for_circuit_state(
    hub: Hub,
    client_id: str,
    state: CircuitState,
    *,
    clock: ManualClock | None = None,
    timeout: float = 5.0,
) -> None:
    """Wait until the client's breaker is in `state`: by driving `clock` if given,
    else by polling the real clock up to `timeout` seconds."""
    if clock is not None:
        await drive_until(hub, clock, lambda: hub.circuit_state(client_id) is state)
        return
    async with asyncio.timeout(timeout):
        while hub.circuit_state(client_id) is not state:  # noqa: ASYNC110 - state has no event
            await asyncio.sleep(0.005)


def assert_backoff_schedule(delays: list[float], policy: RetryPolicy) -> None:
    """Check delays observed after failures 1, 2, … lie within the full-jitter bounds
    [0, min(max_delay, base_delay * 2**(n-1))] of `policy`."""
    for failures, delay in enumerate(delays, start=1):
        ceiling = policy.ceiling(failures)
        assert 0.0 <= delay <= ceiling + 1e-9, (
            f"delay after failure {failures} is {delay:.3f}s, outside [0, {ceiling:.3f}]"
        )


def assert_metrics_delta(before: MetricsSnapshot, after: MetricsSnapshot, **expected: int) -> None:
    """Assert counters changed by exactly the given amounts, e.g.
    `assert_metrics_delta(s0, s1, messages_sent=3, messages_queued=0)`."""
    unknown = set(expected) - set(COUNTER_FIELDS)
    if unknown:
        raise ValueError(f"unknown counters: {sorted(unknown)}")
    delta = after.diff(before)
    wrong = {
        name: (delta.counter(name), want)
        for name, want in expected.items()
        if delta.counter(name) != want
    }
    assert not wrong, "counter deltas (got, want): " + ", ".join(
        f"{name}={got}≠{want}" for name, (got, want) in wrong.items()
    )
