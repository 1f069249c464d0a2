"""Hardening over real loopback sockets: every limit, every auth path, slow consumers and leaks.

Each limit is hit by one connection while another client stays connected; the other
client must keep receiving (the limits are per connection, the hub is unaffected).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
import tracemalloc
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest
import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import Server
from websockets.exceptions import ConnectionClosed, InvalidStatus

from support import closed_with, hello, hello_frame, recv_json, until
from tether import Hub, HubConfig, HubUnavailable, ManualClock, SendStatus
from tether.auth import (
    sign_token,
    signed_token_authenticator,
    static_tokens,
    token_from,
    verify_token,
)
from tether.client import Client, TetherAuthError
from tether.monitoring import BackgroundServer, create_app
from tether.protocol import Hello, ProtocolError
from tether.testing import MockWebSocket
from tether.transports import websockets as tw
from tether.transports.connection import ConnectionInfo, TokenBucket, connection_counter

V1 = ["tether.v1"]
SECRET = "a-test-secret-of-32-characters!!"
NOW = 1_700_000_000.0


# ---------------------------------------------------------------------------- helpers


@dataclass
class Served:
    url: str
    server: Server


@contextlib.asynccontextmanager
async def ws_server(hub: Hub, **options: Any) -> AsyncIterator[Served]:
    """The hub served by `tether.transports.websockets.serve` on a free loopback port."""
    async with tw.serve(hub, "127.0.0.1", 0, **options) as server:
        port = server.sockets[0].getsockname()[1]
        yield Served(f"ws://127.0.0.1:{port}", server)


@contextlib.asynccontextmanager
async def asgi_server(hub: Hub, **options: Any) -> AsyncIterator[BackgroundServer]:
    """The hub's Starlette app (`/ws` and monitoring) under uvicorn on loopback."""
    app = create_app(hub, monitor_token=None, api_token=None, start_hub=False, **options)
    async with BackgroundServer(app) as server:
        yield server


async def refused(ws: ClientConnection, code: str, close_code: int) -> str:
    """Expect a tether.v1 `error` frame with `code`, then the close code; the reason."""
    error = await recv_json(ws)
    assert (error["type"], error["code"]) == ("error", code), error
    assert await closed_with(ws) == close_code
    return str(error["reason"])


async def send_quietly(ws: ClientConnection, frame: str | bytes) -> None:
    with contextlib.suppress(ConnectionClosed):
        await ws.send(frame)


class Bystander:
    """A connected tether.v1 client that must keep receiving whatever else happens."""

    def __init__(self, hub: Hub, ws: ClientConnection, client_id: str) -> None:
        self.hub, self.ws, self.client_id = hub, ws, client_id
        self.n = 0

    async def still_served(self) -> None:
        self.n += 1
        result = await self.hub.send(self.client_id, {"n": self.n}, critical=True)
        assert result.status is SendStatus.SENT, result
        frame = await recv_json(self.ws)
        assert (frame["type"], frame["seq"], frame["data"]) == ("msg", self.n, {"n": self.n})
        await self.ws.send(orjson.dumps({"type": "ack", "seq": self.n}).decode())
        assert self.hub.is_connected(self.client_id)


@contextlib.asynccontextmanager
async def bystander(hub: Hub, url: str, client_id: str = "bystander") -> AsyncIterator[Bystander]:
    async with connect(url, subprotocols=V1) as ws:
        await hello(ws, client_id)
        other = Bystander(hub, ws, client_id)
        await other.still_served()
        yield other
        await other.still_served()


def make_hub(**values: Any) -> Hub:
    values.setdefault("backend", "memory")
    return Hub(HubConfig(**values), clock=ManualClock())


# ---------------------------------------------------------------------------- limits


async def test_oversize_frame_closes_1009_v1_and_plain() -> None:
    async with make_hub(max_message_size=1024) as hub, ws_server(hub) as srv:
        async with bystander(hub, srv.url) as other:
            async with connect(srv.url, subprotocols=V1) as ws:
                await hello(ws, "big")
                await ws.send(orjson.dumps({"type": "publish", "data": "x" * 2000}).decode())
                await refused(ws, "too_big", 1009)
            async with connect(srv.url + "/?client_id=bigplain") as ws:
                await ws.send("x" * 2000)
                assert await closed_with(ws) == 1009
            await other.still_served()
        assert not hub.is_connected("big") and not hub.is_connected("bigplain")


