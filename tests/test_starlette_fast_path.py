"""The Starlette adapter's synchronous write under uvicorn, over real sockets: when it is taken,
when it is not, ordering through a full write buffer, and close/disconnect."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import fastapi
import orjson
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from support import closed_with, hello, recv_json, until
from tether import Hub, HubConfig, SendStatus
from tether.monitoring import BackgroundServer, create_app
from tether.monitoring.protocols import TetherWebSocketProtocol
from tether.transports.starlette import (
    StarletteTransport,
    UvicornStarletteTransport,
    add_tether,
    starlette_transport,
    websocket_endpoint,
)

V1 = ["tether.v1"]


class WriteSpy:
    """Records every `try_send` result and every awaited `send` of the Starlette transports."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.fast: list[bool] = []
        self.awaited = 0
        self.transports: list[StarletteTransport] = []
        fast_send = UvicornStarletteTransport.try_send
        awaited_send = StarletteTransport.send
        init = StarletteTransport.__init__
        spy = self

        def try_send(transport: UvicornStarletteTransport, data: str | bytes) -> bool:
            taken = fast_send(transport, data)
            spy.fast.append(taken)
            return taken

        async def send(transport: StarletteTransport, data: str | bytes) -> None:
            spy.awaited += 1
            await awaited_send(transport, data)

        def track(transport: StarletteTransport, websocket: WebSocket) -> None:
            init(transport, websocket)
            spy.transports.append(transport)

        monkeypatch.setattr(UvicornStarletteTransport, "try_send", try_send)
        monkeypatch.setattr(StarletteTransport, "send", send)
        monkeypatch.setattr(StarletteTransport, "__init__", track)


class WrapSend:
    """A user middleware that wraps `send` (as a logging or header middleware would)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def wrapped(message: Any) -> None:
            await send(message)

        await self.app(scope, receive, wrapped)


@contextlib.asynccontextmanager
async def served(app: Any, **options: Any) -> AsyncIterator[str]:
    """`app` under uvicorn on an ephemeral loopback port; yields the ws:// base URL."""
    options.setdefault("ws_ping_interval", None)
    async with BackgroundServer(app, log_level="warning", lifespan="off", **options) as server:
        yield server.ws_url


def starlette_app(hub: Hub) -> Starlette:
    app = Starlette()
    add_tether(app, hub, "/ws")
    return app


def fastapi_app(hub: Hub) -> fastapi.FastAPI:
    app = fastapi.FastAPI()
    app.add_api_websocket_route("/ws", websocket_endpoint(hub))
    return app


async def deliver_in_order(
    hub: Hub, url: str, count: int = 200, compression: str | None = None
) -> None:
    """Plain sends and broadcasts to one client arrive complete and in order."""
    async with connect(f"{url}/ws?client_id=bob", compression=compression) as bob:
        assert bool(bob.protocol.extensions) == (compression is not None)
        await until(lambda: hub.is_connected("bob"))
        for n in range(count):
            if n % 2:
                assert (await hub.send("bob", {"n": n})).status is SendStatus.SENT
            else:
                assert (await hub.broadcast({"n": n})).sent == 1
        got = [orjson.loads(await bob.recv())["n"] for _ in range(count)]
        assert got == list(range(count))


@pytest.mark.parametrize("make_app", [starlette_app, fastapi_app], ids=["starlette", "fastapi"])
@pytest.mark.parametrize("ws", ["auto", "websockets-sansio"])
async def test_writes_take_the_synchronous_path_under_uvicorns_default_protocol(
    monkeypatch: pytest.MonkeyPatch, make_app: Callable[[Hub], Any], ws: str
) -> None:
    spy = WriteSpy(monkeypatch)
    hub = Hub()
    async with hub, served(make_app(hub), ws=ws) as url:
        await deliver_in_order(hub, url)
    assert spy.fast == [True] * 200
    assert spy.awaited == 0
    assert [type(t) for t in spy.transports] == [UvicornStarletteTransport]


