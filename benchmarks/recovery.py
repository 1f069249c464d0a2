"""Benchmark: time for a tether.v1 client (tether.Client, separate process) to resume from its
last seq and receive a 1,000-message backlog queued while it was away."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from tether import Hub

from ._common import Child, Result, check, cli_main, free_port_server_port, make_result, median, rnd
from ._servers import HOST, bench_hub_config, payload

NAME = "recovery"


async def _wait(predicate: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.005)


async def _measure(backlog: int, rounds: int) -> list[dict[str, Any]]:
    from tether.transports.websockets import serve

    hub = Hub(bench_hub_config(100))
    await hub.start()
    server = await serve(hub, HOST, 0)
    url = f"ws://{HOST}:{free_port_server_port(server)}"
    child = await Child.start(
        "benchmarks._recovery_client",
        {"url": url, "backlog": backlog, "rounds": rounds},
        label="recovery client",
    )
    results: list[dict[str, Any]] = []
    try:
        for r in range(rounds):
            cid = f"resumer{r}"
            child.send({"cmd": "join", "client_id": cid})
            await child.expect("joined", 60)
            await hub.send(cid, payload(-1), critical=True)
            await child.expect("left", 60)
            await _wait(lambda cid=cid: not hub.is_connected(cid), 30)
            statuses: dict[str, int] = {}
            for n in range(backlog):
                result = await hub.send(cid, payload(n), critical=True)
                statuses[result.status.value] = statuses.get(result.status.value, 0) + 1
            queued = hub.pending(cid)
            child.send({"cmd": "resume"})
            resumed = await child.expect("resumed", 120)
            resumed["queued"] = queued
            resumed["statuses"] = statuses
            results.append(resumed)
    finally:
        await child.close()
        server.close()
        await server.wait_closed()
        await hub.shutdown(flush=False)
    return results


def run(quick: bool = False) -> Result:
    """Seconds from starting the resuming client to its last backlog message (median)."""
    backlog = 1_000
    rounds = 3 if quick else 9
    results = asyncio.run(_measure(backlog, rounds))
    total = [r["total_s"] for r in results]
    welcome = [r["welcome_s"] for r in results]
    rows: list[dict[str, Any]] = [
        {
            "case": f"resume + {backlog:,}-message backlog",
            "rounds": rounds,
            "median_total_ms": rnd(median(total) * 1000),
            "min_total_ms": rnd(min(total) * 1000),
            "median_connect_to_welcome_ms": rnd(median(welcome) * 1000),
            "backlog_msgs_per_s": rnd(backlog / (median(total) - median(welcome))),
            "received": min(r["received"] for r in results),
            "lost": sum(r["lost"] for r in results),
            "duplicates": sum(r["duplicates"] for r in results),
            "queued_before_resume": min(r["queued"] for r in results),
        }
    ]
    targets = {
        "resume_1000_backlog_ms": check(
            median(total) * 1000, unit="ms", note="no seed target; reported for the record"
        )
    }
    params = {
        "quick": quick,
        "backlog": backlog,
        "rounds": rounds,
        "client": "tether.Client (uvloop)",
    }
    return make_result(NAME, params, rows, targets)


def main(argv: Sequence[str] | None = None) -> None:
    cli_main(NAME, run, argv)


if __name__ == "__main__":
    main()
