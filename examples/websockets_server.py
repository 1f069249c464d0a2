"""A `websockets` server with a Tether hub. Run: python examples/websockets_server.py [--port N]

Every second it sends a critical "tick" to every client that has connected, so a
client that drops and comes back (examples/python_client.py) gets every tick, in
order, exactly once. Plain clients work too: `python -m websockets
ws://127.0.0.1:8765/?client_id=bob` shows the ticks as JSON text. Whatever a client
publishes is printed and echoed back to it.

Ctrl-C or SIGTERM (a deploy, `docker stop`, systemd) stops it the way `tether serve`
stops: pending messages are flushed first, clients are closed with 1001 "going away"
(they reconnect elsewhere and resume), and the shutdown statistics are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
from typing import Any

from tether import Hub, HubConfig
from tether.transports.websockets import serve


def stop_on_signals() -> asyncio.Event:
    """An event set by the first SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # Windows: Ctrl-C still works
            loop.add_signal_handler(sig, stop.set)
    return stop


async def tick(hub: Hub) -> None:
    n = 0
    while True:
        await asyncio.sleep(1)
        n += 1
        result = await hub.broadcast({"tick": n}, critical=True)
        print(f"tick {n}: sent {result.sent}, queued {result.queued}", flush=True)


async def main(host: str, port: int) -> None:
    hub = Hub(HubConfig())

    @hub.on_message
    async def on_message(client_id: str, data: Any) -> None:
        print(f"{client_id} says {data!r}", flush=True)
        await hub.send(client_id, {"echo": data}, critical=True)

    stop = stop_on_signals()
    await hub.start()
    async with serve(hub, host, port):
        print(f"serving tether.v1 and plain WebSockets on ws://{host}:{port}/", flush=True)
        ticker = asyncio.create_task(tick(hub))
        await stop.wait()
        ticker.cancel()
        print("Shutting down: flushing pending messages…", flush=True)
        # the hub first (it flushes and closes clients with 1001), then the listener
        stats = await hub.shutdown()
    print("shutdown stats: " + json.dumps(stats.to_dict()), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    asyncio.run(main(args.host, args.port))