async def test_synchronous_writes_are_compressed_when_the_client_negotiated_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """uvicorn offers permessage-deflate by default; the frames go through its extension."""
    spy = WriteSpy(monkeypatch)
    hub = Hub()
    async with hub, served(starlette_app(hub)) as url:
        await deliver_in_order(hub, url, compression="deflate")
    assert spy.fast == [True] * 200


async def test_tether_serve_stack_takes_the_synchronous_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`create_app` under `BackgroundServer`: Tether's own uvicorn protocol classes."""
    spy = WriteSpy(monkeypatch)
    hub = Hub()
    async with hub:
        server = BackgroundServer(create_app(hub, start_hub=False), log_level="warning")
        assert server.config.ws.__name__ == "TetherWebSocketProtocol"  # type: ignore[union-attr]
        async with server:
            await deliver_in_order(hub, server.ws_url)
    assert spy.fast == [True] * 200
    assert spy.awaited == 0


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:The `websockets` implementation")
@pytest.mark.parametrize(
    ("ws", "middleware"),
    [("wsproto", False), ("websockets", False), ("auto", True)],
    ids=["wsproto", "legacy-websockets", "middleware-wraps-send"],
)
async def test_anything_else_keeps_the_awaited_asgi_path(
    monkeypatch: pytest.MonkeyPatch, ws: str, middleware: bool
) -> None:
    spy = WriteSpy(monkeypatch)
    hub = Hub()
    app = starlette_app(hub)
    if middleware:
        app = Starlette(routes=app.routes, middleware=[Middleware(WrapSend)])
    async with hub, served(app, ws=ws) as url:
        await deliver_in_order(hub, url)
    assert spy.fast == []
    assert spy.awaited == 200
    assert [type(t) for t in spy.transports] == [StarletteTransport]


async def test_starlette_transport_without_uvicorn_has_no_try_send() -> None:
    """A WebSocket whose `send` is not uvicorn's (another server, a test client)."""

    async def receive() -> Any:
        return {"type": "websocket.connect"}

    async def send(message: Any) -> None:
        pass

    scope = {"type": "websocket", "path": "/ws", "headers": [], "query_string": b""}
    transport = starlette_transport(WebSocket(scope, receive, send))
    assert type(transport) is StarletteTransport
    assert not hasattr(transport, "try_send")


async def stalled_client(url: str) -> ClientConnection:
    """A tether.v1 connection whose reader stops at once behind a tiny receive buffer."""
    host, port = url.removeprefix("ws://").rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    return await connect(
        f"{url}/ws",
        subprotocols=V1,
        max_queue=1,
        sock=sock,
        compression=None,  # type: ignore[list-item]
    )


async def seqs_until_closed(ws: ClientConnection, timeout: float = 10.0) -> list[int]:
    seqs: list[int] = []
    with contextlib.suppress(ConnectionClosed):
        async with asyncio.timeout(timeout):
            while True:
                frame = orjson.loads(await ws.recv())
                if frame["type"] == "msg":
                    seqs.append(frame["seq"])
    return seqs


