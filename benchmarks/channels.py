"""Benchmark: channel publish fan-out over loopback sockets vs raw `websockets` broadcast(), and
the Redis and SQLite channel stores vs the memory one (one append per publish, whatever the
subscribers; on SQLite each publish is committed to the file before it is handed out)."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tether import Hub, HubConfig

from ._common import Result, check, cli_main, make_result, raise_fd_limit, rnd
from ._servers import HOST, BenchServer, RawServer, bench_hub_config, measure, payload

NAME = "channels"
CHANNEL = "bench"

RAW_BROADCAST = "raw websockets broadcast()"
MEMORY = "tether channel (memory)"
REDIS = "tether channel (redis)"
SQLITE = "tether channel (sqlite)"


class ChannelServer(BenchServer):
    """Tether through `tether.transports.websockets.serve`; receivers subscribe to one channel
    and every message is one `hub.publish`."""

    receiver_mode = "channel"
    receiver_options = {"channel": CHANNEL}  # noqa: RUF012

    def __init__(self, *, redis: bool = False, sqlite: bool = False, clients_hint: int) -> None:
        super().__init__()
        self.name = REDIS if redis else SQLITE if sqlite else MEMORY
        values = bench_hub_config(clients_hint).model_dump(exclude_unset=True)
        self.prefix = f"bench-{uuid.uuid4().hex[:10]}"
        if redis:
            values.update(backend="redis", redis_prefix=self.prefix)
        self.workdir: Path | None = None
        if sqlite:  # a fresh file in the system temp directory, removed at stop
            self.workdir = Path(tempfile.mkdtemp(prefix="tether-bench-channels-"))
            values.update(backend="sqlite", sqlite_path=str(self.workdir / "tether.db"))
        self.redis = redis
        self.hub = Hub(HubConfig(**values))
        self.server: Any = None
        self.statuses: dict[str, int] = {}

    async def start(self) -> None:
        from tether.transports.websockets import serve

        await self.hub.start()
        self.server = await serve(self.hub, HOST, 0)
        self.port = self.server.sockets[0].getsockname()[1]

    def connected(self) -> int:
        return len(self.hub.channels.subscribers(CHANNEL))

    async def send_round(self, first: int, messages: int) -> None:
        hub = self.hub
        for n in range(first, first + messages):
            result = await hub.publish(CHANNEL, payload(n))
            if result.status.value != "published":
                self.statuses[result.status.value] = self.statuses.get(result.status.value, 0) + 1
            await asyncio.sleep(0)  # as an app producing messages would (and raw broadcast does)

    def stats(self) -> dict[str, Any]:
        return {"non_sent_results": dict(self.statuses), **self.hub.channels.to_dict()}

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        await self.hub.shutdown(flush=False)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if self.redis:
            import redis.asyncio as aioredis

            client = aioredis.Redis.from_url(self.hub.config.redis_url)
            try:
                keys = [k async for k in client.scan_iter(match=f"{self.prefix}:*")]
                if keys:
                    await client.delete(*keys)
            finally:
                await client.aclose()


async def _run(clients: int, messages: int, repeat: int) -> dict[str, dict[str, Any]]:
    servers: list[BenchServer] = [
        RawServer("broadcast"),
        ChannelServer(redis=False, clients_hint=clients),
        ChannelServer(redis=True, clients_hint=clients),
        ChannelServer(sqlite=True, clients_hint=clients),
    ]
    try:
        for server in servers:
            await server.start()
        return await measure(servers, clients, messages, repeat)
    finally:
        for server in servers:
            await server.close()


def plan(quick: bool) -> tuple[list[tuple[int, int]], int]:
    """(subscribers, messages) cases and repetitions."""
    if quick:
        return [(100, 20)], 1
    return [(100, 300), (1_000, 40)], 5


def run(quick: bool = False) -> Result:
    """Deliveries/s until the last message arrived; ratios to raw broadcast() and to memory."""
    raise_fd_limit()
    cases, repeat = plan(quick)
    rows: list[dict[str, Any]] = []
    targets: dict[str, dict[str, Any]] = {}
    for clients, messages in cases:
        figures = asyncio.run(_run(clients, messages, repeat))
        raw = figures[RAW_BROADCAST]
        memory = figures[MEMORY]
        for name, fig in figures.items():
            rows.append(
                {
                    "case": name,
                    "subscribers": clients,
                    "messages": messages,
                    "deliveries_per_s": rnd(fig["deliveries_per_s"]),
                    "x_raw_broadcast": rnd(fig["deliveries_per_s"] / raw["deliveries_per_s"]),
                    "x_memory": rnd(fig["deliveries_per_s"] / memory["deliveries_per_s"]),
                    "server_cpu_us_per_delivery": rnd(fig["server_cpu_us_per_delivery"]),
                    "not_published": sum(fig["stats"].get("non_sent_results", {}).values())
                    if fig["stats"]
                    else None,
                }
            )
        targets[f"channel_vs_raw_broadcast_{clients}_subscribers"] = check(
            memory["deliveries_per_s"] / raw["deliveries_per_s"],
            unit="x",
            goal=0.8,
            higher_is_better=True,
        )
        targets[f"redis_vs_memory_{clients}_subscribers"] = check(
            figures[REDIS]["deliveries_per_s"] / memory["deliveries_per_s"],
            unit="x",
            goal=0.5,
            higher_is_better=True,
        )
    params = {
        "quick": quick,
        "repeat": repeat,
        "cases": [{"subscribers": c, "messages": m} for c, m in cases],
        "payload": "JSON object ~90 bytes, text frames, no compression",
        "receivers": "one separate process, websockets clients subscribed to one channel",
        "measured": "first publish -> last arrival at the receivers (CLOCK_MONOTONIC)",
        "redis": "one local server; one script call per publish",
        "sqlite": "a file in the system temp directory, synchronous=NORMAL (the default); "
        "one writer operation per publish, committed before it is handed out",
    }
    return make_result(NAME, params, rows, targets)


def main(argv: Sequence[str] | None = None) -> None:
    cli_main(NAME, run, argv)


if __name__ == "__main__":
    main()
