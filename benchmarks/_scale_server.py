"""Server process for the `scale` benchmark: raw websockets or a Tether hub holding N idle
connections; reports its own memory growth (RSS, tracemalloc) and times broadcasts to all."""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import time
import tracemalloc
from typing import Any

import orjson
from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import broadcast as ws_broadcast
from websockets.asyncio.server import serve as ws_serve

from benchmarks._common import (
    emit,
    free_port_server_port,
    next_command,
    raise_fd_limit,
    read_commands,
)
from benchmarks._servers import HOST, bench_hub_config, payload
from tether import Hub
from tether.metrics import rss_bytes


async def main(config: dict[str, Any]) -> None:
    raise_fd_limit()
    kind = config["kind"]
    n = int(config["clients"])
    commands = await read_commands()
    conns: set[ServerConnection] = set()
    hub: Hub | None = None

    async def raw_handler(ws: ServerConnection) -> None:
        conns.add(ws)
        try:
            await ws.wait_closed()
        finally:
            conns.discard(ws)

    gc.collect()
    rss0 = rss_bytes()
    tracemalloc.start()
    traced0 = tracemalloc.get_traced_memory()[0]
    if kind == "raw":
        server: Any = await ws_serve(raw_handler, HOST, 0, backlog=1024)

        def connected() -> int:
            return len(conns)
    else:
        from tether.transports.websockets import serve

        hub = Hub(bench_hub_config(n))
        await hub.start()
        server = await serve(hub, HOST, 0, backlog=1024)
        ids = [f"r{i}" for i in range(n)]

        def connected() -> int:
            return sum(1 for cid in ids if hub is not None and hub.is_connected(cid))

    emit({"event": "listening", "port": free_port_server_port(server)})
    deadline = time.monotonic() + float(config.get("timeout", 600))
    while connected() < n:
        if time.monotonic() > deadline:
            emit({"error": f"only {connected()} of {n} connected"})
            return
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # let the last handshakes settle
    gc.collect()
    traced = tracemalloc.get_traced_memory()[0] - traced0
    tracemalloc.stop()
    gc.collect()
    rss = rss_bytes() - rss0
    emit({"event": "measured", "connected": connected(), "rss_delta": rss, "traced_delta": traced})
    counter = 0
    while True:
        command = await next_command(commands, timeout=3600)
        if command.get("cmd") != "broadcast":
            break
        data = payload(counter)
        counter += 1
        t0 = time.monotonic()
        if hub is not None:
            result = await hub.broadcast(data)
            sent = result.sent
        else:
            ws_broadcast(conns, orjson.dumps(data).decode())
            sent = len(conns)
        emit({"event": "sent", "t0": t0, "call_s": time.monotonic() - t0, "sent": sent})
    server.close()
    await server.wait_closed()
    if hub is not None:
        await hub.shutdown(flush=False)


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
