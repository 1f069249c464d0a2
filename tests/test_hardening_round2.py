"""Hardening, second round, over real sockets: ping floods, half-open handshakes, DNS
rebinding, expiring tokens, the last_seq bound and the small points of issue 12.

Memory is measured from outside the server process (/proc/<pid>/status), so the servers
whose memory matters run as child processes: `tether serve` as users run it, and a small
script around the `websockets` adapter.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import serve as websockets_serve
from websockets.exceptions import ConnectionClosed, InvalidStatus

from support import closed_with, hello, hello_frame, recv_json, until
from tether import Client, Hub, HubConfig, SendStatus
from tether.auth import sign_token, signed_token_authenticator, token_expires_at
from tether.client import TetherRejected
from tether.clock import ManualClock
from tether.cluster import ClusterEvents
from tether.monitoring import BackgroundServer, create_app
from tether.protocol import MAX_RESUME_SEQ, MAX_SEQ
from tether.transports.connection import (
    Authenticate,
    ConnectionInfo,
    Identity,
    Session,
    connection_counter,
)
from tether.transports.websockets import handler, server_options
from tether.transports.websockets import serve as ws_serve

SECRET = "round-two-secret-0123456789"
MiB = 1 << 20


# ----------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


class ChildServer:
    """A server in a child process: its pid, its port and its log file."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc = proc
        self.port = port
        self.log = log

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"


