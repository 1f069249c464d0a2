"""FastAPI app with a Tether hub. Run from the repo root: uvicorn examples.fastapi_app:app

Clients connect to ws://127.0.0.1:8000/ws (tether.v1, e.g. examples/python_client.py
with --url ws://127.0.0.1:8000/ws, or any plain WebSocket client with
?client_id=alice); `curl -X POST localhost:8000/send/alice -H 'content-type:
application/json' -d '{"text": "hi"}'` sends a critical message to alice, which waits
in her outbox if she is offline and is delivered, in order, when she is back.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Body, FastAPI

from tether import Hub, HubConfig
from tether.transports.starlette import websocket_route

hub = Hub(HubConfig())


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    async with hub:  # starts the retry/cleanup loops; shuts down gracefully on exit
        yield


app = FastAPI(title="Tether example", lifespan=lifespan)
# Heartbeats come from uvicorn: --ws-ping-interval / --ws-ping-timeout (20 s by default).
app.router.routes.append(websocket_route(hub, "/ws"))


@app.post("/send/{client_id}")
async def send(client_id: str, payload: Annotated[Any, Body()]) -> dict[str, Any]:
    """Send `payload` to one client as a critical message."""
    result = await hub.send(client_id, payload, critical=True)
    return {"status": result.status.value, "reason": result.reason, "seq": result.seq}


@app.post("/broadcast")
async def broadcast(payload: Annotated[Any, Body()]) -> dict[str, Any]:
    """Send `payload` to every known client as a critical message."""
    result = await hub.broadcast(payload, critical=True)
    return {"sent": result.sent, "queued": result.queued, "dropped": result.dropped}


@hub.on_message
async def on_message(client_id: str, data: Any) -> None:
    print(f"{client_id} says {data!r}")
