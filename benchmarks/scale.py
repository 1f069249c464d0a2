"""Benchmark: N concurrent idle connections in one hub process — hub-side memory per connection
(RSS and tracemalloc, minus a raw-websockets baseline with the same N) and broadcast time to all."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from ._common import Child, Result, check, cli_main, make_result, median, raise_fd_limit, rnd

NAME = "scale"
KINDS = (("raw", "plain"), ("tether", "plain"), ("tether", "v1"))


async def _one(kind: str, mode: str, clients: int, broadcasts: int) -> dict[str, Any]:
    server = await Child.start(
        "benchmarks._scale_server", {"kind": kind, "clients": clients}, label=f"scale[{kind}]"
    )
    receivers: Child | None = None
    try:
        listening = await server.expect("listening", 60)
        url = f"ws://127.0.0.1:{listening['port']}/?client_id={{id}}"
        receivers = await Child.start(
            "benchmarks._receiver",
            {
                "url": url,
                "clients": clients,
                "mode": mode,
                "prefix": "r",
                "connect_parallelism": 128,
            },
            label=f"receivers[{kind}/{mode}]",
        )
        await receivers.expect("ready", 900)
        measured = await server.expect("measured", 900)
        times: list[float] = []
        calls: list[float] = []
        for _ in range(broadcasts):
            receivers.send({"cmd": "arm", "expect": 1})
            await receivers.expect("armed", 30)
            server.send({"cmd": "broadcast"})
            sent = await server.expect("sent", 120)
            done = await receivers.expect("done", 120)
            if done.get("timeout"):
                raise RuntimeError(f"broadcast reached {done['received']} of {clients}")
            times.append(float(done["t_last"]) - float(sent["t0"]))
            calls.append(float(sent["call_s"]))
        return {
            "rss_delta": measured["rss_delta"],
            "traced_delta": measured["traced_delta"],
            "broadcast_to_last_arrival_ms": median(times) * 1000,
            "broadcast_call_ms": median(calls) * 1000,
        }
    finally:
        if receivers is not None:
            await receivers.close()
        await server.close()


def run(quick: bool = False) -> Result:
    """Memory per idle connection and time to broadcast one message to all of them."""
    raise_fd_limit()
    clients = 500 if quick else 10_000
    broadcasts = 3 if quick else 5
    figures: dict[str, dict[str, Any]] = {}
    for kind, mode in KINDS:
        figures[f"{kind}/{mode}"] = asyncio.run(_one(kind, mode, clients, broadcasts))
    raw = figures["raw/plain"]
    rows: list[dict[str, Any]] = []
    targets: dict[str, dict[str, Any]] = {}
    for key, fig in figures.items():
        extra_traced = (fig["traced_delta"] - raw["traced_delta"]) / clients
        extra_rss = (fig["rss_delta"] - raw["rss_delta"]) / clients
        rows.append(
            {
                "case": "raw websockets" if key == "raw/plain" else f"tether {key.split('/')[1]}",
                "connections": clients,
                "rss_KB_per_conn": rnd(fig["rss_delta"] / clients / 1024),
                "traced_KB_per_conn": rnd(fig["traced_delta"] / clients / 1024),
                "extra_rss_KB_per_conn": None if key == "raw/plain" else rnd(extra_rss / 1024),
                "extra_traced_KB_per_conn": None
                if key == "raw/plain"
                else rnd(extra_traced / 1024),
                "broadcast_call_ms": rnd(fig["broadcast_call_ms"]),
                "broadcast_to_last_arrival_ms": rnd(fig["broadcast_to_last_arrival_ms"]),
            }
        )
        if key != "raw/plain":
            targets[f"extra_KB_per_connection_{key.replace('/', '_')}"] = check(
                max(extra_traced, extra_rss) / 1024,
                unit="KB",
                goal=20.0,
                note="max of RSS and tracemalloc deltas over the raw-websockets baseline",
            )
    params = {
        "quick": quick,
        "connections": clients,
        "broadcasts": broadcasts,
        "processes": "server and receivers each in their own process; one fresh server per case",
    }
    return make_result(NAME, params, rows, targets)


def main(argv: Sequence[str] | None = None) -> None:
    cli_main(NAME, run, argv)


if __name__ == "__main__":
    main()
