"""Benchmark: the cost of metrics — hub send throughput with metrics on vs off (same run), and
memory growth (tracemalloc) after 10,000 and 1,000,000 recorded events."""

from __future__ import annotations

import asyncio
import gc
import random
import time
import tracemalloc
from collections.abc import Sequence
from typing import Any

from tether import Hub, HubConfig
from tether.clock import SystemClock
from tether.metrics import HubMetrics

from ._common import Result, check, cli_main, make_result, median, rate, rnd
from ._hubkit import connect_many

NAME = "metrics_overhead"
CLIENTS = 100
# A NullTransport never suspends, so a tight send loop would never let the event loop run
# (and never purge the cancelled send-timeout timers). Servers yield constantly; so do we.
YIELD_EVERY = 100
# "Flat": bounded whatever the number of events. What remains are int objects for counters
# and histogram buckets past the small-int cache: (21 + 370 + 21 per client) x 32 B at most.
FLAT = 64 * 1024


async def _throughput(metrics_enabled: bool, messages: int, workload: str) -> float:
    """Messages (deliveries) per second through a hub with NullTransports."""
    hub = Hub(HubConfig(metrics_enabled=metrics_enabled, max_queue_size=10_000))
    ids = await connect_many(hub, CLIENTS)
    payload: dict[str, Any] = {"text": "x" * 64, "n": 0}
    gc.collect()
    start = time.perf_counter()
    if workload == "broadcast":
        rounds = max(1, messages // CLIENTS)
        for n in range(rounds):
            payload["n"] = n
            await hub.broadcast(payload)
            await asyncio.sleep(0)
        done = rounds * CLIENTS
    else:
        critical = workload == "send critical"
        for n in range(messages):
            payload["n"] = n
            await hub.send(ids[n % CLIENTS], payload, critical=critical)
            if n % YIELD_EVERY == 0:
                await asyncio.sleep(0)  # let the loop run, as a server's would
        done = messages
    elapsed = time.perf_counter() - start
    await hub.shutdown(flush=False)
    return rate(done, elapsed)


def _record_events(metrics: HubMetrics, count: int, clients: list[str], rng: random.Random) -> None:
    """What the hub does per delivered message: counters (global and per client), latency."""
    counters = metrics.counters
    stats = [metrics.client(cid) for cid in clients]
    n_clients = len(stats)
    for i in range(count):
        counters.messages_sent += 1
        counters.messages_delivered += 1
        client_counters = stats[i % n_clients].counters
        client_counters.messages_sent += 1
        client_counters.messages_delivered += 1
        metrics.record_latency(rng.random() * 0.05)


def _memory_growth(checkpoints: Sequence[int]) -> list[tuple[int, int]]:
    """Bytes still allocated after recording each checkpoint's number of events."""
    rng = random.Random(1)
    metrics = HubMetrics(SystemClock())
    clients = [f"c{i}" for i in range(CLIENTS)]
    _record_events(metrics, 1_000, clients, rng)  # warm up: per-client stats exist already
    metrics.snapshot()
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        out: list[tuple[int, int]] = []
        done = 0
        for target in checkpoints:
            _record_events(metrics, target - done, clients, rng)
            done = target
            gc.collect()
            out.append((target, tracemalloc.get_traced_memory()[0] - base))
    finally:
        tracemalloc.stop()
    return out


async def _hub_memory_growth(checkpoints: Sequence[int]) -> list[tuple[int, int]]:
    """Bytes a hub (metrics on) keeps after that many sends through it."""
    hub = Hub(HubConfig(max_queue_size=10_000))
    ids = await connect_many(hub, CLIENTS)
    payload: dict[str, Any] = {"text": "x" * 64, "n": 0}
    for n in range(1_000):  # warm up
        await hub.send(ids[n % CLIENTS], payload)
    hub.metrics.snapshot()
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        out: list[tuple[int, int]] = []
        done = 0
        for target in checkpoints:
            for n in range(done, target):
                payload["n"] = n
                await hub.send(ids[n % CLIENTS], payload)
                if n % YIELD_EVERY == 0:
                    await asyncio.sleep(0)
            done = target
            gc.collect()
            out.append((target, tracemalloc.get_traced_memory()[0] - base))
    finally:
        tracemalloc.stop()
        await hub.shutdown(flush=False)
    return out


def run(quick: bool = False) -> Result:
    """Throughput ratio metrics on/off (interleaved repetitions) and memory growth."""
    repeat = 3 if quick else 9
    messages = 5_000 if quick else 50_000
    rows: list[dict[str, Any]] = []
    targets: dict[str, dict[str, Any]] = {}
    for workload in ("send", "send critical", "broadcast"):
        on: list[float] = []
        off: list[float] = []
        for rep in range(repeat):  # interleaved, alternating which goes first
            order = (True, False) if rep % 2 == 0 else (False, True)
            for enabled in order:
                value = asyncio.run(_throughput(enabled, messages, workload))
                (on if enabled else off).append(value)
        ratios = [a / b for a, b in zip(on, off, strict=True)]
        overhead = (1 - median(on) / median(off)) * 100
        rows.append(
            {
                "case": f"hub.{workload} x{CLIENTS} clients",
                "metrics_on_msg_s": rnd(median(on)),
                "metrics_off_msg_s": rnd(median(off)),
                "on/off": rnd(median(on) / median(off)),
                "on/off_pairwise_median": rnd(median(ratios)),
                "overhead_pct": rnd(overhead, 2),
            }
        )
        targets[f"cpu_overhead_pct_{workload.replace(' ', '_')}"] = check(
            overhead,
            unit="%",
            target=1.0,
            goal=1.0,
            note="1 - throughput(on)/throughput(off); noise on this machine is ~±2 %",
        )
    checkpoints = (10_000, 100_000) if quick else (10_000, 1_000_000)
    for events, grown in _memory_growth(checkpoints):
        rows.append({"case": f"HubMetrics: {events:,} events", "memory_growth_bytes": grown})
        targets[f"memory_growth_{events}_events_bytes"] = check(
            grown,
            unit="bytes",
            target=100_000 if events == 10_000 else None,
            goal=FLAT,
            note="goal 'flat': < 64 KiB whatever the number of events",
        )
    hub_points = (10_000,) if quick else (10_000, 200_000)
    for events, grown in asyncio.run(_hub_memory_growth(hub_points)):
        rows.append(
            {"case": f"Hub.send (metrics on): {events:,} sends", "memory_growth_bytes": grown}
        )
        targets[f"hub_memory_growth_{events}_sends_bytes"] = check(
            grown,
            unit="bytes",
            target=100_000 if events == 10_000 else None,
            goal=FLAT,
        )
    params = {"quick": quick, "repeat": repeat, "messages": messages, "clients": CLIENTS}
    return make_result(NAME, params, rows, targets)


def main(argv: Sequence[str] | None = None) -> None:
    cli_main(NAME, run, argv)


if __name__ == "__main__":
    main()
