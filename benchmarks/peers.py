"""Benchmark: the same fan-out workload through peer libraries — python-socketio (emit to a room)
and fastapi-websocket-stabilizer (broadcast) — side by side with Tether in the same run."""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Sequence
from typing import Any

from ._common import Result, check, cli_main, make_result, raise_fd_limit, rnd
from ._servers import (
    BenchServer,
    RawServer,
    SocketIOServer,
    StabilizerServer,
    TetherServer,
    TetherStarletteServer,
    measure,
)

NAME = "peers"
CRITICAL = "tether v1 critical+acks"


def available() -> dict[str, bool]:
    return {
        "python-socketio": importlib.util.find_spec("socketio") is not None
        and importlib.util.find_spec("aiohttp") is not None,
        "fastapi-websocket-stabilizer": importlib.util.find_spec("fastapi_websocket_stabilizer")
        is not None,
    }


def _servers(clients: int, have: dict[str, bool]) -> list[BenchServer]:
    servers: list[BenchServer] = [
        RawServer("send"),
        TetherServer(critical=False, clients_hint=clients),
        TetherServer(critical=True, clients_hint=clients),
        TetherStarletteServer(critical=False, clients_hint=clients),
        TetherStarletteServer(critical=True, clients_hint=clients),
    ]
    if have["python-socketio"]:
        servers.append(SocketIOServer())
    if have["fastapi-websocket-stabilizer"]:
        servers.append(StabilizerServer())
    return servers


async def _fanout(clients: int, messages: int, repeat: int) -> dict[str, dict[str, Any]]:
    servers = _servers(clients, available())
    try:
        for server in servers:
            await server.start()
        return await measure(servers, clients, messages, repeat)
    finally:
        for server in servers:
            await server.close()


def run(quick: bool = False) -> Result:
    """Deliveries/s for each library on one fan-out workload, measured in one run."""
    raise_fd_limit()
    have = available()
    cases = [(100, 20)] if quick else [(100, 200), (1_000, 30)]
    repeat = 1 if quick else 5
    rows: list[dict[str, Any]] = []
    targets: dict[str, dict[str, Any]] = {}
    for clients, messages in cases:
        figures = asyncio.run(_fanout(clients, messages, repeat))
        raw = figures["raw websockets send"]["deliveries_per_s"]
        critical = figures[CRITICAL]["deliveries_per_s"]
        for name, fig in figures.items():
            rows.append(
                {
                    "case": name,
                    "clients": clients,
                    "msgs_per_client": messages,
                    "deliveries_per_s": rnd(fig["deliveries_per_s"]),
                    "x_raw_send": rnd(fig["deliveries_per_s"] / raw),
                    "server_cpu_us_per_delivery": rnd(fig["server_cpu_us_per_delivery"]),
                }
            )
        for peer in ("python-socketio emit(room)", "fastapi-websocket-stabilizer broadcast"):
            if peer in figures:
                targets[f"critical_acks_vs_{peer.split()[0]}_{clients}_clients"] = check(
                    critical / figures[peer]["deliveries_per_s"],
                    unit="x",
                    goal=1.0,
                    higher_is_better=True,
                    note="Tether v1 critical+acks (websockets adapter) / peer best-effort",
                )
    params = {
        "quick": quick,
        "repeat": repeat,
        "cases": [{"clients": c, "messages_per_client": m} for c, m in cases],
        "peers_installed": have,
        "socketio": "AsyncServer(async_mode=aiohttp), receivers speak Engine.IO v4 over websocket",
        "stabilizer": "FastAPI on uvicorn (ws=websockets, no deflate), broadcast(str)",
    }
    return make_result(NAME, params, rows, targets)


def main(argv: Sequence[str] | None = None) -> None:
    cli_main(NAME, run, argv)


if __name__ == "__main__":
    main()
