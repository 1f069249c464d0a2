"""Receiver process for the socket benchmarks: N loopback WebSocket clients that count messages.

Started by `Child.start("benchmarks._receiver", config)`; speaks JSON lines:

    config (argv[1]): {"url", "clients", "mode": plain|v1|channel|socketio, "prefix", ...}
    -> {"event": "ready", "connected": N}
    <- {"cmd": "arm", "expect": M}          every client will receive M messages
    -> {"event": "armed"}
    -> {"event": "done", "t_last": <CLOCK_MONOTONIC of the last arrival>, "received": ...}
    <- {"cmd": "exit"}

Modes: `plain` counts every frame; `v1` speaks tether.v1 through `protocol.ClientProtocol`
and acks cumulatively like `tether.Client` (every 64 messages or 50 ms); `channel` says
hello, subscribes to `config["channel"]` and counts `pub` frames; `socketio` is a
minimal Engine.IO v4 / Socket.IO v5 websocket client (answers pings, counts events), so the
peer's server is measured, not a heavier client library.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from benchmarks._common import emit, next_command, raise_fd_limit, read_commands
from tether import protocol


class Counter:
    """Shared by every connection: arrivals of the current round."""

    def __init__(self) -> None:
        self.expected = 0
        self.received = 0
        self.t_last = 0.0
        self.done = asyncio.Event()
        self.armed = False

    def arm(self, expected: int) -> None:
        self.expected = expected
        self.received = 0
        self.t_last = 0.0
        self.done = asyncio.Event()
        self.armed = True

    def hit(self, n: int = 1) -> None:
        self.received += n
        if self.armed and self.received >= self.expected:
            self.t_last = time.monotonic()
            self.armed = False
            self.done.set()


async def _plain(ws: ClientConnection, counter: Counter) -> None:
    with contextlib.suppress(ConnectionClosed):
        while True:
            await ws.recv()
            counter.hit()


class V1Conn:
    def __init__(self, ws: ClientConnection, cp: protocol.ClientProtocol) -> None:
        self.ws = ws
        self.cp = cp


async def _v1(conn: V1Conn, counter: Counter) -> None:
    cp, ws = conn.cp, conn.ws
    with contextlib.suppress(ConnectionClosed):
        while True:
            raw = await ws.recv()
            now = time.monotonic()
            got = 0
            for event in cp.receive(raw, now):
                if isinstance(event, protocol.Received):
                    got += 1
            ack = cp.ack_due(now)
            if ack is not None:
                await ws.send(ack)
            if got:
                counter.hit(got)


async def _ack_ticker(conns: list[V1Conn], interval: float) -> None:
    """The time-based half of cumulative acks (tether.Client acks after `ack_interval`)."""
    while True:
        await asyncio.sleep(interval)
        now = time.monotonic()
        for conn in conns:
            ack = conn.cp.ack_due(now)
            if ack is not None:
                with contextlib.suppress(ConnectionClosed):
                    await conn.ws.send(ack)


async def _channel(ws: ClientConnection, counter: Counter) -> None:
    """Count `pub` frames of a tether.v1 channel subscription (no parsing: like `_plain`)."""
    with contextlib.suppress(ConnectionClosed):
        while True:
            raw = await ws.recv()
            if isinstance(raw, str) and raw.startswith('{"type":"pub"'):
                counter.hit()


async def _socketio(ws: ClientConnection, counter: Counter) -> None:
    with contextlib.suppress(ConnectionClosed):
        while True:
            packet = await ws.recv()
            if isinstance(packet, bytes):
                continue
            if packet.startswith("42"):
                counter.hit()
            elif packet == "2":  # Engine.IO ping: answer pong
                await ws.send("3")


async def _open(config: dict[str, Any], index: int) -> tuple[ClientConnection, Any]:
    mode = config["mode"]
    client_id = f"{config.get('prefix', 'r')}{index}"
    url = config["url"].replace("{id}", client_id)
    options: dict[str, Any] = {
        "compression": None,
        "ping_interval": None,
        "max_size": None,
        "open_timeout": 60,
        "close_timeout": 2,
    }
    if mode in ("v1", "channel"):
        ws = await connect(url, subprotocols=[Subprotocol("tether.v1")], **options)
        cp = protocol.ClientProtocol(client_id, ack_every=64, ack_interval=0.05)
        await ws.send(cp.hello())
        events = cp.receive(await ws.recv(), time.monotonic())
        if not any(isinstance(e, protocol.Welcomed) for e in events):
            raise RuntimeError(f"no welcome for {client_id}: {events!r}")
        if mode == "channel":
            await ws.send(cp.subscribe(str(config["channel"])))
            answer = cp.receive(await ws.recv(), time.monotonic())
            if not any(isinstance(e, protocol.Subscribed) for e in answer):
                raise RuntimeError(f"not subscribed: {client_id}: {answer!r}")
        return ws, V1Conn(ws, cp)
    ws = await connect(url, **options)
    if mode == "socketio":
        opening = await ws.recv()
        assert isinstance(opening, str) and opening.startswith("0"), opening
        await ws.send("40")  # connect to the default namespace
        while True:
            answer = await ws.recv()
            if isinstance(answer, str) and answer.startswith("40"):
                break
            if answer == "2":
                await ws.send("3")
    return ws, None


async def main(config: dict[str, Any]) -> None:
    raise_fd_limit()
    commands = await read_commands()
    counter = Counter()
    n = int(config["clients"])
    parallel = asyncio.Semaphore(int(config.get("connect_parallelism", 64)))

    async def opened(i: int) -> tuple[ClientConnection, Any]:
        async with parallel:
            return await _open(config, i)

    try:
        pairs = await asyncio.gather(*(opened(i) for i in range(n)))
    except Exception as exc:
        emit({"error": f"connecting: {exc!r}"})
        return
    mode = config["mode"]
    tasks: list[asyncio.Task[None]] = []
    v1conns: list[V1Conn] = []
    for ws, extra in pairs:
        if mode == "v1":
            v1conns.append(extra)
            tasks.append(asyncio.create_task(_v1(extra, counter)))
        elif mode == "socketio":
            tasks.append(asyncio.create_task(_socketio(ws, counter)))
        elif mode == "channel":
            tasks.append(asyncio.create_task(_channel(ws, counter)))
        else:
            tasks.append(asyncio.create_task(_plain(ws, counter)))
    if v1conns:
        tasks.append(asyncio.create_task(_ack_ticker(v1conns, 0.05)))
    emit({"event": "ready", "connected": len(pairs)})
    timeout = float(config.get("timeout", 300))
    try:
        while True:
            command = await next_command(commands, timeout=3600)
            if command.get("cmd") == "arm":
                counter.arm(int(command["expect"]) * n)
                emit({"event": "armed"})
                try:
                    await asyncio.wait_for(counter.done.wait(), timeout)
                    emit({"event": "done", "t_last": counter.t_last, "received": counter.received})
                except TimeoutError:
                    emit(
                        {
                            "event": "done",
                            "timeout": True,
                            "t_last": time.monotonic(),
                            "received": counter.received,
                        }
                    )
            elif command.get("cmd") == "stats":
                emit({"event": "stats", "received": counter.received})
            else:
                break
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*(ws.close() for ws, _ in pairs), return_exceptions=True)


def entry() -> None:
    config = json.loads(sys.argv[1])
    if config.get("uvloop", True):
        try:
            import uvloop
        except ImportError:
            asyncio.run(main(config))
        else:
            uvloop.run(main(config))
    else:
        asyncio.run(main(config))


if __name__ == "__main__":
    entry()
