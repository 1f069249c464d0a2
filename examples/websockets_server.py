"""A `websockets` server with a Tether hub. Run: python examples/websockets_server.py [--port N]

Every second it sends a critical "tick" to every client that has connected, so a
client that drops and comes back (examples/python_client.py) gets every tick, in
order, exactly once. Plain clients work too: `python -m websockets
ws://127.0.0.1:8765/?client_id=bob` shows the ticks as JSON text.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from typing import Any

from tether import Hub, HubConfig
from tether.transports.websockets import serve


async def main(host: str, port: int) -> None:
    hub = Hub(HubConfig())

    @hub.on_message
    async def on_message(client_id: str, data: Any) -> None:
        print(f"{client_id} says {data!r}")

    async with hub, serve(hub, host, port):
        print(f"serving tether.v1 and plain WebSockets on ws://{host}:{port}/")
        tick = 0
        while True:
            await asyncio.sleep(1)
            tick += 1
            result = await hub.broadcast({"tick": tick}, critical=True)
            print(f"tick {tick}: sent {result.sent}, queued {result.queued}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(args.host, args.port))