async def test_full_write_buffer_falls_back_and_send_timeout_applies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client that stops reading: the synchronous write declines once the buffer is full,
    the awaited send then times out (`send_timeout`), the client is cut off with its
    messages kept, and on resume every message arrives exactly once, in order."""
    spy = WriteSpy(monkeypatch)
    hub = Hub(HubConfig(send_timeout=0.3, max_queue_size=10_000))
    pad = "x" * 8_000
    async with hub, served(starlette_app(hub)) as url:
        stalled = await stalled_client(url)
        try:
            await hello(stalled, "slow")
            sent = 0
            while hub.is_connected("slow"):
                assert sent < 2_000, "the stalled client was never cut off"
                result = await hub.send("slow", {"n": sent, "pad": pad}, critical=True)
                assert result.status in (SendStatus.SENT, SendStatus.QUEUED)
                sent += 1
            assert True in spy.fast and False in spy.fast  # fast, then declined
            assert spy.awaited >= 1  # the fallback ran (and timed out)
            snapshot = hub.metrics.snapshot().to_dict()
            assert snapshot["connections"]["timeouts"] == 1
            assert hub.pending("slow") == sent  # nothing acked, nothing lost
            # A few more while away: they queue behind the others.
            for n in range(sent, sent + 5):
                status = (await hub.send("slow", {"n": n, "pad": pad}, critical=True)).status
                assert status is SendStatus.QUEUED
            sent += 5
            written = await seqs_until_closed(stalled)
        finally:
            stalled.transport.abort()
        assert written == list(range(1, len(written) + 1))  # in order, no gaps
        async with connect(f"{url}/ws", subprotocols=V1, compression=None) as back:  # type: ignore[list-item]
            welcome = await hello(back, "slow", last_seq=len(written))
            assert welcome["resumed"] is True
            rest = []
            while len(written) + len(rest) < sent:
                frame = await recv_json(back)
                assert frame["type"] == "msg", frame
                rest.append((frame["seq"], frame["data"]["n"]))
            await back.send(orjson.dumps({"type": "ack", "seq": sent}).decode())
            assert rest == [(s, s - 1) for s in range(len(written) + 1, sent + 1)]
            await until(lambda: hub.pending("slow") == 0)


async def test_no_synchronous_write_after_close_or_disconnect(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spy = WriteSpy(monkeypatch)
    hub = Hub()
    async with hub, served(starlette_app(hub)) as url:
        # the server closes (hub.disconnect): nothing more is written
        async with connect(f"{url}/ws?client_id=a", compression=None) as a:
            await until(lambda: hub.is_connected("a"))
            assert (await hub.send("a", "one")).status is SendStatus.SENT
            first = spy.transports[-1]
            assert isinstance(first, UvicornStarletteTransport)
            await hub.disconnect("a")
            assert first.try_send("late") is False
            assert await a.recv() == "one"
            assert await closed_with(a) == 1000
        # the client closes: the hub notices, and the transport declines writes
        async with connect(f"{url}/ws?client_id=b", compression=None) as b:
            await until(lambda: hub.is_connected("b"))
            second = spy.transports[-1]
            await b.close()
        await until(lambda: not hub.is_connected("b"))
        assert isinstance(second, UvicornStarletteTransport)
        assert second.try_send("late") is False
        assert (await hub.send("b", "gone")).status is SendStatus.DROPPED


class _Conn:
    """The sans-I/O connection's part `try_send` uses: state, framing, bytes out."""

    def __init__(self) -> None:
        from websockets.protocol import State

        self.state = State.OPEN
        self.frames: list[bytes] = []

    def send_text(self, data: bytes) -> None:
        self.frames.append(data)

    def send_binary(self, data: bytes) -> None:
        self.frames.append(data)

    def data_to_send(self) -> list[bytes]:
        out, self.frames = self.frames, []
        return out


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closing = False

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return self.closing

    def write(self, data: bytes) -> None:
        self.written.append(data)


class _Protocol:
    def __init__(self) -> None:
        self.conn = _Conn()
        self.transport = _Transport()
        self.writable = asyncio.Event()
        self.writable.set()
        self.close_sent = False
        self.disconnected = False


