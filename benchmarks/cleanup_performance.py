"""Benchmark: Hub.cleanup_now evicting 1,000 and 10,000 inactive clients (aged with a ManualClock)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from tether import Hub, HubConfig, ManualClock

from ._common import Result, check, cli_main, make_result, median, rnd
from ._hubkit import connect_many

NAME = "cleanup_performance"
TTL = 3600.0


async def _one(stale: int, active: int) -> tuple[float, int]:
    """Seconds for one cleanup_now over `stale` aged clients plus `active` connected ones."""
    clock = ManualClock()
    # Long loop intervals: the background cycles must not run the cleanup before we time it.
    hub = Hub(
        HubConfig(
            client_ttl=TTL,
            cleanup_interval=10 * TTL,
            retry_interval=10 * TTL,
            max_clients=stale + active + 10,
            max_connections=stale + active + 10,
        ),
        clock=clock,
    )
    ids = await connect_many(hub, stale, "idle")
    for cid in ids:  # each saw real traffic: metrics, dedup window, a group
        hub.join(cid, "room")
        await hub.send(cid, {"id": f"m-{cid}", "text": "hello"})
        await hub.disconnect(cid)
    clock.advance(TTL + 1)
    await connect_many(hub, active, "live")  # connected now: scanned, never evicted
    start = time.perf_counter()
    evicted = await hub.cleanup_now()
    elapsed = time.perf_counter() - start
    await hub.shutdown(flush=False)
    if evicted != stale:
        raise RuntimeError(f"expected {stale} evictions, got {evicted}")
    return elapsed, evicted


def run(quick: bool = False) -> Result:
    """ms per 1,000 evicted clients (median of repetitions, a fresh hub each)."""
    repeat = 3 if quick else 7
    cases = [(1_000, 0), (10_000, 0), (1_000, 9_000), (0, 10_000)]
    if quick:
        cases = [(1_000, 0), (0, 1_000)]
    rows: list[dict[str, Any]] = []
    targets: dict[str, dict[str, Any]] = {}
    for stale, active in cases:
        times = [asyncio.run(_one(stale, active))[0] for _ in range(repeat)]
        ms = median(times) * 1000
        per_1000 = ms / (stale / 1000) if stale else float("nan")
        rows.append(
            {
                "case": f"{stale:,} stale + {active:,} connected",
                "evicted": stale,
                "scanned": stale + active,
                "median_ms": rnd(ms),
                "min_ms": rnd(min(times) * 1000),
                "ms_per_1000_evicted": rnd(per_1000) if stale else None,
                "us_per_client_scanned": rnd(ms * 1000 / (stale + active)),
            }
        )
        if stale and not active:
            targets[f"cleanup_{stale}_ms_per_1000"] = check(
                per_1000, unit="ms", target=10.0, goal=1.0
            )
    params = {"quick": quick, "repeat": repeat, "client_ttl": TTL}
    return make_result(NAME, params, rows, targets)


def main(argv: Sequence[str] | None = None) -> None:
    cli_main(NAME, run, argv)


if __name__ == "__main__":
    main()