async def test_inbound_rate_limit_closes_1008_v1_and_plain() -> None:
    received: list[Any] = []
    # 5 frames/s with a burst of 10: a flood of 60 frames is cut off after about 10.
    async with make_hub(max_inbound_rate=5) as hub, ws_server(hub) as srv:

        @hub.on_message
        async def collect(client_id: str, data: Any) -> None:
            received.append(data)

        async with bystander(hub, srv.url) as other:
            async with connect(srv.url, subprotocols=V1) as ws:
                await hello(ws, "flooder")
                for n in range(60):
                    await send_quietly(ws, orjson.dumps({"type": "publish", "data": n}).decode())
                reason = await refused(ws, "rate_limited", 1008)
                assert "5 frames per second" in reason
            # hello took one token; what got through before the cut is within the burst
            assert 5 <= len(received) <= 11, received
            received.clear()
            async with connect(srv.url + "/?client_id=plainflood") as ws:
                for n in range(60):
                    await send_quietly(ws, str(n))
                assert await closed_with(ws) == 1008
                assert ws.close_reason is not None and "frames per second" in ws.close_reason
            assert 5 <= len(received) <= 12, received
            await other.still_served()


def test_token_bucket_refills_up_to_the_burst() -> None:
    now = [0.0]
    bucket = TokenBucket(rate=2, burst=4, clock=lambda: now[0])
    assert [bucket.take() for _ in range(5)] == [True, True, True, True, False]
    now[0] = 1.0  # two more tokens
    assert [bucket.take() for _ in range(3)] == [True, True, False]
    now[0] = 100.0  # never more than the burst
    assert sum(bucket.take() for _ in range(10)) == 4


async def test_max_connections_is_shared_by_both_adapters_and_refuses_with_1013() -> None:
    async with (
        make_hub(max_connections=2) as hub,
        ws_server(hub) as srv,
        asgi_server(hub) as asgi,
        bystander(hub, srv.url) as other,
    ):
        counter = connection_counter(hub)
        async with connect(asgi.ws_url + "/ws?client_id=second") as second:
            await until(lambda: hub.is_connected("second"))
            assert counter.open == 2
            # one more, on either adapter and in either mode: "try again later"
            async with connect(srv.url, subprotocols=V1) as third:
                reason = await refused(third, "unavailable", 1013)
                assert "max_connections=2" in reason
            async with connect(asgi.ws_url + "/ws?client_id=fourth") as fourth:
                assert await closed_with(fourth) == 1013
            assert not hub.is_connected("fourth")
            await other.still_served()
            await hub.send("second", "still here")
            assert await second.recv() == "still here"
        # a freed slot is reusable
        await until(lambda: counter.open == 1)
        async with connect(srv.url + "/?client_id=later") as later:
            await until(lambda: hub.is_connected("later"))
            await hub.send("later", "in")
            assert await later.recv() == "in"


async def test_max_clients_refuses_new_ids_with_1013_and_keeps_known_ones() -> None:
    async with make_hub(max_clients=2) as hub, ws_server(hub) as srv:
        async with bystander(hub, srv.url) as other:
            async with connect(srv.url + "/?client_id=known") as ws:
                await until(lambda: hub.is_connected("known"))
            await until(lambda: not hub.is_connected("known"))
            assert sorted(hub.clients()) == ["bystander", "known"]  # both still tracked
            async with connect(srv.url, subprotocols=V1) as ws:
                await ws.send(hello_frame("newcomer"))
                reason = await refused(ws, "unavailable", 1013)
                assert "max_clients=2" in reason
            async with connect(srv.url + "/?client_id=newplain") as ws:
                assert await closed_with(ws) == 1013
            # a send to an unknown id is refused too; a known id comes back fine
            assert (await hub.send("ghost", "x", critical=True)).status is SendStatus.REJECTED
            async with connect(srv.url + "/?client_id=known") as ws:
                await until(lambda: hub.is_connected("known"))
                await hub.send("known", "back")
                assert await ws.recv() == "back"
            await other.still_served()
        assert sorted(hub.clients()) == ["bystander", "known"]


