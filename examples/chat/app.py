"""A small chat on Tether channels: rooms with history and presence (FastAPI + the JS client).

Run from the repo root: python examples/chat/app.py [--port 8000], then open
http://127.0.0.1:8000/?name=alice in one tab and http://127.0.0.1:8000/?name=bob in another.

What it shows: a message said in a room is published once to the room's channel and reaches
everyone in it, in order; a page that reloads or loses its connection gets what it missed
from the channel's history (or is told how many messages are gone); who is in the room comes
from presence, kept current by join/leave events. With `TETHER_BACKEND=redis` several copies
of this app share rooms, history and presence.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse

from tether import Hub, HubConfig
from tether.transports.starlette import add_tether

PAGE = Path(__file__).resolve().parent / "index.html"
ROOM = re.compile(r"[a-z0-9-]{1,32}")
MAX_TEXT = 500

hub = Hub(HubConfig(channel_history_size=200))  # TETHER_* variables and .env apply too
app = FastAPI(title="Tether chat", lifespan=hub.lifespan)
add_tether(app, hub)  # /ws and /static/tether.js


@hub.authorize_subscribe
async def rooms_only(client_id: str, channel: str) -> bool:
    """Pages may subscribe to rooms (`room.<name>`), nothing else."""
    return channel.startswith("room.") and ROOM.fullmatch(channel[5:]) is not None


@hub.on_message
async def said(client_id: str, data: Any) -> None:
    """A page said something: {"room": ..., "text": ...} is published to the room's channel."""
    if not isinstance(data, dict):
        return
    room, text = data.get("room"), data.get("text")
    if isinstance(room, str) and ROOM.fullmatch(room) and isinstance(text, str) and text.strip():
        await hub.publish(f"room.{room}", {"from": client_id, "text": text.strip()[:MAX_TEXT]})


def channel_of(room: str) -> str:
    if ROOM.fullmatch(room) is None:
        raise HTTPException(400, "a room is 1-32 characters of a-z 0-9 -")
    return f"room.{room}"


@app.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(PAGE, headers={"Cache-Control": "no-store"})


@app.get("/rooms/{room}/history")
async def history(room: str) -> dict[str, Any]:
    """The room's epoch and recent messages: the page shows them, then subscribes from the
    last one's offset, so nothing falls between the two."""
    epoch, messages = await hub.channels.read(channel_of(room), 0, 200)
    return {"epoch": epoch, "messages": [m.to_dict() for m in messages]}


@app.get("/rooms/{room}/presence")
async def presence(room: str) -> list[str]:
    return sorted(await hub.presence(channel_of(room)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    port = parser.parse_args().port
    print(f"open http://127.0.0.1:{port}/?name=alice", flush=True)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
