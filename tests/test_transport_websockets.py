"""The `websockets` adapter over real loopback sockets: plain mode, tether.v1, errors, stalls."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import Server, serve

from support import closed_with, hello, recv_json, until
from tether import Hub, HubConfig, ManualClock, SendStatus
from tether.client import Client, TetherAuthError
from tether.transports import websockets as tw
from tether.transports.connection import ConnectionInfo

V1 = ["tether.v1"]


@dataclass
class Served:
    url: str
    handler: tw.Handler
    server: Server


@contextlib.asynccontextmanager
async def ws_server(hub: Hub, **options: Any) -> AsyncIterator[Served]:
    handler = tw.handler(hub, authenticate=options.pop("authenticate", None))
    async with serve(handler, "127.0.0.1", 0, **{**tw.server_options(hub), **options}) as server:
        port = server.sockets[0].getsockname()[1]
        yield Served(f"ws://127.0.0.1:{port}", handler, server)


@pytest.fixture
def hub_config() -> HubConfig:
    return HubConfig(max_message_size=4096, hello_timeout=0.3)


# ---------------------------------------------------------------------------- plain mode


async def test_plain_client_receives_sends_and_broadcasts(hub: Hub) -> None:
    inbound: list[tuple[str, Any]] = []

    @hub.on_message
    async def collect(client_id: str, data: Any) -> None:
        inbound.append((client_id, data))

    async with ws_server(hub) as srv, connect(srv.url + "/?client_id=bob") as bob:
        assert bob.subprotocol is None
        await until(lambda: hub.is_connected("bob"))
        assert (await hub.send("bob", "hello")).status is SendStatus.SENT
        assert (
            await hub.send("bob", {"id": "m1", "n": 1}, critical=True)
        ).status is SendStatus.SENT
        assert (await hub.send("bob", b"\x00\x01")).status is SendStatus.SENT
        result = await hub.broadcast({"all": True})
        assert result.sent == 1
        assert await bob.recv() == "hello"
        assert orjson.loads(await bob.recv()) == {"id": "m1", "n": 1}
        assert await bob.recv() == b"\x00\x01"
        assert orjson.loads(await bob.recv()) == {"all": True}
        await bob.send("from bob")
        await bob.send(b"raw")
        await until(lambda: len(inbound) == 2)
        assert inbound == [("bob", "from bob"), ("bob", b"raw")]
        assert hub.pending("bob") == 0  # plain mode: written = delivered
    await until(lambda: not hub.is_connected("bob"))


async def test_plain_client_without_id_gets_an_anonymous_one(hub: Hub) -> None:
    async with ws_server(hub) as srv, connect(srv.url) as ws:
        await until(lambda: len(srv.handler.sessions) == 1)
        (client_id,) = srv.handler.sessions
        assert client_id.startswith("anon-")
        await hub.send(client_id, "hi")
        assert await ws.recv() == "hi"


async def test_plain_oversize_frame_closes_1009_and_others_unaffected(hub: Hub) -> None:
    async with (
        ws_server(hub) as srv,
        connect(srv.url + "?client_id=a") as a,
        connect(srv.url + "?client_id=b") as b,
    ):
        await until(lambda: hub.is_connected("a") and hub.is_connected("b"))
        await a.send("x" * 5000)
        assert await closed_with(a) == 1009
        await hub.send("b", "still here")
        assert await b.recv() == "still here"


async def test_plain_invalid_client_id_is_refused_with_1008(hub: Hub) -> None:
    async with ws_server(hub) as srv, connect(srv.url + "?client_id=bad%20id") as ws:
        assert await closed_with(ws) == 1008
    assert hub.clients() == []


# ---------------------------------------------------------------------------- tether.v1


async def test_v1_welcome_msgs_acks_and_publish(hub: Hub) -> None:
    inbound: list[tuple[str, Any]] = []

    @hub.on_message
    async def collect(client_id: str, data: Any) -> None:
        inbound.append((client_id, data))

    async with ws_server(hub) as srv, connect(srv.url, subprotocols=V1) as ws:
        assert ws.subprotocol == "tether.v1"
        welcome = await hello(ws, "carol")
        assert welcome["next_seq"] == 1 and welcome["lost"] == 0
        for n in range(3):
            await hub.send("carol", {"n": n}, critical=True)
        await hub.send("carol", "best effort")
        frames = [await recv_json(ws) for _ in range(4)]
        assert [f.get("seq") for f in frames] == [1, 2, 3, None]
        assert [f["data"] for f in frames] == [{"n": 0}, {"n": 1}, {"n": 2}, "best effort"]
        assert hub.pending("carol") == 3  # unacked messages stay in the outbox
        await ws.send('{"type":"ack","seq":2}')
        await until(lambda: hub.pending("carol") == 1)
        await ws.send('{"type":"publish","data":{"q":1}}')
        await ws.send('{"type":"publish","enc":"base64","data":"AAE="}')
        await until(lambda: len(inbound) == 2)
        assert inbound == [("carol", {"q": 1}), ("carol", b"\x00\x01")]


async def test_v1_resume_resends_unacked_in_order(hub: Hub) -> None:
    async with ws_server(hub) as srv:
        async with connect(srv.url, subprotocols=V1) as ws:
            await hello(ws, "dave")
            for n in range(1, 6):
                await hub.send("dave", n, critical=True)
            assert [(await recv_json(ws))["seq"] for _ in range(5)] == [1, 2, 3, 4, 5]
            await ws.send('{"type":"ack","seq":2}')
            await until(lambda: hub.pending("dave") == 3)
        await until(lambda: not hub.is_connected("dave"))
        await hub.send("dave", 6, critical=True)
        async with connect(srv.url, subprotocols=V1) as ws:
            welcome = await hello(ws, "dave", last_seq=3)  # the client saw 3 but acked 2
            assert welcome["resumed"] is True and welcome["lost"] == 0
            assert welcome["next_seq"] == 7
            frames = [await recv_json(ws) for _ in range(3)]
            assert [(f["seq"], f["data"]) for f in frames] == [(4, 4), (5, 5), (6, 6)]


async def test_server_side_abort_detaches_and_keeps_messages(hub: Hub) -> None:
    async with ws_server(hub) as srv, connect(srv.url, subprotocols=V1) as ws:
        await hello(ws, "erin")
        await hub.send("erin", "one", critical=True)
        assert (await recv_json(ws))["seq"] == 1
        srv.handler.sessions["erin"].abort()
        await until(lambda: not hub.is_connected("erin"))
        result = await hub.send("erin", "two", critical=True)
        assert result.status is SendStatus.QUEUED
        assert hub.pending("erin") == 2  # unacked 1 and queued 2 both wait


# ---------------------------------------------------------------------------- errors

# (name, frames to send after an optional hello, expected error code, close code)
BAD_FRAMES: list[tuple[str, bool, list[str | bytes], str, int]] = [
    ("bad json before hello", False, ["{not json"], "invalid_json", 1002),
    ("bad json after hello", True, ["[1, 2"], "invalid_json", 1002),
    ("not an object", True, ["[1, 2]"], "invalid_json", 1002),
    ("unknown type", True, ['{"type":"nope"}'], "unknown_type", 1002),
    ("server frame from client", True, ['{"type":"welcome"}'], "unexpected_frame", 1002),
    ("frame before hello", False, ['{"type":"ack","seq":0}'], "hello_required", 1002),
    ("publish before hello", False, ['{"type":"publish","data":1}'], "hello_required", 1002),
    (
        "hello twice",
        True,
        ['{"type":"hello","client_id":"x","last_seq":0}'],
        "unexpected_frame",
        1002,
    ),
    ("ack beyond sent", True, ['{"type":"ack","seq":5}'], "invalid_ack", 1002),
    ("ack not an int", True, ['{"type":"ack","seq":"1"}'], "invalid_frame", 1002),
    ("publish without data", True, ['{"type":"publish"}'], "invalid_frame", 1002),
    (
        "bad hello field",
        False,
        ['{"type":"hello","client_id":"x","last_seq":-1}'],
        "invalid_frame",
        1002,
    ),
    ("bad client id", False, ['{"type":"hello","client_id":"a b"}'], "invalid_client_id", 1008),
    ("binary before hello", False, [b"\x01\x02"], "binary_not_supported", 1003),
    ("binary after hello", True, [b"{}"], "binary_not_supported", 1003),
    ("oversize", True, ['{"type":"publish","data":"' + "x" * 5000 + '"}'], "too_big", 1009),
]


@pytest.mark.parametrize(
    ("first_hello", "frames", "code", "close_code"),
    [case[1:] for case in BAD_FRAMES],
    ids=[case[0] for case in BAD_FRAMES],
)
async def test_bad_frame_gets_error_frame_and_close_code(
    hub: Hub, first_hello: bool, frames: list[str | bytes], code: str, close_code: int
) -> None:
    async with ws_server(hub) as srv, connect(srv.url, subprotocols=V1) as other:
        await hello(other, "other")
        await hub.send("other", "before", critical=True)
        assert (await recv_json(other))["seq"] == 1
        async with connect(srv.url, subprotocols=V1) as bad:
            if first_hello:
                await hello(bad, "bad")
            for frame in frames:
                await bad.send(frame)
            error = await recv_json(bad)
            assert error["type"] == "error"
            assert error["code"] == code
            assert error["reason"]
            assert await closed_with(bad) == close_code
        if first_hello:
            await until(lambda: not hub.is_connected("bad"))
        # The hub and the other client are unaffected.
        assert hub.is_connected("other")
        await hub.send("other", "after", critical=True)
        frame = await recv_json(other)
        assert (frame["seq"], frame["data"]) == (2, "after")


async def test_no_hello_within_hello_timeout(hub: Hub) -> None:
    async with ws_server(hub) as srv, connect(srv.url, subprotocols=V1) as ws:
        error = await recv_json(ws, timeout=3)
        assert (error["type"], error["code"]) == ("error", "hello_timeout")
        assert await closed_with(ws) == 1008


async def test_huge_frame_is_cut_by_the_library_with_1009(hub: Hub) -> None:
    async with ws_server(hub) as srv, connect(srv.url, subprotocols=V1, max_size=None) as ws:
        await hello(ws, "huge")
        await ws.send("x" * (4096 + 65 * 1024))
        assert await closed_with(ws) == 1009
    await until(lambda: not hub.is_connected("huge"))


async def test_invalid_ack_from_a_resumed_connection(hub: Hub) -> None:
    """Acks are checked against what this connection was sent, not the client's history."""
    async with ws_server(hub) as srv:
        async with connect(srv.url, subprotocols=V1) as ws:
            await hello(ws, "fay")
            await hub.send("fay", 1, critical=True)
            assert (await recv_json(ws))["seq"] == 1
        await until(lambda: not hub.is_connected("fay"))
        async with connect(srv.url, subprotocols=V1) as ws:
            await hello(ws, "fay", last_seq=1)
            await ws.send('{"type":"ack","seq":2}')
            error = await recv_json(ws)
            assert error["code"] == "invalid_ack"
            assert await closed_with(ws) == 1002


