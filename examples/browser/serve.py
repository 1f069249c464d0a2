"""The browser example's server. Run from the repo root: python examples/browser/serve.py [--port N]

Then open http://127.0.0.1:8000/ (the page, examples/browser/index.html, uses the JS
client served at /static/tether.js). Every second the server sends a numbered critical
message to every client that has connected; drop the connection from the page, stop
this server's network with the browser's devtools ("Offline"), or reload the page: the
page gets every number once, in order, or is told exactly which ones were lost. The
dashboard is at http://127.0.0.1:8000/dashboard.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from pathlib import Path

import uvicorn
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from tether import Hub, HubConfig
from tether.monitoring import create_app

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


async def main(port: int) -> None:
    hub = Hub(HubConfig(message_ttl=60.0))  # a tick older than a minute is reported as lost
    app = create_app(hub)
    app.router.routes.insert(0, Route("/", page, methods=["GET"]))  # the page instead of the
    # dashboard redirect; /ws, /static/tether.js and /dashboard come from create_app
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="info"))
    async with hub:
        ticker = asyncio.create_task(tick(hub))
        try:
            print(f"open http://127.0.0.1:{port}/")
            await server.serve()
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    logging.basicConfig(level=logging.INFO)
    asyncio.run(main(parser.parse_args().port))
