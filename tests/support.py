"""Helpers shared by the real-socket tests: wait for a condition, read frames, say hello."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll a condition (every ms) until it holds; fail after `timeout` seconds."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.001)


async def recv_json(ws: ClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    """The next frame, which must be a JSON object."""
    async with asyncio.timeout(timeout):
        raw = await ws.recv()
    value = orjson.loads(raw)
    assert isinstance(value, dict)
    return value


def hello_frame(client_id: str, *, token: str | None = None, last_seq: int = 0) -> str:
    frame: dict[str, Any] = {"type": "hello", "client_id": client_id, "last_seq": last_seq}
    if token is not None:
        frame["token"] = token
    return orjson.dumps(frame).decode()


async def hello(
    ws: ClientConnection, client_id: str, last_seq: int = 0, *, token: str | None = None
) -> dict[str, Any]:
    """Send a tether.v1 hello and return the welcome."""
    await ws.send(hello_frame(client_id, token=token, last_seq=last_seq))
    welcome = await recv_json(ws)
    assert welcome["type"] == "welcome", welcome
    return welcome


async def closed_with(ws: ClientConnection, timeout: float = 5.0) -> int | None:
    """Read until the server closes; returns the close code it sent."""
    with contextlib.suppress(ConnectionClosed):
        async with asyncio.timeout(timeout):
            while True:
                await ws.recv()
    return ws.close_code