async def test_capacity_is_hub_unavailable_and_a_bad_id_is_a_value_error() -> None:
    async with make_hub(max_clients=1) as hub:
        await hub.connect("first", MockWebSocket())
        with pytest.raises(HubUnavailable, match="max_clients=1"):
            await hub.connect("second", MockWebSocket())
        with pytest.raises(HubUnavailable, match="max_clients=1"):
            hub.join("second", "room")
        with pytest.raises(ValueError, match="invalid client id") as bad:
            await hub.connect("bad id", MockWebSocket())
        assert not isinstance(bad.value, HubUnavailable)  # the caller's mistake, not capacity
        assert hub.clients() == ["first"]


@pytest.mark.parametrize("adapter", ["websockets", "starlette"])
async def test_disallowed_origin_gets_403_at_the_handshake(adapter: str) -> None:
    allowed = "https://app.example.com"
    async with contextlib.AsyncExitStack() as stack:
        hub = await stack.enter_async_context(make_hub(allowed_origins=allowed))
        if adapter == "websockets":
            url = (await stack.enter_async_context(ws_server(hub))).url + "/"
        else:
            url = (await stack.enter_async_context(asgi_server(hub))).ws_url + "/ws"
        other = await stack.enter_async_context(bystander(hub, url))
        for origin in ("https://evil.example", "http://app.example.com", "null"):
            with pytest.raises(InvalidStatus) as refusal:
                async with connect(url + "?client_id=x", origin=websockets.Origin(origin)):
                    pass
            assert refusal.value.response.status_code == 403, origin
        assert "x" not in hub.clients()
        # the allowed origin (any case) and clients without an Origin header get in
        for origin in (allowed, "HTTPS://APP.EXAMPLE.COM"):
            async with connect(url + "?client_id=app", origin=websockets.Origin(origin)) as ws:
                await until(lambda: hub.is_connected("app"))
                await hub.send("app", "hi")
                assert await ws.recv() == "hi"
            await until(lambda: not hub.is_connected("app"))
        await other.still_served()


@pytest.mark.parametrize(
    "client_id", ["bad%20id", "alice%0A", "x" * 129, "%C3%A9t%C3%A9", "a/b"], ids=repr
)
async def test_invalid_plain_client_id_is_refused_with_1008(client_id: str) -> None:
    async with make_hub() as hub, ws_server(hub) as srv, bystander(hub, srv.url) as other:
        async with connect(f"{srv.url}/?client_id={client_id}") as ws:
            assert await closed_with(ws) == 1008
        assert hub.clients() == ["bystander"]
        await other.still_served()


async def test_invalid_v1_client_id_and_hello_timeout() -> None:
    async with (
        make_hub(hello_timeout=0.3) as hub,
        ws_server(hub) as srv,
        bystander(hub, srv.url) as other,
    ):
        async with connect(srv.url, subprotocols=V1) as ws:
            await ws.send(hello_frame("x" * 129))
            await refused(ws, "invalid_client_id", 1008)
        async with connect(srv.url, subprotocols=V1) as ws:
            # says nothing: closed after hello_timeout, and its slot is freed
            await refused(ws, "hello_timeout", 1008)
        await until(lambda: connection_counter(hub).open == 1)
        await other.still_served()


# ---------------------------------------------------------------------------- authentication


def _signed(client_id: str, *, ttl: float = 3600, secret: str = SECRET) -> str:
    return sign_token(secret, client_id, expires_at=NOW + ttl)


def _tampered(token: str) -> str:
    """The token with its first character (part of the signed body) changed."""
    return ("B" if token[0] != "B" else "C") + token[1:]


@contextlib.asynccontextmanager
async def authed_server(hub: Hub) -> AsyncIterator[Served]:
    authenticate = signed_token_authenticator(SECRET, clock=lambda: NOW)
    async with ws_server(hub, authenticate=authenticate) as srv:
        yield srv


AUTH_REFUSALS: list[tuple[str, str, str | None, str, int]] = [
    # (case, hello client id, token, error code, close code)
    ("missing token", "alice", None, "unauthorized", 1008),
    ("wrong token", "alice", "not-a-token", "unauthorized", 1008),
    (
        "other secret",
        "alice",
        _signed("alice", secret="another-secret-32-characters!!!!"),
        "unauthorized",
        1008,
    ),
    ("tampered id", "mallory", _tampered(_signed("alice")), "unauthorized", 1008),
    ("expired", "alice", _signed("alice", ttl=-1), "unauthorized", 1008),
    ("another's id", "bob", _signed("alice"), "forbidden_client_id", 1008),
]


