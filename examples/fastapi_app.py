"""FastAPI app with a Tether hub. Run from the repo root: uvicorn examples.fastapi_app:app

Clients connect to ws://127.0.0.1:8000/ws (tether.v1, e.g. examples/python_client.py
with --url ws://127.0.0.1:8000/ws, a page importing /static/tether.js, or any plain
WebSocket client with ?client_id=alice); `curl -X POST localhost:8000/send/alice -H
'content-type: application/json' -d '{"text": "hi"}'` sends a critical message to alice,
which waits in her outbox if she is offline and is delivered, in order, when she is back.

Ctrl-C or SIGTERM: uvicorn runs the app's lifespan, which shuts the hub down gracefully
(pending messages flushed, clients closed with 1001) before the process exits.
Heartbeats come from uvicorn: --ws-ping-interval / --ws-ping-timeout (20 s by default).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Body, FastAPI

from tether import Hub, HubConfig
from tether.transports.starlette import add_tether

hub = Hub(HubConfig())  # TETHER_* variables and .env
app = FastAPI(title="Tether example", lifespan=hub.lifespan)
add_tether(app, hub)  # /ws and the browser client at /static/tether.js


@app.post("/send/{client_id}")
async def send(client_id: str, payload: Annotated[Any, Body()]) -> dict[str, Any]:
    """Send `payload` to one client as a critical message."""
    result = await hub.send(client_id, payload, critical=True)
    return result.to_dict()


@app.post("/broadcast")
async def broadcast(payload: Annotated[Any, Body()]) -> dict[str, Any]:
    """Send `payload` to every known client as a critical message."""
    result = await hub.broadcast(payload, critical=True)
    return result.to_dict()


@hub.on_message
async def on_message(client_id: str, data: Any) -> None:
    print(f"{client_id} says {data!r}")