async def test_a_synchronous_write_never_overtakes_an_awaited_one() -> None:
    """uvicorn's `send` waits for the buffer to drain before it writes: while one waits,
    a synchronous write would put a later frame on the wire first."""
    release = asyncio.Event()
    order: list[str] = []

    async def receive() -> Any:
        return {"type": "websocket.connect"}

    async def send(message: Any) -> None:
        await release.wait()  # uvicorn's send, waiting for `writable`
        order.append(message["text"])

    scope = {"type": "websocket", "path": "/ws", "headers": [], "query_string": b""}
    protocol = _Protocol()
    websocket = WebSocket(scope, receive, send)
    websocket.application_state = websocket.client_state = type(websocket.client_state).CONNECTED
    transport = UvicornStarletteTransport(websocket, protocol)
    assert transport.try_send("alone")
    awaited = asyncio.create_task(transport.send("first"))
    await asyncio.sleep(0)
    assert not transport.try_send("second")  # would overtake "first"
    release.set()
    await awaited
    assert order == ["first"]
    assert transport.try_send("second")
    assert protocol.transport.written == [b"alone", b"second"]


async def test_no_synchronous_write_into_a_closing_transport() -> None:
    """asyncio closes a transport whose write failed (reset) before uvicorn hears of it:
    a frame written then would be discarded yet reported written."""

    async def receive() -> Any:
        return {"type": "websocket.connect"}

    async def send(message: Any) -> None:
        pass

    scope = {"type": "websocket", "path": "/ws", "headers": [], "query_string": b""}
    protocol = _Protocol()
    transport = UvicornStarletteTransport(WebSocket(scope, receive, send), protocol)
    assert transport.try_send("a")
    protocol.transport.closing = True
    assert not transport.try_send("b")
    assert protocol.transport.written == [b"a"]


def test_the_installed_uvicorns_send_is_one_the_synchronous_write_was_checked_against() -> None:
    """Fails when a uvicorn upgrade changed the `send` that `try_send` mirrors: re-check
    `UvicornStarletteTransport.try_send` against it, then add its digest."""
    from tether.transports import starlette

    assert starlette._sansio_send() is not None


@pytest.mark.parametrize("stack", ["serve", "app-with-tether-protocol", "stock-uvicorn"])
async def test_acks_are_settled_as_they_arrive_on_the_tether_serve_stack(
    monkeypatch: pytest.MonkeyPatch, stack: str
) -> None:
    """`tether serve`'s protocol hands whole text frames to the session (an ack then costs
    no queue, task switch or read pause); stock uvicorn queues every frame for `receive`."""
    from tether.transports.connection import Session

    taken: list[bool] = []
    frame_now = Session.frame_now

    def spy(session: Session, raw: str | bytes) -> bool:
        result = frame_now(session, raw)
        taken.append(result)
        return result

    monkeypatch.setattr(Session, "frame_now", spy)
    hub = Hub()
    async with hub:
        if stack == "serve":
            context: Any = BackgroundServer(create_app(hub, start_hub=False), log_level="warning")
        elif stack == "app-with-tether-protocol":  # what docs/configuration.md suggests
            context = served(starlette_app(hub), ws=TetherWebSocketProtocol)
        else:
            context = served(starlette_app(hub))
        async with context as entered:
            url = entered.ws_url if stack == "serve" else entered
            async with connect(f"{url}/ws", subprotocols=V1) as ws:  # type: ignore[list-item]
                await hello(ws, "ann")
                for n in range(1, 31):
                    assert (await hub.send("ann", {"n": n}, critical=True)).status in (
                        SendStatus.SENT,
                        SendStatus.QUEUED,
                    )
                seqs = [(await recv_json(ws))["seq"] for _ in range(30)]
                assert seqs == list(range(1, 31))
                for seq in (10, 20, 30):
                    await ws.send(orjson.dumps({"type": "ack", "seq": seq}).decode())
                await until(lambda: hub.pending("ann") == 0)
                await ws.send(orjson.dumps({"type": "ack", "seq": 99}).decode())  # not sent
                assert await closed_with(ws) == 1002  # the session's usual answer (protocol error)
    if stack != "stock-uvicorn":
        assert taken[:3] == [True, True, True]
        assert taken[3] is False  # invalid: left to the session's receive loop
    else:
        assert taken == []