@pytest.mark.parametrize(
    ("client_id", "token", "code", "close_code"),
    [case[1:] for case in AUTH_REFUSALS],
    ids=[case[0] for case in AUTH_REFUSALS],
)
async def test_auth_refusals_v1(
    client_id: str, token: str | None, code: str, close_code: int
) -> None:
    async with (
        make_hub() as hub,
        authed_server(hub) as srv,
        connect(srv.url, subprotocols=V1) as ws,
    ):
        await hello(ws, "bob", token=_signed("bob"))  # an authenticated bystander
        other = Bystander(hub, ws, "bob")
        async with connect(srv.url, subprotocols=V1) as bad:
            await bad.send(hello_frame(client_id, token=token))
            reason = await refused(bad, code, close_code)
            assert "alice" not in reason  # a refusal never names the token's owner
        assert hub.clients() == ["bob"]
        await other.still_served()


async def test_correct_token_is_served_as_the_tokens_id_in_both_modes() -> None:
    async with make_hub() as hub, authed_server(hub) as srv:
        async with Client(srv.url, client_id="alice", token=_signed("alice")) as client:
            assert hub.is_connected("alice")
            await hub.send("alice", "for alice", critical=True)
            assert (await anext(aiter(client))).data == "for alice"
        # plain mode: bearer header or ?token=; without ?client_id= the token names it
        headers = {"Authorization": f"Bearer {_signed('carol')}"}
        async with connect(srv.url + "/", additional_headers=headers) as ws:
            await until(lambda: hub.is_connected("carol"))
            await hub.send("carol", "c")
            assert await ws.recv() == "c"
        async with connect(f"{srv.url}/?token={_signed('dan')}&client_id=dan") as ws:
            await until(lambda: hub.is_connected("dan"))
        async with connect(f"{srv.url}/?token={_signed('dan')}&client_id=erin") as ws:
            assert await closed_with(ws) == 1008
            assert ws.close_reason is not None and "does not match" in ws.close_reason
        async with connect(f"{srv.url}/?client_id=erin") as ws:
            assert await closed_with(ws) == 1008
        assert sorted(hub.clients()) == ["alice", "carol", "dan"]


async def test_client_library_reports_auth_refusal_and_stops() -> None:
    async with make_hub() as hub, authed_server(hub) as srv:
        with pytest.raises(TetherAuthError) as refusal:
            async with Client(srv.url, client_id="alice", token="garbage", backoff_base=0.01):
                pass
        assert (refusal.value.code, refusal.value.close_code) == ("unauthorized", 1008)
        assert hub.clients() == []


async def test_replayed_hello_on_the_same_connection_is_refused_1002() -> None:
    async with make_hub() as hub, authed_server(hub) as srv:
        async with connect(srv.url, subprotocols=V1) as ws:
            await hello(ws, "alice", token=_signed("alice"))
            # a second hello — even a perfectly valid one for someone else — is a violation
            await ws.send(hello_frame("bob", token=_signed("bob")))
            await refused(ws, "unexpected_frame", 1002)
        await until(lambda: not hub.is_connected("alice"))
        assert hub.clients() == ["alice"]  # never became bob


async def test_auth_secret_in_config_turns_on_signed_tokens_for_both_adapters() -> None:
    hub = Hub(HubConfig(auth_secret=SECRET))
    good = sign_token(SECRET, "alice", expires_at=2**40)
    async with hub, ws_server(hub) as srv, asgi_server(hub) as asgi:
        for url in (srv.url + "/", asgi.ws_url + "/ws"):
            async with connect(url, subprotocols=V1) as ws:
                await ws.send(hello_frame("alice"))
                await refused(ws, "unauthorized", 1008)
            async with connect(url, subprotocols=V1) as ws:
                await hello(ws, "alice", token=good)
                assert hub.is_connected("alice")
            await until(lambda: not hub.is_connected("alice"))
            async with connect(url + "?client_id=mallory") as ws:  # plain, no token
                assert await closed_with(ws) == 1008
        assert hub.clients() == ["alice"]


