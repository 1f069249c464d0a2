"""Benchmark: end-to-end delivery over loopback sockets to receivers in a separate process —
raw `websockets` (send, broadcast()), Tether plain mode and tether.v1 critical with acks through
each adapter: `websockets`, Starlette (`add_tether` under uvicorn's defaults) and the `tether
serve` stack (`create_app` under Tether's uvicorn protocol classes)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from ._common import Result, check, cli_main, make_result, raise_fd_limit, rnd, run_loop
from ._servers import (
    SERVE_LABEL,
    STARLETTE_LABEL,
    BenchServer,
    RawServer,
    TetherServer,
    TetherStarletteServer,
    measure,
)

NAME = "e2e_throughput"

RAW_SEND = "raw websockets send"
RAW_BROADCAST = "raw websockets broadcast()"
PLAIN = "tether plain"
CRITICAL = "tether v1 critical+acks"
# (label suffix, target name prefix, goal plain, goal critical) per adapter
ADAPTERS = (
    ("", "", 0.85, 0.6),
    (STARLETTE_LABEL, "starlette_", 0.7, 0.5),
    (SERVE_LABEL, "serve_", 0.7, 0.5),
)


def _servers(clients: int) -> list[BenchServer]:
    return [
        RawServer("send"),
        RawServer("broadcast"),
        TetherServer(critical=False, clients_hint=clients),
        TetherServer(critical=True, clients_hint=clients),
        TetherStarletteServer(critical=False, clients_hint=clients),
        TetherStarletteServer(critical=True, clients_hint=clients),
        TetherStarletteServer(critical=False, clients_hint=clients, stack="serve"),
        TetherStarletteServer(critical=True, clients_hint=clients, stack="serve"),
    ]


async def _fanout(clients: int, messages: int, repeat: int) -> dict[str, dict[str, Any]]:
    servers = _servers(clients)
    try:
        for server in servers:
            await server.start()
        return await measure(servers, clients, messages, repeat)
    finally:
        for server in servers:
            await server.close()


def rows_for(
    clients: int, messages: int, figures: dict[str, dict[str, Any]], loop: str
) -> list[dict[str, Any]]:
    raw = figures[RAW_SEND]
    raw_b = figures[RAW_BROADCAST]
    rows = []
    for name, fig in figures.items():
        rows.append(
            {
                "case": name,
                "loop": loop,
                "clients": clients,
                "msgs_per_client": messages,
                "deliveries_per_s": rnd(fig["deliveries_per_s"]),
                "x_raw_send": rnd(fig["deliveries_per_s"] / raw["deliveries_per_s"]),
                "x_raw_broadcast": rnd(fig["deliveries_per_s"] / raw_b["deliveries_per_s"]),
                "server_cpu_us_per_delivery": rnd(fig["server_cpu_us_per_delivery"]),
                "cpu_x_raw_send": rnd(
                    fig["server_cpu_us_per_delivery"] / raw["server_cpu_us_per_delivery"]
                ),
                "dropped": fig["stats"].get("dropped") if fig["stats"] else None,
                "not_sent": sum(fig["stats"]["non_sent_results"].values())
                if fig["stats"]
                else None,
            }
        )
    return rows


def plan(quick: bool) -> tuple[list[tuple[int, int]], int]:
    """(clients, messages per client) cases and repetitions."""
    if quick:
        return [(1, 2_000), (100, 20)], 1
    return [(1, 20_000), (100, 200), (1_000, 30)], 5


def run(quick: bool = False) -> Result:
    """Deliveries/s until the last message arrived, and the ratio to raw websockets."""
    raise_fd_limit()
    cases, repeat = plan(quick)
    rows: list[dict[str, Any]] = []
    targets: dict[str, dict[str, Any]] = {}
    for clients, messages in cases:
        figures = asyncio.run(_fanout(clients, messages, repeat))
        rows.extend(rows_for(clients, messages, figures, "asyncio"))
        raw = figures[RAW_SEND]["deliveries_per_s"]
        best_raw = max(raw, figures[RAW_BROADCAST]["deliveries_per_s"])
        for label, prefix, goal_plain, goal_critical in ADAPTERS:
            targets[f"{prefix}plain_vs_raw_send_{clients}_clients"] = check(
                figures[PLAIN + label]["deliveries_per_s"] / raw,
                unit="x",
                goal=goal_plain,
                higher_is_better=True,
            )
            targets[f"{prefix}critical_acks_vs_raw_send_{clients}_clients"] = check(
                figures[CRITICAL + label]["deliveries_per_s"] / raw,
                unit="x",
                goal=goal_critical,
                higher_is_better=True,
            )
        if clients > 1:
            targets[f"plain_vs_best_raw_{clients}_clients"] = check(
                figures[PLAIN]["deliveries_per_s"] / best_raw,
                unit="x",
                goal=0.85,
                higher_is_better=True,
                note="best of send loop and broadcast()",
            )
    if not quick:  # the same fan-out with uvloop as the server's event loop
        clients, messages = 100, 200
        figures = run_loop(lambda: _fanout(clients, messages, repeat), use_uvloop=True)
        rows.extend(rows_for(clients, messages, figures, "uvloop"))
        targets["plain_vs_raw_send_100_clients_uvloop"] = check(
            figures[PLAIN]["deliveries_per_s"] / figures[RAW_SEND]["deliveries_per_s"],
            unit="x",
            goal=0.85,
            higher_is_better=True,
        )
    params = {
        "quick": quick,
        "repeat": repeat,
        "cases": [{"clients": c, "messages_per_client": m} for c, m in cases],
        "payload": "JSON object ~90 bytes, text frames, no compression",
        "receivers": "one separate process (uvloop), websockets clients; v1 acks every 64 msgs / 50 ms",
        "starlette": "add_tether on Starlette under uvicorn's WebSocket defaults; "
        "'tether serve stack': create_app under BackgroundServer (Tether's protocol classes)",
        "measured": "first send -> last arrival at the receivers (CLOCK_MONOTONIC); server CPU = process_time",
    }
    return make_result(NAME, params, rows, targets)


def main(argv: Sequence[str] | None = None) -> None:
    cli_main(NAME, run, argv)


if __name__ == "__main__":
    main()
