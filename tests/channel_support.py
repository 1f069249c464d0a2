"""Helpers for the channel tests: a TCP proxy that cuts links on demand, and a served hub."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

from websockets.asyncio.server import Server, serve

from tether import Hub
from tether.transports import websockets as tw


@dataclass
class Served:
    url: str
    port: int
    handler: tw.Handler
    server: Server


@contextlib.asynccontextmanager
async def ws_server(hub: Hub) -> AsyncIterator[Served]:
    """`hub` served by the `websockets` adapter on a free loopback port."""
    handler = tw.handler(hub)
    async with serve(handler, "127.0.0.1", 0, **tw.server_options(hub)) as server:
        port = server.sockets[0].getsockname()[1]
        yield Served(f"ws://127.0.0.1:{port}", port, handler, server)


class CuttingProxy:
    """A TCP proxy in front of one upstream port. `cut()` aborts every open link (both
    sides, no close handshake); while `down`, new connections are refused at once."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.down = False
        self.cuts = 0
        self.links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"ws://127.0.0.1:{port}"

    async def __aenter__(self) -> CuttingProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def cut(self) -> int:
        """Abort every open link; returns how many were cut."""
        links = list(self.links)
        self.links.clear()
        for downstream, upstream in links:
            downstream.transport.abort()
            upstream.transport.abort()
        if links:
            self.cuts += 1
        return len(links)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.transport.abort()
            return
        link = (writer, up_writer)
        self.links.add(link)
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.ensure_future(self._pipe(source, sink, link))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        link: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
    ) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self.links.discard(link)
            for writer in link:
                writer.transport.abort()


async def silent_v1(port: int, frames: list[str]) -> asyncio.StreamWriter:
    """A tether.v1 connection that sends `frames` and then never reads again (a peer gone
    silent, its close handshake never answered): the server still has its frames queued
    after it was replaced. Close the returned writer to end it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: tether.v1\r\n\r\n"
        ).encode()
    )
    await reader.readuntil(b"\r\n\r\n")
    for text in frames:
        payload = text.encode()
        assert len(payload) < 126
        mask = os.urandom(4)
        writer.write(
            bytes([0x81, 0x80 | len(payload)])
            + mask
            + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        )
    await writer.drain()
    return writer
