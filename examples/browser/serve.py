"""The browser example's server. Run from the repo root: python examples/browser/serve.py [--port N]

Then open http://127.0.0.1:8000/ (the page, examples/browser/index.html, uses the JS
client served at /static/tether.js). Every second the server sends a numbered critical
message to every client that has connected, and it echoes back whatever the page
publishes; drop the connection from the page, stop this server's network with the
browser's devtools ("Offline"), or reload the page: the page gets every number once, in
order, or is told exactly which ones were lost. The dashboard is at
http://127.0.0.1:8000/dashboard.

Ctrl-C or SIGTERM stops it the way `tether serve` stops: pending messages are flushed,
the page is closed with 1001 "going away" (it reconnects when the server is back), and
the shutdown statistics are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from tether import Hub, HubConfig
from tether.monitoring import BackgroundServer, create_app

PAGE = Path(__file__).resolve().parent / "index.html"
log = logging.getLogger("tether.example")


async def page(request: Request) -> Response:
    return FileResponse(PAGE, headers={"Cache-Control": "no-store"})


async def tick(hub: Hub) -> None:
    """Send each known client its next number, critical: it waits in the outbox while the
    client is away (up to the message TTL) and is delivered, in order, when it is back."""
    numbers: dict[str, int] = {}
    while True:
        await asyncio.sleep(1.0)
        for client_id in hub.clients():
            n = numbers[client_id] = numbers.get(client_id, 0) + 1
            result = await hub.send(client_id, {"n": n, "text": f"tick {n}"}, critical=True)
            log.debug("tick %d to %s: %s", n, client_id, result.status.value)


def stop_on_signals() -> asyncio.Event:
    """An event set by the first SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # Windows: Ctrl-C still works
            loop.add_signal_handler(sig, stop.set)
    return stop


async def main(port: int) -> None:
    hub = Hub(HubConfig(message_ttl=60.0))  # a tick older than a minute is reported as lost

    @hub.on_message
    async def echo(client_id: str, data: Any) -> None:
        """The page's Publish box: say back what it published, as a critical message."""
        text = data.get("text") if isinstance(data, dict) else data
        await hub.send(client_id, {"text": f"you said: {text}"}, critical=True)

    app = create_app(hub)
    app.router.routes.insert(0, Route("/", page, methods=["GET"]))  # the page instead of the
    # dashboard redirect; /ws, /static/tether.js, /favicon.ico and /dashboard come from create_app
    server = BackgroundServer(app, "127.0.0.1", port, log_level="info")
    stop = stop_on_signals()
    await server.start()
    ticker = asyncio.create_task(tick(hub))
    print(f"open http://127.0.0.1:{server.port}/", flush=True)
    try:
        await stop.wait()
    finally:
        ticker.cancel()
        # the hub first (it flushes and closes the page with 1001), then the HTTP server
        stats = await hub.shutdown()
        await server.stop()
    print("shutdown stats: " + json.dumps(stats.to_dict()), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    logging.basicConfig(level=logging.INFO)
    asyncio.run(main(parser.parse_args().port))
