"""tether.Client over real loopback sockets: delivery, acks, resume, loss, rejection, restarts."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from support import until
from tether import Hub, HubConfig, ManualClock
from tether.client import (
    Client,
    ClientState,
    Lost,
    Message,
    TetherAuthError,
    TetherConnectionError,
    TetherRejected,
)
from tether.transports import websockets as tw

FAST = {"backoff_base": 0.005, "backoff_max": 0.02}


@dataclass
class Served:
    url: str
    handler: tw.Handler
    server: Server
    gate: asyncio.Event


@contextlib.asynccontextmanager
async def ws_server(hub: Hub, port: int = 0) -> AsyncIterator[Served]:
    """A real server for `hub`; clear `gate` to hold new connections before their hello."""
    handler = tw.handler(hub)
    gate = asyncio.Event()
    gate.set()

    async def gated(ws: ServerConnection) -> None:
        await gate.wait()
        await handler(ws)

    async with serve(gated, "127.0.0.1", port, **tw.server_options(hub)) as server:
        bound = server.sockets[0].getsockname()[1]
        yield Served(f"ws://127.0.0.1:{bound}", handler, server, gate)


async def take(client: Client, n: int, timeout: float = 5.0) -> list[Message]:
    out: list[Message] = []
    async with asyncio.timeout(timeout):
        async for msg in client:
            out.append(msg)
            if len(out) == n:
                break
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# ---------------------------------------------------------------------------- delivery


async def test_receives_in_order_and_acks_on_close(hub: Hub) -> None:
    async with ws_server(hub) as srv:
        client = Client(srv.url, client_id="alice", **FAST)
        assert client.state is ClientState.CLOSED
        async with client:
            assert client.state is ClientState.CONNECTED
            for n in range(1, 21):
                await hub.send("alice", {"n": n}, critical=True, message_id=f"m{n}")
            await hub.send("alice", "fyi")
            msgs = await take(client, 21)
            assert [m.seq for m in msgs] == [*range(1, 21), None]
            assert [m.id for m in msgs[:2]] == ["m1", "m2"]
            assert msgs[0].data == {"n": 1} and msgs[-1].data == "fyi"
            assert client.received == 21 and client.duplicates == 0 and client.lost == 0
        assert client.state is ClientState.CLOSED
        await until(lambda: hub.pending("alice") == 0)  # the final ack went out on close
        async for _ in client:
            pytest.fail("a closed client yields nothing")


async def test_acks_are_batched_by_count_and_by_time(hub: Hub) -> None:
    async with ws_server(hub) as srv:
        async with Client(srv.url, client_id="batch", ack_every=10, ack_interval=60) as client:
            for n in range(25):
                await hub.send("batch", n, critical=True)
            await take(client, 25)
            await until(lambda: hub.pending("batch") == 5)  # acked 20; 5 wait for the batch
            await asyncio.sleep(0.05)
            assert hub.pending("batch") == 5
        async with Client(srv.url, client_id="timed", ack_every=1000, ack_interval=0.02) as client:
            for n in range(3):
                await hub.send("timed", n, critical=True)
            await take(client, 3)
            await until(lambda: hub.pending("timed") == 0, timeout=2)


async def test_publish_reaches_on_message(hub: Hub) -> None:
    inbound: list[tuple[str, Any]] = []

    @hub.on_message
    async def collect(client_id: str, data: Any) -> None:
        inbound.append((client_id, data))

    async with ws_server(hub) as srv, Client(srv.url, client_id="pub") as client:
        await client.publish({"hello": "server"})
        await client.publish(b"\x00bytes")
        await until(lambda: len(inbound) == 2)
    assert inbound == [("pub", {"hello": "server"}), ("pub", b"\x00bytes")]


async def test_messages_queued_before_the_first_connection_are_delivered(hub: Hub) -> None:
    for n in range(1, 4):
        await hub.send("late", n, critical=True)
    async with ws_server(hub) as srv, Client(srv.url, client_id="late") as client:
        assert [m.data for m in await take(client, 3)] == [1, 2, 3]


# ---------------------------------------------------------------------------- reconnects


async def test_reconnects_and_resumes_after_a_server_side_drop(hub: Hub) -> None:
    async with ws_server(hub) as srv, Client(srv.url, client_id="bob", **FAST) as client:
        states: list[ClientState] = []
        for n in range(1, 6):
            await hub.send("bob", n, critical=True)
        assert [m.data for m in await take(client, 5)] == [1, 2, 3, 4, 5]
        srv.gate.clear()  # hold the reconnection so messages queue meanwhile
        srv.handler.sessions["bob"].abort()
        await until(lambda: client.state is ClientState.RECONNECTING)
        states.append(client.state)
        for n in range(6, 11):
            await hub.send("bob", n, critical=True)
        srv.gate.set()
        assert [m.data for m in await take(client, 5)] == [6, 7, 8, 9, 10]
        assert client.state is ClientState.CONNECTED
        assert client.reconnects == 1 and client.lost == 0
        assert states == [ClientState.RECONNECTING]


async def test_resume_reports_expired_messages_as_lost() -> None:
    clock = ManualClock()
    hub = Hub(HubConfig(max_queue_size=100), clock=clock)
    events: list[tuple[str, Any]] = []
    async with hub, ws_server(hub) as srv:
        client = Client(srv.url, client_id="carol", ack_interval=0.005, **FAST)
        client.on_lost(lambda lost: events.append(("lost", lost)))
        async with client:
            for n in range(1, 4):
                await hub.send("carol", n, critical=True)
            assert [m.seq for m in await take(client, 3)] == [1, 2, 3]
            await until(lambda: hub.pending("carol") == 0)
            srv.gate.clear()
            srv.handler.sessions["carol"].abort()
            await until(lambda: not hub.is_connected("carol"))
            for n in range(4, 7):
                await hub.send("carol", n, critical=True, ttl=5)
            await hub.send("carol", 7, critical=True)
            clock.advance(10)
            await hub.retry_now()  # 4..6 expire while the client is away
            assert hub.pending("carol") == 1
            srv.gate.set()
            async for msg in client:
                events.append(("msg", msg.seq))
                break
            assert client.welcome is not None
            assert client.welcome.lost == 3 and client.welcome.lost_ranges == ((4, 6),)
            assert client.welcome.resumed is False
            assert events == [("lost", Lost(3, ((4, 6),), False)), ("msg", 7)]
            assert client.lost == 3


async def test_duplicates_are_dropped_and_gaps_reported() -> None:
    async def script(ws: ServerConnection, _: int) -> None:
        await ws.recv()  # hello
        await ws.send(welcome_frame(next_seq=5))
        for seq in (1, 2, 2, 1, 4):
            await ws.send(
                orjson.dumps({"type": "msg", "seq": seq, "id": f"m{seq}", "data": seq}).decode()
            )
        await ws.wait_closed()

    async with fake_server(script) as (url, _), Client(url, client_id="dup") as client:
        lost: list[Lost] = []
        client.on_lost(lost.append)
        assert [m.seq for m in await take(client, 3)] == [1, 2, 4]
        assert client.duplicates == 2
        assert lost == [Lost(1, ((3, 3),), False)] and client.lost == 1


async def test_server_restart_with_memory_backend_reports_a_reset() -> None:
    port = free_port()
    hub = Hub(HubConfig())
    resets: list[Lost] = []
    client = Client(f"ws://127.0.0.1:{port}", client_id="dan", **FAST)
    client.on_lost(resets.append)
    async with ws_server(hub, port=port):
        await client.connect()
        for n in range(1, 6):
            await hub.send("dan", n, critical=True)
        assert [m.seq for m in await take(client, 5)] == [1, 2, 3, 4, 5]
        await hub.shutdown()
    try:
        new_hub = Hub(HubConfig())
        async with new_hub, ws_server(new_hub, port=port):
            await until(lambda: new_hub.is_connected("dan"))
            await new_hub.send("dan", "after restart", critical=True)
            (msg,) = await take(client, 1)
            assert msg.data == "after restart"
            assert msg.seq == 6  # numbering continues after what the client had
            assert client.welcome is not None and client.welcome.reset is True
            assert len(resets) == 1 and resets[0].reset is True
            assert client.reconnects == 1
    finally:
        await client.close()


async def test_restart_then_messages_queued_before_the_client_is_back() -> None:
    """The new hub numbers from 1 again; the client must get them all, not skip 1..5."""
    port = free_port()
    hub = Hub(HubConfig())
    resets: list[Lost] = []
    client = Client(f"ws://127.0.0.1:{port}", client_id="eli", **FAST)
    client.on_lost(resets.append)
    async with ws_server(hub, port=port):
        await client.connect()
        for n in range(1, 6):
            await hub.send("eli", n, critical=True)
        assert [m.seq for m in await take(client, 5)] == [1, 2, 3, 4, 5]
        await hub.shutdown()
    try:
        new_hub = Hub(HubConfig())
        async with new_hub:
            for n in range(1, 8):  # more than the client's last_seq, sent while it is away
                await new_hub.send("eli", f"new {n}", critical=True)
            async with ws_server(new_hub, port=port):
                msgs = await take(client, 7)
                assert [m.data for m in msgs] == [f"new {n}" for n in range(1, 8)]
                assert [m.seq for m in msgs] == list(range(6, 13))
                assert len(resets) == 1 and resets[0].reset is True
                await until(lambda: new_hub.pending("eli") == 0)
    finally:
        await client.close()


# ---------------------------------------------------------------------------- rejection


def welcome_frame(next_seq: int = 1) -> str:
    return orjson.dumps(
        {"type": "welcome", "session": "s", "resumed": True, "next_seq": next_seq}
    ).decode()


@contextlib.asynccontextmanager
async def fake_server(
    script: Callable[[ServerConnection, int], Awaitable[None]], **options: Any
) -> AsyncIterator[tuple[str, list[int]]]:
    """A scripted tether.v1 server; yields its URL and a one-item list: connections seen."""
    seen = [0]

    async def handler(ws: ServerConnection) -> None:
        seen[0] += 1
        await script(ws, seen[0])

    options.setdefault("subprotocols", ["tether.v1"])
    async with serve(handler, "127.0.0.1", 0, **options) as server:
        yield f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}", seen


@pytest.mark.parametrize(
    ("close_code", "code"), [(1008, "invalid_client_id"), (1002, "invalid_frame")]
)
async def test_error_frame_with_policy_close_stops_retrying(close_code: int, code: str) -> None:
    async def script(ws: ServerConnection, _: int) -> None:
        await ws.recv()
        await ws.send(orjson.dumps({"type": "error", "code": code, "reason": "no"}).decode())
        await ws.close(close_code, "no")

    async with fake_server(script) as (url, seen):
        with pytest.raises(TetherRejected) as rejected:
            async with Client(url, client_id="eve", **FAST):
                pass
        assert rejected.value.code == code and rejected.value.close_code == close_code
        assert not isinstance(rejected.value, TetherAuthError)
        await asyncio.sleep(0.05)
        assert seen[0] == 1  # no retry


async def test_rejection_mid_stream_ends_the_iteration_after_buffered_messages() -> None:
    async def script(ws: ServerConnection, _: int) -> None:
        await ws.recv()
        await ws.send(welcome_frame())
        await ws.send('{"type":"msg","seq":1,"id":"a","data":"kept"}')
        await ws.send('{"type":"error","code":"unauthorized","reason":"token revoked"}')
        await ws.close(1008, "token revoked")

    async with fake_server(script) as (url, _):
        client = Client(url, client_id="fay", **FAST)
        await client.connect()
        got = []
        with pytest.raises(TetherAuthError):
            async for msg in client:
                got.append(msg.data)
        assert got == ["kept"]
        assert client.state is ClientState.CLOSED
        await client.close()


async def test_error_with_try_again_close_is_retried() -> None:
    async def script(ws: ServerConnection, attempt: int) -> None:
        await ws.recv()
        if attempt == 1:
            await ws.send('{"type":"error","code":"unavailable","reason":"busy"}')
            await ws.close(1013, "busy")
            return
        await ws.send(welcome_frame())
        await ws.send('{"type":"msg","seq":1,"id":"a","data":"ok"}')
        await ws.wait_closed()

    async with fake_server(script) as (url, seen), Client(url, client_id="gil", **FAST) as c:
        assert [m.data for m in await take(c, 1)] == ["ok"]
        assert seen[0] == 2


async def test_http_401_at_the_handshake_is_an_auth_error() -> None:
    def refuse(connection: ServerConnection, request: Request) -> Response:
        return connection.respond(401, "no\n")

    async def never(ws: ServerConnection, _: int) -> None:
        raise AssertionError("unreachable")

    async with fake_server(never, process_request=refuse) as (url, _):
        with pytest.raises(TetherAuthError):
            async with Client(url, client_id="hal", **FAST):
                pass


async def test_server_without_tether_v1_is_a_clear_error() -> None:
    async def plain(ws: ServerConnection, _: int) -> None:
        await ws.wait_closed()

    async with fake_server(plain, subprotocols=None) as (url, _):
        with pytest.raises(TetherRejected) as rejected:
            async with Client(url, client_id="ivy", **FAST):
                pass
        assert rejected.value.code == "unsupported_protocol"


async def test_gives_up_after_max_reconnect_attempts() -> None:
    client = Client(
        f"ws://127.0.0.1:{free_port()}", client_id="jo", max_reconnect_attempts=2, **FAST
    )
    with pytest.raises(TetherConnectionError, match="3 attempt"):
        await client.connect()
    assert client.state is ClientState.CLOSED
    await client.close()


def test_options_are_validated() -> None:
    with pytest.raises(ValueError):
        Client("http://not-a-websocket")
    with pytest.raises(ValueError):
        Client("ws://x", backoff_base=0)
    with pytest.raises(ValueError):
        Client("ws://x", client_id="no spaces")
    assert Client("ws://x").client_id.startswith("py-")