async def test_static_tokens_hook() -> None:
    authenticate = static_tokens({"token-of-alice-1": "alice", "token-of-bob-22": "bob"})
    async with make_hub() as hub, ws_server(hub, authenticate=authenticate) as srv:
        async with connect(srv.url, subprotocols=V1) as ws:
            await hello(ws, "bob", token="token-of-bob-22")
        for client_id, token, code in [
            ("alice", "token-of-bob-22", "forbidden_client_id"),
            ("alice", "token-of-alice-2", "unauthorized"),
            ("alice", None, "unauthorized"),
        ]:
            async with connect(srv.url, subprotocols=V1) as ws:
                await ws.send(hello_frame(client_id, token=token))
                await refused(ws, code, 1008)
        assert hub.clients() == ["bob"]
    with pytest.raises(ValueError):
        static_tokens({"short": "alice"})
    with pytest.raises(ValueError):
        static_tokens({"long-enough-token": "bad id"})


def test_signed_tokens_round_trip_and_resist_tampering() -> None:
    token = sign_token(SECRET, "user@example.com", expires_at=NOW + 60)
    assert verify_token(SECRET, token, now=NOW) == "user@example.com"
    for bad in (
        token[:-1] + ("A" if token[-1] != "A" else "B"),  # MAC changed
        token[:-1] + chr(ord(token[-1]) ^ 1),  # only base64's spare bits changed
        "x" + token,  # body changed
        token + ".x",
        token.replace(".", ""),
        "",
        "é." + token.split(".")[1],
        "a" * 5000,
    ):
        with pytest.raises(ProtocolError) as refusal:
            verify_token(SECRET, bad, now=NOW)
        assert (refusal.value.code, refusal.value.close_code) == ("unauthorized", 1008)
    with pytest.raises(ProtocolError, match="expired"):
        verify_token(SECRET, token, now=NOW + 60)
    with pytest.raises(ValueError):
        sign_token("short", "alice", expires_at=NOW)
    with pytest.raises(ValueError):
        sign_token(SECRET, "bad id", expires_at=NOW)


def test_token_sources_in_order_of_preference() -> None:
    info = ConnectionInfo(
        path="/", query={"token": "q"}, headers={"authorization": "Bearer h"}, subprotocol=None
    )
    assert token_from(info, Hello("a", 0, "t")) == "t"
    assert token_from(info, Hello("a", 0, None)) == "h"
    assert token_from(ConnectionInfo("/", {"token": "q"}, {}, None), None) == "q"
    assert token_from(ConnectionInfo("/", {}, {"authorization": "Basic x"}, None), None) is None


def test_config_refuses_a_short_auth_secret_without_echoing_it() -> None:
    from tether import ConfigError

    with pytest.raises(ConfigError) as refusal:
        HubConfig(auth_secret="short-secret")
    assert "HubConfig(auth_secret=...)" in str(refusal.value)  # the keyword is to blame
    assert "short-secret" not in str(refusal.value)
    assert SECRET not in repr(HubConfig(auth_secret=SECRET))


# ---------------------------------------------------------------------------- monitoring exposure


async def test_monitoring_routes_need_the_token_and_refuse_cross_origin_use() -> None:
    hub = make_hub()
    app = create_app(hub, monitor_token="monitor-token-1", api_token=None)
    async with hub, BackgroundServer(app) as server:
        async with httpx.AsyncClient(base_url=server.url) as http:
            for path in ("/api/clients/alice", "/api/clients/alice?x=1"):
                assert (await http.get(path)).status_code == 401
            # without an API token, publishing is open to loopback callers — but not to
            # another site's page running in a local browser (a cross-site request)
            await hub.connect("alice", MockWebSocket())
            body = {"client_id": "alice", "data": "x"}
            evil = {"Origin": "https://evil.example", "Content-Type": "text/plain"}
            response = await http.post("/api/send", content=orjson.dumps(body), headers=evil)
            assert response.status_code == 403
            response = await http.post("/api/broadcast", json={"data": 1}, headers=evil)
            assert response.status_code == 403
            assert hub.metrics.snapshot().to_dict()["messages"]["sent"] == 0
            same = {"Origin": server.url}
            assert (await http.post("/api/send", json=body, headers=same)).status_code == 200
        live = server.ws_url + "/ws/live?token=monitor-token-1"
        with pytest.raises(InvalidStatus) as refusal:
            async with connect(live, origin=websockets.Origin("https://evil.example")):
                pass
        assert refusal.value.response.status_code == 403
        with pytest.raises(InvalidStatus):
            async with connect(server.ws_url + "/ws/live?token=wrong-token-123"):
                pass
        async with connect(live, origin=websockets.Origin(server.url)) as ws:
            assert (await recv_json(ws))["type"] == "hello"