def _masked(first: int, payload: bytes, mask: bytes = b"\x0f\x1e\x2d\x3c") -> bytes:
    """One client frame as it goes on the wire: `first` header byte, masked payload."""
    assert len(payload) < 126
    return (
        bytes((first, 0x80 | len(payload)))
        + mask
        + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    )


def _text(text: str) -> bytes:
    return _masked(0x81, text.encode())


async def test_acks_read_in_one_chunk_with_other_frames(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Acks taken straight from the socket's bytes (no library parse) and whatever shares
    the read with them — a ping, a publish, an ack split across reads — are each handled
    once, in order; a taken ack never reaches the library's frame queue."""
    inbound: list[Any] = []
    to_library: list[str] = []
    process_event = tw.GuardedServerConnection.process_event

    def spy(self: tw.GuardedServerConnection, event: Any) -> None:
        if getattr(event, "opcode", None) is tw.Opcode.TEXT:
            to_library.append(bytes(event.data).decode())
        process_event(self, event)

    monkeypatch.setattr(tw.GuardedServerConnection, "process_event", spy)

    @hub.on_message
    async def collect(client_id: str, data: Any) -> None:
        inbound.append(data)

    # no compression: with an extension every frame takes the library's path
    async with ws_server(hub) as srv, connect(srv.url, subprotocols=V1, compression=None) as ws:
        await hello(ws, "gil")
        to_library.clear()  # the hello
        for n in range(6):
            await hub.send("gil", n, critical=True)
        assert [(await recv_json(ws))["seq"] for _ in range(6)] == [1, 2, 3, 4, 5, 6]
        ack = '{{"type":"ack","seq":{}}}'.format
        ws.transport.write(_text(ack(1)) + _text(ack(2)))
        await until(lambda: hub.pending("gil") == 4)
        assert to_library == []  # both taken from the bytes
        ping = _masked(0x89, b"hi")
        publish = '{"type":"publish","data":{"q":1}}'
        split = _text(ack(4))
        ws.transport.write(_text(ack(3)) + ping + _text(publish) + _text(ack(4))[:5])
        await until(lambda: inbound == [{"q": 1}])
        assert hub.pending("gil") == 3
        ws.transport.write(split[5:] + _text(ack(5)))
        await until(lambda: hub.pending("gil") == 1)
        assert publish in to_library
        assert ack(3) not in to_library
        await ws.send(ack(6))
        await until(lambda: hub.pending("gil") == 0)
        assert hub.is_connected("gil")
        # An invalid ack after a valid one in the same read: the valid one counts, the
        # invalid one goes the usual way and closes the connection with its error.
        await hub.send("gil", 7, critical=True)
        assert (await recv_json(ws))["seq"] == 7
        ws.transport.write(_text(ack(7)) + _text(ack(9)))
        error = await recv_json(ws)
        assert error["code"] == "invalid_ack"
        assert await closed_with(ws) == 1002
        assert hub.pending("gil") == 0


_ACK1 = b'{"type":"ack","seq":1}'


@pytest.mark.parametrize(
    ("case", "wire", "code"),
    [
        # an extension bit no extension negotiated: the library's protocol error
        ("rsv1", _masked(0xC1, _ACK1), 1002),
        # a client frame without a mask
        ("unmasked", bytes((0x81, len(_ACK1))) + _ACK1, 1002),
        # a text frame while a fragmented message is open
        ("text inside a fragment", _masked(0x01, b'{"type":') + _masked(0x81, _ACK1), 1002),
        # not UTF-8: the library refuses the text with 1007
        ("invalid utf-8", _masked(0x81, _ACK1[:-1] + b"\xff}"), 1007),
    ],
)
async def test_frames_the_library_refuses_are_refused_on_the_ack_fast_path_too(
    hub: Hub, case: str, wire: bytes, code: int
) -> None:
    """Bytes that look like an ack but break the protocol never count as one: the library
    sees them and closes as it would without the fast path."""
    async with ws_server(hub) as srv, connect(srv.url, subprotocols=V1, compression=None) as ws:
        await hello(ws, "hal")
        for n in range(2):
            await hub.send("hal", n, critical=True)
        assert [(await recv_json(ws))["seq"] for _ in range(2)] == [1, 2]
        ws.transport.write(wire)
        assert await closed_with(ws) == code, case
    assert hub.pending("hal") == 2  # nothing acknowledged


async def test_an_ack_and_a_close_in_one_read(hub: Hub) -> None:
    """The ack counts, then the close frame ends the connection as usual."""
    async with ws_server(hub) as srv, connect(srv.url, subprotocols=V1, compression=None) as ws:
        await hello(ws, "ida")
        for n in range(2):
            await hub.send("ida", n, critical=True)
        assert [(await recv_json(ws))["seq"] for _ in range(2)] == [1, 2]
        ws.transport.write(_text('{"type":"ack","seq":1}') + _masked(0x88, b"\x03\xe8"))
        assert await closed_with(ws) == 1000
    await until(lambda: not hub.is_connected("ida"))
    assert hub.pending("ida") == 1


# ---------------------------------------------------------------------------- authentication


async def test_authenticate_hook_can_refuse_and_rename(hub: Hub) -> None:
    seen: list[ConnectionInfo] = []

    async def authenticate(info: ConnectionInfo, hello_frame: Any) -> str:
        seen.append(info)
        if hello_frame is None or hello_frame.token != "secret":
            raise PermissionError("bad token")
        return "user-" + hello_frame.client_id

    async with ws_server(hub, authenticate=authenticate) as srv:
        with pytest.raises(TetherAuthError) as refused:
            async with Client(srv.url, client_id="gus", token="wrong", backoff_base=0.01):
                pass
        assert refused.value.code == "unauthorized" and refused.value.close_code == 1008
        assert hub.clients() == []
        async with Client(srv.url, client_id="gus", token="secret") as client:
            assert hub.is_connected("user-gus")
            await hub.send("user-gus", "welcome in", critical=True)
            msg = await anext(aiter(client))
            assert msg.data == "welcome in"
        assert seen[0].subprotocol == "tether.v1"


# ---------------------------------------------------------------------------- stalls


async def test_stalled_client_does_not_stop_the_others() -> None:
    """A client that stops reading is cut off by send_timeout; the others get everything."""
    hub = Hub(HubConfig(send_timeout=0.3, max_queue_size=10_000))
    payload = "x" * 16_000
    async with hub, ws_server(hub, write_limit=1024) as srv:
        # A tiny receive buffer, and max_queue=1 so the client library stops reading at
        # once: the server's writes to it soon block, like a peer that stopped reading.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, srv.server.sockets[0].getsockname())
        stalled = await connect(srv.url, subprotocols=V1, max_queue=1, sock=sock, compression=None)
        try:
            await hello(stalled, "stalled")
            async with Client(srv.url, client_id="good") as good:
                received: list[int] = []

                async def consume() -> None:
                    async for msg in good:
                        received.append(msg.data["n"])
                        if len(received) == sent:
                            return

                sent = 0
                stalled_at: int | None = None
                # No broadcast waits for the stalled client longer than send_timeout (the
                # bound adds scheduling slack): it is cut off instead.
                bound = hub.config.send_timeout + 1.0
                # Broadcast until the stalled client is cut off, then 50 more.
                while sent < 3000 and (stalled_at is None or sent < stalled_at + 50):
                    try:
                        async with asyncio.timeout(bound):
                            await hub.broadcast({"n": sent, "pad": payload}, critical=True)
                    except TimeoutError:
                        pytest.fail(f"broadcast {sent} was held up past send_timeout")
                    sent += 1
                    if stalled_at is None and not hub.is_connected("stalled"):
                        stalled_at = sent
                assert stalled_at is not None, "the stalled client was never cut off"
                await asyncio.wait_for(consume(), 10)
                assert received == list(range(sent))
                assert hub.is_connected("good")
                assert not hub.is_connected("stalled")
                assert hub.pending("stalled") >= 50  # its critical messages wait in its outbox
                assert hub.metrics.snapshot().to_dict()["connections"]["timeouts"] == 1
        finally:
            stalled.transport.abort()


# ---------------------------------------------------------------------------- heartbeats


async def test_dead_peer_is_detected_by_ping_pong() -> None:
    """A peer that never answers pings is dropped within interval + timeout."""
    hub = Hub(HubConfig(heartbeat_interval=0.1, heartbeat_timeout=0.1), clock=ManualClock())
    async with hub, ws_server(hub) as srv:
        ws = await connect(srv.url + "?client_id=zombie", ping_interval=None)
        await until(lambda: hub.is_connected("zombie"))
        ws.transport.pause_reading()  # the peer stops responding entirely (no pongs)
        # interval + timeout is 0.2 s; the bound leaves room for a loaded machine.
        try:
            await until(lambda: not hub.is_connected("zombie"), timeout=3)
        except TimeoutError:
            pytest.fail("a peer that answers no pings was still connected 3 s later")
        ws.transport.abort()