def _env(**settings: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    env.update({f"TETHER_{k.upper()}": str(v) for k, v in settings.items()})
    return env


@contextlib.contextmanager
def child_server(
    tmp_path: Path, argv: list[str], port: int, ready: str, **settings: Any
) -> Iterator[ChildServer]:
    """Run `argv` with TETHER_* `settings`; yields once `ready` appears in its log."""
    log = tmp_path / f"server-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=_env(port=port, **settings)
        )
    try:
        deadline = time.monotonic() + 20
        while ready not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        yield ChildServer(proc, port, log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def tether_serve(tmp_path: Path, *, prefix: list[str] | None = None, **settings: Any) -> Any:
    port = free_port()
    tether = str(Path(sys.executable).with_name("tether"))
    argv = [*(prefix or []), tether, "serve", "--log-level", "warning"]
    return child_server(tmp_path, argv, port, "Press Ctrl-C", **settings)


WS_ADAPTER_SCRIPT = """
import asyncio
from tether import Hub, HubConfig
from tether.transports.websockets import serve

async def main():
    hub = Hub(HubConfig())
    async with hub, serve(hub, "127.0.0.1", hub.config.port) as server:
        print("websockets adapter ready", flush=True)
        await server.serve_forever()

asyncio.run(main())
"""


def websockets_adapter(tmp_path: Path, **settings: Any) -> Any:
    port = free_port()
    argv = [sys.executable, "-c", WS_ADAPTER_SCRIPT]
    return child_server(tmp_path, argv, port, "websockets adapter ready", **settings)


def ws_frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame (RFC 6455 §5.2), payload under 64 KiB."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    length = len(payload)
    if length < 126:
        header = bytes([0x80 | opcode, 0x80 | length])
    else:
        header = bytes([0x80 | opcode, 0x80 | 126]) + length.to_bytes(2, "big")
    return header + mask + masked


def upgrade_status(port: int, path: str, host: str) -> int:
    """The HTTP status a WebSocket handshake with this `Host` header gets."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: tether.v1\r\n\r\n"
            ).encode()
        )
        status_line = sock.makefile("rb").readline()
    return int(status_line.split()[1])


def raw_upgrade(port: int, *, host: str | None = None, rcvbuf: int | None = None) -> socket.socket:
    """A TCP connection that completed a tether.v1 WebSocket handshake by hand."""
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /ws HTTP/1.1\r\nHost: {host or f'127.0.0.1:{port}'}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Protocol: tether.v1\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        assert chunk, "closed during the handshake"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def ping_flood(server: ChildServer, seconds: float) -> tuple[bool, int]:
    """Send 125-byte pings without ever reading, for at most `seconds`.

    Returns (whether the server cut the connection off, the peak server RSS seen)."""
    sock = raw_upgrade(server.port, rcvbuf=4096)
    sock.sendall(ws_frame(0x1, hello_frame("flooder").encode()))
    batch = ws_frame(0x9, b"p" * 125) * 200
    peak = rss_bytes(server.proc.pid)
    sock.settimeout(1.0)
    deadline = time.monotonic() + seconds
    sampled = 0.0
    try:
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):  # the server paused reading: keep pushing
                sock.sendall(batch)
            if time.monotonic() - sampled > 0.2:
                peak = max(peak, rss_bytes(server.proc.pid))
                sampled = time.monotonic()
        return False, peak
    except (BrokenPipeError, ConnectionResetError):
        return True, max(peak, rss_bytes(server.proc.pid))
    finally:
        sock.close()


async def health_ok(url: str, timeout: float = 15.0) -> None:
    async with httpx.AsyncClient(timeout=timeout) as http:
        response = await http.get(url + "/health")
    assert response.status_code == 200, response.text


async def still_serves(ws_url: str, client_id: str = "bystander") -> None:
    """A real tether.v1 client connects and is welcomed (bounded waits)."""
    async with connect(ws_url + "/ws", subprotocols=["tether.v1"], open_timeout=15) as ws:  # type: ignore[list-item]
        welcome = await hello(ws, client_id)
        assert welcome["next_seq"] >= 1


@contextlib.asynccontextmanager
async def app_server(hub: Hub, **create: Any) -> AsyncIterator[BackgroundServer]:
    async with hub, BackgroundServer(create_app(hub, **create)) as server:
        yield server


async def v1(url: str, **kwargs: Any) -> ClientConnection:
    return await connect(url, subprotocols=["tether.v1"], **kwargs)  # type: ignore[list-item]


# ----------------------------------------------------------------------------- 1. ping floods


@pytest.mark.parametrize("server_kind", ["tether serve", "websockets adapter"])
def test_ping_flood_is_cut_off_and_server_memory_stays_flat(
    tmp_path: Path, server_kind: str
) -> None:
    start = tether_serve if server_kind == "tether serve" else websockets_adapter
    with start(tmp_path) as server:
        asyncio.run(still_serves(server.ws_url, "before"))
        before = rss_bytes(server.proc.pid)
        cut, peak = ping_flood(server, seconds=30)
        assert cut, "the flooder was still connected after 30 s"
        assert peak - before < 50 * MiB, f"RSS grew {(peak - before) / MiB:.1f} MiB"
        # The flooder alone was closed: everyone else is still served.
        asyncio.run(still_serves(server.ws_url, "after"))
        assert rss_bytes(server.proc.pid) - before < 50 * MiB
        log = server.log.read_text()
        assert "pings/pongs per second" in log and "close 1008" in log


async def test_pings_within_the_budget_are_answered() -> None:
    hub = Hub(HubConfig())
    async with app_server(hub) as server, await v1(server.ws_url + "/ws") as ws:
        await hello(ws, "pinger")
        for _ in range(20):  # under the burst: a chatty but honest client
            pong = await ws.ping()
            async with asyncio.timeout(5):
                await pong
        assert hub.is_connected("pinger")


# ----------------------------------------------------------------------------- 2. half-open


def test_half_open_flood_on_a_1024_fd_server_leaves_it_serving(tmp_path: Path) -> None:
    prlimit = shutil.which("prlimit")
    assert prlimit is not None, "prlimit (util-linux) is needed for this test"
    with tether_serve(
        tmp_path, prefix=[prlimit, "--nofile=1024:1024"], max_connections=900
    ) as server:
        attackers: list[socket.socket] = []
        try:
            for _ in range(1100):  # never send a byte: half-open handshakes
                sock = socket.socket()
                sock.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    sock.connect(("127.0.0.1", server.port))
                attackers.append(sock)
            # The real client and /health get through while every attacker is still open.
            asyncio.run(still_serves(server.ws_url))
            asyncio.run(health_ok(server.url))
            metrics = httpx.get(server.url + "/metrics", timeout=15).text
        finally:
            for sock in attackers:
                sock.close()
        evicted = _metric(metrics, "tether_connections_handshakes_evicted_total")
        assert evicted >= 1100 - 1024, metrics
        assert server.log.stat().st_size < 1 * MiB
        assert "Traceback" not in server.log.read_text()


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


async def test_a_connection_that_sends_no_request_is_dropped_after_the_handshake_timeout() -> None:
    hub = Hub(HubConfig(handshake_timeout=0.5))
    async with app_server(hub) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finishes
        async with asyncio.timeout(10):
            assert await reader.read() == b""  # closed by the server, nothing answered
        writer.close()
        assert server.guard is not None and server.guard.stats.handshake_timeouts == 1
        # A keep-alive connection gets the same deadline for its next request.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        async with asyncio.timeout(10):
            assert (await reader.readline()).startswith(b"HTTP/1.1 200")
            await reader.read()  # ...then closed (keep-alive or handshake timeout)
        writer.close()


def test_max_connections_beyond_the_fd_limit_warns_at_start_up(tmp_path: Path) -> None:
    prlimit = shutil.which("prlimit")
    assert prlimit is not None
    with tether_serve(tmp_path, prefix=[prlimit, "--nofile=256:256"]) as server:
        log = server.log.read_text()
    assert "TETHER_MAX_CONNECTIONS=10000 does not fit" in log, log


def test_emfile_is_one_counted_warning_not_a_traceback_per_accept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from tether.monitoring.protocols import GuardStats
    from tether.monitoring.server import AcceptErrorHandler

    stats = GuardStats()
    loop = asyncio.new_event_loop()
    try:
        handler = AcceptErrorHandler(stats, None)
        error = OSError(24, "Too many open files")
        with caplog.at_level("WARNING"):
            for _ in range(50):
                handler(
                    loop, {"message": "socket.accept() out of system resource", "exception": error}
                )
    finally:
        loop.close()
    assert stats.accept_errors == 50
    warnings = [r for r in caplog.records if "cannot accept" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].exc_info is None


# ----------------------------------------------------------------------------- 3. DNS rebinding


async def test_dns_rebinding_requests_are_refused_on_a_loopback_server() -> None:
    hub = Hub(HubConfig())
    async with app_server(hub) as server:
        evil_host = f"evil.example:{server.port}"
        rebinding = {"Host": evil_host, "Origin": f"http://{evil_host}"}
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            body = {"client_id": "alice", "data": "x", "critical": True}
            response = await http.post("/api/send", json=body, headers=rebinding)
            assert response.status_code in (400, 403, 421)
            response = await http.get("/api/dead-letters", headers=rebinding)
            assert response.status_code in (400, 403, 421)
            assert (await http.get("/health", headers={"Host": evil_host})).status_code == 400
            # The names this server really is reachable as still work, any port.
            for host in (f"127.0.0.1:{server.port}", f"localhost:{server.port}", "localhost"):
                same = {"Host": host, "Origin": f"http://{host}"}
                response = await http.post("/api/send", json=body, headers=same)
                assert response.status_code == 200, (host, response.text)
        assert hub.pending("alice") == 3  # queued by the three allowed requests only
        status = await asyncio.to_thread(upgrade_status, server.port, "/ws", evil_host)
        assert status in (400, 403, 421)
        local = f"localhost:{server.port}"
        assert await asyncio.to_thread(upgrade_status, server.port, "/ws", local) == 101


async def test_dns_rebinding_is_refused_by_the_websockets_adapter() -> None:
    hub = Hub(HubConfig())
    async with hub, ws_serve(hub, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        evil = await asyncio.to_thread(upgrade_status, port, "/", f"evil.example:{port}")
        assert evil == 400
        assert await asyncio.to_thread(upgrade_status, port, "/", f"[::1]:{port}") == 101
        async with await v1(f"ws://localhost:{port}") as ws:
            await hello(ws, "local")


async def test_allowed_hosts_setting_replaces_the_loopback_default() -> None:
    hub = Hub(HubConfig(allowed_hosts="tether.example,*.tether.example"))
    async with app_server(hub) as server, httpx.AsyncClient(base_url=server.url) as http:
        assert (await http.get("/health", headers={"Host": "a.tether.example"})).status_code == 200
        assert (await http.get("/health", headers={"Host": "tether.example:1"})).status_code == 200
        assert (await http.get("/health")).status_code == 400  # 127.0.0.1 is not listed


# ----------------------------------------------------------------------------- 4. token lifetime


@contextlib.asynccontextmanager
async def authed(
    adapter: str, clock: ManualClock | None = None, authenticate: Authenticate | None = None
) -> AsyncIterator[tuple[Hub, str]]:
    """A hub that needs tokens signed with SECRET (its own `auth_secret` hook, or
    `authenticate` when given), served by `adapter`. With `clock`, the hub — and so the
    token hook and the token watchdog — runs on it, and the test advances it instead of
    sleeping (its wall time is years in the past: a hook reading the real clock would
    refuse every token); without, the real clock (for clients whose refresh schedule is
    real time)."""
    if clock is None:
        hub = Hub(HubConfig(auth_secret=SECRET, hello_timeout=5))
    else:
        # No retry cycles while the clock is advanced: the frames stay the ones sent.
        config = HubConfig(auth_secret=SECRET, hello_timeout=5, retry_interval=3600)
        hub = Hub(config, clock=clock)
    if adapter == "uvicorn":
        async with app_server(hub, authenticate=authenticate) as server:
            yield hub, server.ws_url + "/ws"
    else:
        async with hub, ws_serve(hub, "127.0.0.1", 0, authenticate=authenticate) as ws_server:
            port = next(iter(ws_server.sockets)).getsockname()[1]
            yield hub, f"ws://127.0.0.1:{port}"


def short_token(client_id: str, seconds: float = 2.0) -> str:
    # Signed expiries are whole seconds: this token lives between seconds-1 and seconds.
    return sign_token(SECRET, client_id, expires_at=time.time() + seconds)


def token_for(clock: ManualClock, client_id: str, seconds: int = 10) -> str:
    """A token that expires `seconds` from now on `clock` (its wall time is whole seconds)."""
    return sign_token(SECRET, client_id, expires_at=clock.wall() + seconds)


def auth_frame(token: str) -> str:
    return orjson.dumps({"type": "auth", "token": token}).decode()


async def served_up_to_here(ws: ClientConnection, mark: str) -> None:
    """Wait until the server has handled every frame this client sent so far: a
    subscribe is answered by the connection's own receive loop, in order."""
    await ws.send(orjson.dumps({"type": "subscribe", "channel": f"sync.{mark}"}).decode())
    frame = await recv_json(ws)
    assert frame["type"] == "subscribed" and frame["channel"] == f"sync.{mark}", frame


async def delivered(hub: Hub, ws: ClientConnection, client_id: str, data: Any) -> None:
    """A critical message reaches the connection; it is acked, so nothing is pending."""
    assert (await hub.send(client_id, data, critical=True)).status is SendStatus.SENT
    frame = await recv_json(ws)
    assert frame["type"] == "msg" and frame["data"] == data, frame
    await ws.send(orjson.dumps({"type": "ack", "seq": frame["seq"]}).decode())


@pytest.mark.parametrize("adapter", ["uvicorn", "websockets"])
async def test_an_expired_token_ends_delivery_with_token_expired_1008(adapter: str) -> None:
    clock = ManualClock()
    async with authed(adapter, clock) as (hub, url), await v1(url) as ws:
        await hello(ws, "alice", token=token_for(clock, "alice", 10))
        await delivered(hub, ws, "alice", {"n": 0})
        clock.advance(9.9)  # short of the expiry: the connection stays and delivers
        await served_up_to_here(ws, "a")
        await delivered(hub, ws, "alice", {"n": 1})
        assert hub.is_connected("alice")
        clock.advance(0.1)  # the expiry, on the hub's clock
        error = await recv_json(ws)
        assert error == {"type": "error", "code": "token_expired", "reason": error["reason"]}
        assert await closed_with(ws) == 1008
        # Delivery stopped: nothing more reaches alice; critical sends wait in her outbox.
        assert not hub.is_connected("alice")
        after = await hub.send("alice", {"n": "late"}, critical=True)
        assert after.status is SendStatus.QUEUED


@pytest.mark.parametrize("adapter", ["uvicorn", "websockets"])
async def test_an_auth_frame_with_a_fresh_token_keeps_the_connection(adapter: str) -> None:
    clock = ManualClock()
    async with authed(adapter, clock) as (hub, url):
        async with await v1(url) as ws:
            first_expiry = clock.wall() + 10
            await hello(ws, "bob", token=token_for(clock, "bob", 10))
            for round_ in range(3):  # each 10 s token renewed 6 s into its life
                clock.advance(6)
                await ws.send(auth_frame(token_for(clock, "bob", 10)))
                await served_up_to_here(ws, str(round_))
                await delivered(hub, ws, "bob", {"round": round_})
            assert clock.wall() > first_expiry  # outlived the first token
            # The last token (renewed at +18 s) holds until +28 s, not a moment longer.
            clock.advance(9.5)
            await served_up_to_here(ws, "last")
            assert hub.is_connected("bob")
            clock.advance(0.5)
            error = await recv_json(ws)
            assert error["type"] == "error" and error["code"] == "token_expired", error
            assert await closed_with(ws) == 1008
        # A fresh token for someone else is refused, and ends the connection.
        async with await v1(url) as ws:
            await hello(ws, "bob", token=token_for(clock, "bob", 10))
            await ws.send(auth_frame(token_for(clock, "eve", 60)))
            error = await recv_json(ws)
            assert error["code"] == "forbidden_client_id"
            assert await closed_with(ws) == 1008


async def test_client_with_a_token_function_stays_connected_through_three_expiries() -> None:
    # Real time on purpose: the client schedules its refreshes on the wall clock (it
    # takes no injected clock), so this is the one end-to-end check of that schedule.
    issued: list[str] = []

    async def fresh_token() -> str:
        issued.append(short_token("carol"))
        return issued[-1]

    async with (
        authed("uvicorn") as (hub, url),
        Client(url, client_id="carol", token=fresh_token) as client,
    ):
        first = client.connection
        first_expiry = token_expires_at(issued[0]) or 0
        await until(lambda: client.token_refreshes >= 3 and time.time() > first_expiry, timeout=30)
        # Tokens expired meanwhile, yet it is the same connection, never closed.
        assert client.connection is first and client.reconnects == 0
        result = await hub.send("carol", {"still": "here"}, critical=True)
        assert result.status is SendStatus.SENT
        async with asyncio.timeout(5):
            message = await anext(aiter(client))
        assert message.data == {"still": "here"}


async def test_client_with_a_fixed_expiring_token_is_told_token_expired() -> None:
    clock = ManualClock()
    async with authed("uvicorn", clock) as (hub, url):
        client = Client(url, client_id="dave", token=token_for(clock, "dave", 10))
        await client.connect()
        messages = aiter(client)
        clock.advance(9.5)  # short of the expiry: still served
        assert (await hub.send("dave", {"n": 1}, critical=True)).status is SendStatus.SENT
        async with asyncio.timeout(5):
            assert (await anext(messages)).data == {"n": 1}
        assert hub.is_connected("dave")
        clock.advance(0.5)
        with pytest.raises(TetherRejected) as rejected:
            async with asyncio.timeout(5):
                async for _ in messages:
                    pass
        await client.close()
        assert rejected.value.code == "token_expired" and rejected.value.close_code == 1008


@pytest.mark.parametrize("adapter", ["uvicorn", "websockets"])
async def test_plain_mode_connection_is_closed_1008_at_token_expiry(adapter: str) -> None:
    clock = ManualClock()
    async with authed(adapter, clock) as (hub, url):
        token = token_for(clock, "erin", 10)
        async with connect(f"{url}?client_id=erin&token={token}") as ws:
            await until(lambda: hub.is_connected("erin"))
            clock.advance(9.5)  # short of the expiry: a frame from erin is still taken
            got: list[tuple[str, Any]] = []

            @hub.on_message
            async def _(client_id: str, data: Any) -> None:
                got.append((client_id, data))

            await ws.send("still here")
            await until(lambda: bool(got))
            assert got == [("erin", "still here")] and hub.is_connected("erin")
            clock.advance(0.5)
            assert await closed_with(ws) == 1008
            assert ws.close_reason is not None and "token_expired" in ws.close_reason


class _SilentPeer:
    """A connection whose peer never sends: `recv` waits until cancelled."""

    def __init__(self) -> None:
        self.closed: list[tuple[int, str]] = []

    async def recv(self) -> str | bytes:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def send(self, data: str | bytes) -> None:
        pass

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.closed.append((code, reason))


@contextlib.asynccontextmanager
async def expiring_session(
    clock: ManualClock,
) -> AsyncIterator[tuple[Hub, _SilentPeer, asyncio.Task[None]]]:
    """A plain-mode session of "gina", whose credentials last 10 s, on a silent peer."""

    async def authenticate(info: ConnectionInfo, hello: Any) -> Identity:
        return Identity("gina", expires_in=10)

    async with Hub(HubConfig(), clock=clock) as hub:
        peer = _SilentPeer()
        session = Session(hub, peer, ConnectionInfo("/", {}, {}, None), authenticate=authenticate)
        task = asyncio.create_task(session.run())
        await until(lambda: hub.is_connected("gina"))
        yield hub, peer, task


async def test_the_expiry_watchdog_ends_a_silent_connection_on_the_hub_clock() -> None:
    clock = ManualClock()
    async with expiring_session(clock) as (hub, peer, task):
        clock.advance(9.9)
        for _ in range(20):  # loop turns, not time: a watchdog that fired would act now
            await asyncio.sleep(0)
        assert not task.done() and hub.is_connected("gina")
        clock.advance(0.1)
        async with asyncio.timeout(5):
            await task  # ends normally: the watchdog's cancellation was taken back
        assert peer.closed == [(1008, "token_expired: the token expired")]
        assert not hub.is_connected("gina")


async def test_the_expiry_watchdog_never_swallows_another_cancellation() -> None:
    clock = ManualClock()
    async with expiring_session(clock) as (_, peer, task):
        clock.advance(10)  # the watchdog wakes in the same loop turn as ...
        task.cancel()  # ... a cancellation from elsewhere (a server shutting down)
        with pytest.raises(asyncio.CancelledError):
            async with asyncio.timeout(5):
                await task
        assert peer.closed == []


class _FailingPeer(_SilentPeer):
    """Sends one frame; its 1011 close (after an internal error) waits for `gate`."""

    def __init__(self) -> None:
        super().__init__()
        self.frames: asyncio.Queue[str] = asyncio.Queue()
        self.gate = asyncio.Event()

    async def recv(self) -> str | bytes:
        return await self.frames.get()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.closed.append((code, reason))
        if code == 1011:
            await self.gate.wait()


async def test_an_expiry_during_the_internal_error_close_adds_no_second_close(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = ManualClock()

    async def authenticate(info: ConnectionInfo, hello: Any) -> Identity:
        return Identity("kim", expires_in=10)

    async def broken(client_id: str, data: Any) -> None:
        raise RuntimeError("a bug in the server")

    async with Hub(HubConfig(), clock=clock) as hub:
        monkeypatch.setattr(hub, "receive", broken)
        peer = _FailingPeer()
        session = Session(hub, peer, ConnectionInfo("/", {}, {}, None), authenticate=authenticate)
        task = asyncio.create_task(session.run())
        try:
            await until(lambda: hub.is_connected("kim"))
            peer.frames.put_nowait("hi")
            await until(lambda: bool(peer.closed))
            clock.advance(10)  # the token expires while the 1011 close is under way
            for _ in range(20):  # loop turns: a watchdog that fired would act now
                await asyncio.sleep(0)
        finally:
            peer.gate.set()
        async with asyncio.timeout(5):
            await task
        assert [code for code, _ in peer.closed] == [1011]


async def frames_until_closed(ws: ClientConnection) -> list[dict[str, Any]]:
    """Every frame the server still writes on `ws`, up to its close."""
    frames: list[dict[str, Any]] = []
    with contextlib.suppress(ConnectionClosed):
        async with asyncio.timeout(5):
            while True:
                frames.append(orjson.loads(await ws.recv()))
    return frames


async def expired_while_busy(hub: Hub, ws: ClientConnection, clock: ManualClock) -> None:
    """The token of "hana" expires while her connection's task is busy elsewhere: the
    watchdog alone detaches her and ends the connection — token_expired, close 1008 —
    and critical sends from then on wait in her outbox; nothing else reaches the socket."""
    clock.advance(10)
    await until(lambda: not hub.is_connected("hana"))
    for n in (2, 3, 4):
        result = await hub.send("hana", {"n": n}, critical=True)
        assert result.status is SendStatus.QUEUED, result
    frames = await frames_until_closed(ws)
    assert [(f["type"], f.get("code")) for f in frames] == [("error", "token_expired")], frames
    assert ws.close_code == 1008


async def resumed_in_order(hub: Hub, url: str, clock: ManualClock, *, last_seq: int) -> None:
    """A fresh token: the in-flight message and the three queued ones, exactly once, in
    order (a duplicate would come before the `subscribed` answer)."""
    async with await v1(url) as ws:
        await hello(ws, "hana", last_seq=last_seq, token=token_for(clock, "hana", 10))
        got = [await recv_json(ws) for _ in range(4)]
        assert [f["data"] for f in got] == [{"n": 1}, {"n": 2}, {"n": 3}, {"n": 4}], got
        seqs = [f["seq"] for f in got]
        assert seqs == list(range(seqs[0], seqs[0] + 4)), seqs
        await ws.send(orjson.dumps({"type": "ack", "seq": seqs[-1]}).decode())
        await served_up_to_here(ws, "resumed")
        assert hub.pending("hana") == 0


@pytest.mark.parametrize("adapter", ["uvicorn", "websockets"])
async def test_token_expiry_stops_delivery_while_an_on_message_handler_is_busy(
    adapter: str,
) -> None:
    clock = ManualClock()
    gate, entered = asyncio.Event(), asyncio.Event()
    async with authed(adapter, clock) as (hub, url):

        @hub.on_message
        async def slow(client_id: str, data: Any) -> None:
            entered.set()
            await gate.wait()  # a slow database write, say

        async with await v1(url) as ws:
            await hello(ws, "hana", token=token_for(clock, "hana", 10))
            await delivered(hub, ws, "hana", {"n": 0})
            # Written and not yet acked when the token expires: in flight.
            assert (await hub.send("hana", {"n": 1}, critical=True)).status is SendStatus.SENT
            in_flight = await recv_json(ws)
            assert in_flight["data"] == {"n": 1}
            await ws.send('{"type":"publish","data":"hi"}')
            try:
                await entered.wait()
                await expired_while_busy(hub, ws, clock)
            finally:
                gate.set()  # the handler returns: the task ends without a second error or close
            await until(lambda: connection_counter(hub).open == 0)
        await resumed_in_order(hub, url, clock, last_seq=in_flight["seq"] - 1)


@pytest.mark.parametrize("adapter", ["uvicorn", "websockets"])
async def test_token_expiry_stops_delivery_while_an_authorize_subscribe_hook_is_busy(
    adapter: str,
) -> None:
    clock = ManualClock()
    gate, entered = asyncio.Event(), asyncio.Event()
    async with authed(adapter, clock) as (hub, url):

        @hub.authorize_subscribe
        async def slow(client_id: str, channel: str) -> bool:
            entered.set()
            await gate.wait()
            return True

        async with await v1(url) as ws:
            await hello(ws, "hana", token=token_for(clock, "hana", 10))
            await delivered(hub, ws, "hana", {"n": 0})
            assert (await hub.send("hana", {"n": 1}, critical=True)).status is SendStatus.SENT
            in_flight = await recv_json(ws)
            await ws.send(orjson.dumps({"type": "subscribe", "channel": "room.a"}).decode())
            try:
                await entered.wait()
                await expired_while_busy(hub, ws, clock)
            finally:
                gate.set()  # allowed, too late: no `subscribed` reaches the closed connection
            await until(lambda: connection_counter(hub).open == 0)
        await resumed_in_order(hub, url, clock, last_seq=in_flight["seq"] - 1)


@pytest.mark.parametrize("adapter", ["uvicorn", "websockets"])
async def test_plain_mode_token_expiry_while_a_handler_is_busy_closes_1008(adapter: str) -> None:
    clock = ManualClock()
    gate, entered = asyncio.Event(), asyncio.Event()
    async with authed(adapter, clock) as (hub, url):

        @hub.on_message
        async def slow(client_id: str, data: Any) -> None:
            entered.set()
            await gate.wait()

        token = token_for(clock, "ivy", 10)
        async with connect(f"{url}?client_id=ivy&token={token}") as ws:
            await until(lambda: hub.is_connected("ivy"))
            await ws.send("busy now")
            try:
                await entered.wait()
                clock.advance(10)
                await until(lambda: not hub.is_connected("ivy"))
                late = await hub.send("ivy", "late", critical=True)
                assert late.status is SendStatus.QUEUED, late
                received: list[str | bytes] = []
                with contextlib.suppress(ConnectionClosed):
                    async with asyncio.timeout(5):
                        while True:
                            received.append(await ws.recv())
                assert received == [] and ws.close_code == 1008
                assert ws.close_reason is not None and "token_expired" in ws.close_reason
            finally:
                gate.set()
            await until(lambda: connection_counter(hub).open == 0)


@contextlib.contextmanager
def released(gate: asyncio.Event) -> Iterator[None]:
    """Sets `gate` on the way out: a failing test leaves no hook waiting forever (and the
    server's shutdown waiting for it)."""
    try:
        yield
    finally:
        gate.set()


class SlowRenewals:
    """The SECRET hook, except that checking a token in `slow` waits for `gate`: a fresh
    token checked remotely (introspection), say. `entered` is set when one waits."""

    def __init__(self, clock: ManualClock) -> None:
        self.check = signed_token_authenticator(SECRET, clock=clock.wall)
        self.slow: set[str] = set()
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def __call__(self, info: ConnectionInfo, hello: Any) -> str | Identity:
        if hello is not None and hello.token in self.slow:
            self.entered.set()
            await self.gate.wait()
        return await self.check(info, hello)


@pytest.mark.parametrize("adapter", ["uvicorn", "websockets"])
async def test_a_renewal_sent_before_expiry_keeps_the_connection_when_its_check_ends_after(
    adapter: str,
) -> None:
    clock = ManualClock()
    hook = SlowRenewals(clock)
    async with authed(adapter, clock, hook) as (hub, url):
        with released(hook.gate):
            await renewed_late(hub, url, clock, hook)


async def renewed_late(hub: Hub, url: str, clock: ManualClock, hook: SlowRenewals) -> None:
    async with await v1(url) as ws:
        await hello(ws, "hana", token=token_for(clock, "hana", 10))
        await delivered(hub, ws, "hana", {"n": 0})
        clock.advance(9)  # 1 s before the expiry, as the reference clients do
        fresh = token_for(clock, "hana", 10)
        hook.slow.add(fresh)
        await ws.send(auth_frame(fresh))
        await hook.entered.wait()
        clock.advance(1)  # the old token's expiry passes while the hook checks the new one
        for _ in range(20):  # loop turns, not time: a watchdog that fired would act now
            await asyncio.sleep(0)
        # The token was valid when the renewal was sent: delivery goes on meanwhile.
        await delivered(hub, ws, "hana", {"n": 1})
        assert hub.is_connected("hana")
        hook.gate.set()  # valid: the connection stays, with the fresh token's lifetime
        await served_up_to_here(ws, "renewed")
        await delivered(hub, ws, "hana", {"n": 2})
        clock.advance(8.5)  # the fresh token runs until +19 s
        await served_up_to_here(ws, "later")
        assert hub.is_connected("hana")
        clock.advance(0.5)
        error = await recv_json(ws)
        assert error["type"] == "error" and error["code"] == "token_expired", error
        assert await closed_with(ws) == 1008


@pytest.mark.parametrize("adapter", ["uvicorn", "websockets"])
async def test_a_renewal_whose_check_outlasts_hello_timeout_or_fails_ends_the_connection(
    adapter: str,
) -> None:
    clock = ManualClock()
    hook = SlowRenewals(clock)
    async with authed(adapter, clock, hook) as (hub, url):
        with released(hook.gate):
            await renewal_too_late_or_refused(hub, url, clock, hook)


async def renewal_too_late_or_refused(
    hub: Hub, url: str, clock: ManualClock, hook: SlowRenewals
) -> None:
    # The hook never answers: the expiry waits at most hello_timeout (5 s here)
    # from the auth frame, then ends the connection as usual.
    async with await v1(url) as ws:
        await hello(ws, "hana", token=token_for(clock, "hana", 10))
        clock.advance(9)
        fresh = token_for(clock, "hana", 10)
        hook.slow.add(fresh)
        await ws.send(auth_frame(fresh))
        await hook.entered.wait()
        clock.advance(4.9)  # past the expiry, within hello_timeout of the auth frame
        for _ in range(20):
            await asyncio.sleep(0)
        await delivered(hub, ws, "hana", {"n": 0})
        clock.advance(0.1)
        await until(lambda: not hub.is_connected("hana"))
        assert (await hub.send("hana", {"n": 1}, critical=True)).status is SendStatus.QUEUED
        hook.gate.set()  # valid, too late: no second error, no second close
        frames = await frames_until_closed(ws)
        assert [(f["type"], f.get("code")) for f in frames] == [("error", "token_expired")]
        assert ws.close_code == 1008
    # Refused after the expiry: reported as a refusal, once, and nothing more written.
    hook.gate.clear()
    hook.entered.clear()
    async with await v1(url) as ws:
        await hello(ws, "hana", token=token_for(clock, "hana", 10))
        # n=0, its ack unread while the hook ran, and n=1, queued after the expiry.
        got = [await recv_json(ws) for _ in range(2)]
        assert [f["data"] for f in got] == [{"n": 0}, {"n": 1}], got
        await ws.send(orjson.dumps({"type": "ack", "seq": got[-1]["seq"]}).decode())
        clock.advance(9)
        forged = token_for(clock, "hana", 10)[:-2] + "xx"
        hook.slow.add(forged)
        await ws.send(auth_frame(forged))
        await hook.entered.wait()
        clock.advance(1)
        hook.gate.set()
        frames = await frames_until_closed(ws)
        assert [(f["type"], f.get("code")) for f in frames] == [("error", "unauthorized")], frames
        assert ws.close_code == 1008


class SlowConnect:
    """Makes the hub take its time connecting a client — before it attaches the
    connection ("before_attach"), or while attached, loading the stream from the store
    ("while_attached") — until `gate` is set; `entered` is set once it waits."""

    def __init__(self, hub: Hub, monkeypatch: pytest.MonkeyPatch, window: str) -> None:
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()
        if window == "before_attach":
            connect = hub.connect

            async def slow_connect(*args: Any, **kwargs: Any) -> Any:
                await self.wait()
                return await connect(*args, **kwargs)

            monkeypatch.setattr(hub, "connect", slow_connect)
        else:
            load_stored = ClusterEvents.load_stored

            async def slow_load(events: ClusterEvents, *args: Any) -> Any:
                await self.wait()
                return await load_stored(events, *args)

            monkeypatch.setattr(ClusterEvents, "load_stored", slow_load)

    async def wait(self) -> None:
        self.entered.set()
        await self.gate.wait()


@pytest.mark.parametrize("window", ["before_attach", "while_attached"])
@pytest.mark.parametrize("adapter", ["uvicorn", "websockets"])
async def test_a_token_expiring_while_the_hub_connects_gets_no_welcome_and_no_messages(
    adapter: str, window: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = ManualClock()
    async with authed(adapter, clock) as (hub, url):
        for n in (1, 2):
            assert (await hub.send("hana", {"n": n}, critical=True)).status is SendStatus.QUEUED
        slow = SlowConnect(hub, monkeypatch, window)
        with released(slow.gate):
            async with await v1(url) as ws:
                await ws.send(hello_frame("hana", token=token_for(clock, "hana", 10)))
                await slow.entered.wait()
                clock.advance(10)  # the token expires while the hub connects the client
                for _ in range(20):  # loop turns: the watchdog has fired
                    await asyncio.sleep(0)
                slow.gate.set()
                frames = await frames_until_closed(ws)
                # Not the welcome, not the two messages: only the reason, then 1008.
                kinds = [(f["type"], f.get("code")) for f in frames]
                assert kinds == [("error", "token_expired")], frames
                assert ws.close_code == 1008
                await until(lambda: connection_counter(hub).open == 0)
        assert not hub.is_connected("hana") and hub.pending("hana") == 2
        monkeypatch.undo()
        async with await v1(url) as ws:  # nothing was lost: a fresh token gets both
            await hello(ws, "hana", token=token_for(clock, "hana", 10))
            got = [await recv_json(ws) for _ in range(2)]
            assert [f["data"] for f in got] == [{"n": 1}, {"n": 2}], got


@pytest.mark.parametrize("adapter", ["uvicorn", "websockets"])
async def test_plain_mode_token_expiring_while_the_hub_connects_writes_nothing(
    adapter: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = ManualClock()
    async with authed(adapter, clock) as (hub, url):
        assert (await hub.send("ivy", "queued", critical=True)).status is SendStatus.QUEUED
        slow = SlowConnect(hub, monkeypatch, "while_attached")
        token = token_for(clock, "ivy", 10)
        with released(slow.gate):
            async with connect(f"{url}?client_id=ivy&token={token}") as ws:
                await slow.entered.wait()
                clock.advance(10)
                for _ in range(20):
                    await asyncio.sleep(0)
                slow.gate.set()
                received: list[str | bytes] = []
                with contextlib.suppress(ConnectionClosed):
                    async with asyncio.timeout(5):
                        while True:
                            received.append(await ws.recv())
                assert received == [] and ws.close_code == 1008
                assert ws.close_reason is not None and "token_expired" in ws.close_reason
                await until(lambda: connection_counter(hub).open == 0)
        assert not hub.is_connected("ivy") and hub.pending("ivy") == 1


@pytest.mark.parametrize("adapter", ["uvicorn", "websockets"])
async def test_the_expiry_is_kept_at_expires_at_however_late_the_watchdog_starts(
    adapter: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = ManualClock()
    async with authed(adapter, clock) as (hub, url):
        connect = hub.connect

        async def late_connect(*args: Any, **kwargs: Any) -> Any:
            # Time passes between the hook's answer and the watchdog's first run.
            clock.advance(5)
            return await connect(*args, **kwargs)

        monkeypatch.setattr(hub, "connect", late_connect)
        async with await v1(url) as ws:
            await hello(ws, "gina", token=token_for(clock, "gina", 10))  # welcomed at +5 s
            clock.advance(4.9)
            await served_up_to_here(ws, "a")
            assert hub.is_connected("gina")
            clock.advance(0.1)  # +10 s: the token's expiry, not 10 s after the watchdog began
            error = await recv_json(ws)
            assert error["type"] == "error" and error["code"] == "token_expired", error
            assert await closed_with(ws) == 1008


# ----------------------------------------------------------------------------- 6. last_seq bound


@pytest.mark.parametrize("adapter", ["uvicorn", "websockets"])
@pytest.mark.parametrize(
    "raw_last_seq",
    [str(MAX_SEQ), str(MAX_RESUME_SEQ + 1), "9" * 400],
    ids=["2^53-1", "bound+1", "400 digits"],
)
async def test_a_last_seq_that_cannot_be_continued_is_invalid_frame(
    adapter: str, raw_last_seq: str
) -> None:
    hub = Hub(HubConfig())
    if adapter == "uvicorn":
        context: Any = _app_url(hub)
    else:
        context = _ws_adapter(hub)
    async with context as url, await v1(url) as ws:
        await ws.send(f'{{"type":"hello","client_id":"far","last_seq":{raw_last_seq}}}')
        error = await recv_json(ws)
        assert error["type"] == "error" and error["code"] == "invalid_frame", error
        assert await closed_with(ws) in (1002, 1008)
        # The id was never taken on: a later send is not numbered beyond the range.
        assert not hub.is_connected("far")
        async with await v1(url) as again:
            welcome = await hello(again, "far", last_seq=MAX_RESUME_SEQ)
            assert welcome["next_seq"] <= MAX_SEQ


@contextlib.asynccontextmanager
async def _ws_adapter(hub: Hub) -> AsyncIterator[str]:
    async with hub, ws_serve(hub, "127.0.0.1", 0) as server:
        yield f"ws://127.0.0.1:{next(iter(server.sockets)).getsockname()[1]}"


@contextlib.asynccontextmanager
async def _app_url(hub: Hub) -> AsyncIterator[str]:
    async with app_server(hub) as server:
        yield server.ws_url + "/ws"


# ----------------------------------------------------------------------------- 8. small points


async def test_frames_far_over_the_limit_are_cut_off_by_uvicorn_at_limit_plus_64k() -> None:
    hub = Hub(HubConfig(max_message_size=64 * 1024))
    async with app_server(hub) as server, await v1(server.ws_url + "/ws", max_size=None) as ws:
        await hello(ws, "big")
        # Between the limit and limit + 64 KiB: read, and explained with an error frame.
        await ws.send('{"type":"publish","data":"' + "x" * (80 * 1024) + '"}')
        assert (await recv_json(ws))["code"] == "too_big"
        assert await closed_with(ws) == 1009
    async with (
        app_server(Hub(HubConfig(max_message_size=64 * 1024))) as server,
        await v1(server.ws_url + "/ws", max_size=None) as ws,
    ):
        await hello(ws, "bigger")
        # 1.5 x the limit is beyond limit + 64 KiB: uvicorn refuses it before reading it all.
        with contextlib.suppress(ConnectionClosed):
            await ws.send('{"type":"publish","data":"' + "x" * (136 * 1024) + '"}')
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(5):
                await ws.recv()  # no error frame: the library closed first
        assert ws.close_code == 1009


async def test_live_feed_without_the_token_answers_401_like_other_guarded_routes() -> None:
    hub = Hub(HubConfig(monitor_token="monitor-token-2"))
    async with app_server(hub) as server:
        async with httpx.AsyncClient(base_url=server.url) as http:
            assert (await http.get("/api/metrics")).status_code == 401
        with pytest.raises(InvalidStatus) as refused:
            await connect(server.ws_url + "/ws/live")
        assert refused.value.response.status_code == 401
        async with connect(server.ws_url + "/ws/live?token=monitor-token-2") as ws:
            assert (await recv_json(ws))["type"] == "hello"


JS_TOKEN_CLIENT = """
async ([url, clientId]) => {
  const { TetherClient } = await import("/static/tether.js");
  const client = new TetherClient(url, { clientId, token: () => window.freshToken() });
  window.client = client;
  window.got = [];
  client.addEventListener("message", (e) => window.got.push(e.detail.data));
  await client.connect();
  return client.state;
}
"""


@pytest.mark.browser
async def test_js_client_with_a_token_function_stays_connected_through_three_expiries(
    browser: Any,
) -> None:
    issued: list[str] = []

    def fresh_token() -> str:
        issued.append(short_token("js-carol"))
        return issued[-1]

    async with authed("uvicorn") as (hub, url):
        page = await browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        await page.expose_function("freshToken", fresh_token)
        await page.goto(url.replace("ws://", "http://").removesuffix("/ws") + "/static/tether.js")
        assert await page.evaluate(JS_TOKEN_CLIENT, [url, "js-carol"]) == "connected"
        first_expiry = token_expires_at(issued[0]) or 0

        async def refreshed() -> bool:
            count = await page.evaluate("() => window.client.tokenRefreshes")
            return bool(count >= 3 and time.time() > first_expiry)

        async with asyncio.timeout(30):
            while not await refreshed():
                await asyncio.sleep(0.1)
        counters = await page.evaluate("() => window.client.counters")
        assert counters["reconnects"] == 0
        assert await page.evaluate("() => window.client.state") == "connected"
        assert (await hub.send("js-carol", {"n": 1}, critical=True)).status is SendStatus.SENT
        async with asyncio.timeout(10):
            while await page.evaluate("() => window.got.length") < 1:
                await asyncio.sleep(0.05)
        assert await page.evaluate("() => window.got") == [{"n": 1}]
        assert errors == []
        await page.close()


@contextlib.asynccontextmanager
async def guarded_server(adapter: str, hub: Hub) -> AsyncIterator[tuple[int, Any]]:
    """A server of `hub` and the guard of its connections."""
    if adapter == "uvicorn":
        async with app_server(hub) as server:
            yield server.port, server.guard
    else:
        options = server_options(hub)
        guard = options["create_connection"].guard
        async with hub, websockets_serve(handler(hub), "127.0.0.1", 0, **options) as server:
            yield next(iter(server.sockets)).getsockname()[1], guard


@pytest.mark.parametrize("adapter", ["uvicorn", "websockets"])
async def test_waiting_connections_are_capped_oldest_dropped_first(adapter: str) -> None:
    hub = Hub(HubConfig(max_connections=64))  # a quarter may wait: 16
    async with guarded_server(adapter, hub) as (port, guard):
        assert guard.pending_limit == 16
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(40)]
        await until(lambda: guard.stats.handshakes_evicted >= 40 - 16, timeout=10)
        # The oldest were dropped (the server closed them); the newest still wait.
        async with asyncio.timeout(10):
            assert await idle[0][0].read() == b""
        assert guard.pending == 16
        async with await v1(
            f"ws://127.0.0.1:{port}" + ("/ws" if adapter == "uvicorn" else "")
        ) as ws:
            await hello(ws, "newcomer")
        for _, writer in idle:
            writer.close()


async def test_websockets_adapter_drops_a_silent_connection_after_the_handshake_timeout() -> None:
    hub = Hub(HubConfig(handshake_timeout=0.5))
    async with guarded_server("websockets", hub) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        async with asyncio.timeout(5):  # the library's default open_timeout is 10 s
            assert await reader.read() == b""
        writer.close()