# ---------------------------------------------------------------------------- slow consumers


async def test_stalled_client_is_cut_off_and_its_memory_is_bounded_by_its_outbox(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # 900 overflow warnings would otherwise be kept in memory by pytest's log capture
    caplog.set_level(logging.ERROR, logger="tether")
    hub = Hub(HubConfig(send_timeout=0.3, max_queue_size=100, heartbeat_timeout=1))
    payload = "x" * 10_000
    async with hub, ws_server(hub) as srv, bystander(hub, srv.url) as other:
        # A tiny receive buffer, and a client library that stops reading at once.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, srv.server.sockets[0].getsockname())
        stalled = await connect(srv.url, subprotocols=V1, max_queue=1, sock=sock, compression=None)
        try:
            await hello(stalled, "stalled")
            gc.collect()
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                statuses = set()
                for n in range(1000):
                    result = await hub.send("stalled", {"n": n, "pad": payload}, critical=True)
                    statuses.add(result.status)
                    assert hub.pending("stalled") <= 100
                gc.collect()
                growth = tracemalloc.get_traced_memory()[0] - before
            finally:
                tracemalloc.stop()
            assert not hub.is_connected("stalled")  # cut off by send_timeout
            assert statuses <= {SendStatus.SENT, SendStatus.QUEUED}
            assert hub.pending("stalled") == 100
            snapshot = hub.metrics.snapshot().to_dict()
            assert snapshot["connections"]["timeouts"] == 1
            assert snapshot["queue"]["overflows"] >= 850  # drop_oldest kept the newest 100
            # 1,000 × 10 KB were sent; what is held is about 100 of them plus buffers
            assert growth < 3_000_000, growth
            await other.still_served()
        finally:
            stalled.transport.abort()


# ---------------------------------------------------------------------------- leaks


@pytest.mark.slow
async def test_connect_disconnect_cycles_and_churn_leave_no_state_behind() -> None:
    clock = ManualClock()
    hub = Hub(HubConfig(client_ttl=60, backend="memory"), clock=clock)
    async with hub, ws_server(hub) as srv:

        async def real_cycles(count: int, prefix: str) -> None:
            for n in range(count):
                client_id = f"{prefix}-{n % 250}"  # 250 ids, reconnecting
                async with connect(f"{srv.url}/?client_id={client_id}") as ws:
                    await until(lambda: hub.is_connected(client_id))  # noqa: B023
                    hub.join(client_id, "room")
                    await hub.send(client_id, "x")
                    assert await ws.recv() == "x"
                await until(lambda: not hub.is_connected(client_id))  # noqa: B023

        async def mock_cycles(count: int, prefix: str) -> None:
            for n in range(count):
                client_id = f"{prefix}-{n % 1000}"  # 1,000 ids churning
                ws = MockWebSocket()
                await hub.connect(client_id, ws)
                hub.join(client_id, f"g{n % 7}")
                await hub.send(client_id, "y", critical=True)
                await hub.disconnect(client_id)

        async def clean() -> None:
            clock.advance(61)
            await hub.cleanup_now()
            # Mock sends never suspend, so the loop has not yet purged the cancelled
            # send_timeout timers from its heap (it does so on its next iterations).
            for _ in range(3):
                await asyncio.sleep(0)
            gc.collect()

        # warm up every code path (caches, interned strings, free lists) first
        await real_cycles(300, "warm")
        await mock_cycles(1000, "warm")
        await clean()
        assert hub.clients() == []
        tracemalloc.start()
        try:
            baseline = tracemalloc.get_traced_memory()[0]
            await real_cycles(1500, "real")
            await mock_cycles(10_000, "mock")
            assert len(hub.clients()) == 1250  # tracked until client_ttl passes
            await clean()
            growth = tracemalloc.get_traced_memory()[0] - baseline
        finally:
            tracemalloc.stop()
        assert hub.clients() == []
        assert hub.metrics.clients == {}
        assert hub.members("room") == frozenset() and hub.members("g3") == frozenset()
        assert hub.metrics.snapshot().to_dict()["memory"]["tracked_clients"] == 0
        assert connection_counter(hub).open == 0
        assert growth < 300_000, f"{growth} bytes retained after 11,500 cycles"
