"""Serve a hub with the `websockets` library (asyncio API): a connection handler and `serve()`.

    hub = Hub()
    async with serve(hub, "127.0.0.1", 8765) as server:
        await server.serve_forever()

or, to configure `websockets.asyncio.server.serve` yourself,
`websockets.asyncio.server.serve(handler(hub), host, port, subprotocols=["tether.v1"],
select_subprotocol=select_subprotocol, ...)`.

Clients that offer the `tether.v1` subprotocol get the resumable protocol; any other
client is served in plain mode (payloads written as-is, client id from `?client_id=`).
Heartbeats are the library's ping/pong (`heartbeat_interval` / `heartbeat_timeout`).

Hardening (see docs/security.md): a request whose `Host` is not an allowed host
(`allowed_hosts`, DNS rebinding) gets HTTP 400, and a handshake from a browser origin not in
`allowed_origins` HTTP 403; the opening handshake must finish within `handshake_timeout`
(`open_timeout`); pings and pongs have a per-connection budget and a connection whose
write buffer outgrows its bound is cut off (`GuardedServerConnection`); each
connection's write buffer is bounded (`write_limit` 64 KiB); the session enforces
`max_connections` (1013), `max_inbound_rate` (1008), `max_message_size` (1009),
`hello_timeout` (1008) and token expiry (1008). With no `authenticate` hook given and
`auth_secret` set, clients must present a token signed with it (`tether.auth`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Awaitable, Callable, Sequence
from http import HTTPStatus
from typing import Any, ClassVar
from urllib.parse import parse_qsl, urlsplit

from websockets.asyncio.server import Server, ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import Event, Protocol, State
from websockets.streams import StreamReader
from websockets.typing import Subprotocol
from websockets.utils import apply_mask

from ..access import host_allowed, origin_patterns
from ..auth import auth_from_config
from ..hub import Hub
from .base import TransportClosed
from .connection import (
    CONTROL_FRAME_BURST,
    CONTROL_FRAME_RATE,
    OVERSIZE_SLACK,
    SUBPROTOCOL,
    WRITE_LIMIT,
    Authenticate,
    ConnectionInfo,
    PeerGone,
    Session,
    TokenBucket,
    TooBig,
    offer_frame,
    write_buffer_bound,
)
from .guard import ConnectionGuard, connection_guard

with contextlib.suppress(ImportError):  # the C unmasking the library's own parser uses
    from websockets.speedups import apply_mask

__all__ = [
    "GuardedServerConnection",
    "Handler",
    "WebSocketsTransport",
    "guarded_connection",
    "handler",
    "select_subprotocol",
    "serve",
    "server_options",
]


class WebSocketsTransport:
    """A `websockets` server connection as a `tether.Transport` that can also receive."""

    __slots__ = ("ws",)

    def __init__(self, ws: ServerConnection) -> None:
        self.ws = ws

    async def send(self, data: str | bytes) -> None:
        try:
            await self.ws.send(data)
        except ConnectionClosed as exc:
            raise TransportClosed(str(exc)) from exc

    def try_send(self, data: str | bytes) -> bool:
        """Write now, without awaiting, if the connection can take the frame at once:
        open, no fragmented send in progress, write buffer under `WRITE_LIMIT`. This is
        what `websockets.broadcast()` does; it halves the cost of a delivery. False
        means "use `send`", which waits for the buffer to drain under `send_timeout`.

        Without extensions (no compression) the frame is framed here and written to the
        socket directly — the bytes the library would write — and a frame whose data is
        the very object framed last (a broadcast's shared payload) is framed once."""
        ws = self.ws
        protocol = ws.protocol
        transport = ws.transport
        if (
            protocol.state is not _OPEN
            or ws.send_in_progress is not None
            or transport.is_closing()  # a failed write closed it; the library hears later
            or transport.get_write_buffer_size() > WRITE_LIMIT
        ):
            return False
        if (
            protocol.extensions
            or protocol.writes
            or protocol.expect_continuation_frame
            or protocol.debug
        ):
            if isinstance(data, str):
                protocol.send_text(data.encode())
            else:
                protocol.send_binary(data)
            ws.send_data()
            return True
        last = _LAST_FRAME  # one read: (data, frame) stay a pair
        transport.write(last[1] if last[0] is data else _frame_of(data))
        return True

    def set_frame_hook(self, hook: Callable[[str], bool] | None) -> None:
        """Let `hook` take complete text frames as they arrive (see `Session.frame_now`);
        None removes it. Only `GuardedServerConnection` (what `serve()` uses) offers it."""
        if isinstance(self.ws, GuardedServerConnection):
            self.ws.frame_hook = hook

    async def recv(self) -> str | bytes:
        try:
            return await self.ws.recv()
        except ConnectionClosed as exc:
            if exc.rcvd is None and exc.sent is not None and exc.sent.code == 1009:
                raise TooBig from exc  # the library refused a frame over `max_size`
            raise PeerGone(
                exc.rcvd.code if exc.rcvd else None, exc.rcvd.reason if exc.rcvd else ""
            ) from exc

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self.ws.close(code, reason)

    def abort(self) -> None:
        """Drop the TCP connection at once, without a close handshake (like a network cut)."""
        self.ws.transport.abort()


log = logging.getLogger("tether.transports")

_OPEN = State.OPEN  # module level: enum attribute lookups are slow on a per-frame path
_TEXT_HEADER = 0x81  # FIN + text opcode: a whole frame, server side (never masked)
_BINARY_HEADER = 0x82
_LAST_FRAME: tuple[object, bytes] = (None, b"")
# Headers made once: of frames under 126 bytes (binary, text: indexed by `first & 1`), and
# the packer of the 16-bit length form (one call instead of three objects per frame).
_SHORT_HEADERS = tuple(
    tuple(bytes((first, size)) for size in range(126)) for first in (_BINARY_HEADER, _TEXT_HEADER)
)
_pack_header16 = struct.Struct("!BBH").pack


def _frame_of(data: str | bytes) -> bytes:
    """The WebSocket frame of one whole message (unmasked, no extension); remembered as
    the last one framed, for the next client of the same broadcast."""
    global _LAST_FRAME
    if isinstance(data, str):
        payload = data.encode()
        first = _TEXT_HEADER
    else:
        payload = data
        first = _BINARY_HEADER
    size = len(payload)
    if size < 126:
        frame = _SHORT_HEADERS[first & 1][size] + payload
    elif size < 65536:
        frame = _pack_header16(first, 126, size) + payload
    else:
        frame = bytes((first, 127)) + size.to_bytes(8, "big") + payload
    _LAST_FRAME = (data, frame)
    return frame


_CONTROL_OPCODES = frozenset({Opcode.PING, Opcode.PONG})
_TEXT = Opcode.TEXT


class GuardedServerConnection(ServerConnection):
    """A `websockets` server connection whose pings cannot grow the server's memory.

    The library answers every ping with a pong as it reads, whether or not the peer
    reads what it is sent, and pings never count against `max_queue`. Here pings and
    pongs spend a per-connection budget (`CONTROL_FRAME_RATE` per second, bursts of
    `CONTROL_FRAME_BURST`), and a connection whose write buffer exceeds
    `write_buffer_bound` is closed (1008) and dropped at once, freeing the buffer.

    With a `guard` (`serve()` sets one per server), connections that have not sent their
    handshake request are capped and the total stays under the file-descriptor budget:
    the oldest waiting connection is dropped to make room (`tether.transports.guard`).
    """

    guard: ClassVar[ConnectionGuard | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.counted = False
        self.control_budget = TokenBucket(CONTROL_FRAME_RATE, CONTROL_FRAME_BURST)
        max_size = getattr(self.protocol, "max_message_size", None) or 1 << 20
        self.buffer_bound = write_buffer_bound(max_size)
        self.cut_reason: str | None = None
        # Set by the session while a tether.v1 connection is open (`Session.frame_now`).
        self.frame_hook: Callable[[str], bool] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        guard = self.guard
        if guard is None:
            return
        guard.open += 1
        self.counted = True
        if not guard.admit(self, guard.open):
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        guard = self.guard
        if guard is not None and self.counted:
            self.counted = False
            guard.open -= 1
            guard.done(self)
        super().connection_lost(exc)

    def drop(self) -> None:
        """Close at once: the peer has not even sent its handshake request."""
        self.transport.abort()

    def process_event(self, event: Event) -> None:
        if type(event) is Frame:
            opcode = event.opcode
            if opcode is _TEXT:
                hook = self.frame_hook
                # A whole text frame with nothing queued ahead of it: the session may
                # settle it here (an ack) instead of waking its task for it.
                if (
                    hook is not None
                    and event.fin
                    and not _queued(self)
                    and offer_frame(hook, event.data)
                ):
                    return
            elif opcode in _CONTROL_OPCODES and not self.control_budget.take():
                self.cut(f"more than {CONTROL_FRAME_RATE:g} pings/pongs per second")
                return
        elif isinstance(event, Request) and self.guard is not None:
            self.guard.done(self)  # the request arrived; `open_timeout` covers the rest
        super().process_event(event)

    def data_received(self, data: bytes) -> None:
        if self.cut_reason is not None:
            return
        hook = self.frame_hook
        taken = 0 if hook is None else _frames_now(self, hook, data)
        if taken < len(data):
            super().data_received(data[taken:] if taken else data)
        transport = self.transport
        if (
            self.cut_reason is None
            and transport is not None
            and transport.get_write_buffer_size() > self.buffer_bound
        ):
            self.cut(f"write buffer over {self.buffer_bound} bytes: the peer does not read")

    def cut(self, reason: str) -> None:
        """Close with 1008 and `reason`; drop the TCP connection now if its buffer is large."""
        if self.cut_reason is not None:
            return
        self.cut_reason = reason
        if self.guard is not None:
            self.guard.stats.flood_closes += 1
        log.warning("tether: closing %s: %s (close 1008)", self.remote_address, reason)
        if self.protocol.state is State.OPEN:
            self.protocol.fail(1008, reason)
            self.send_data()
        transport = self.transport
        if transport.get_write_buffer_size() > WRITE_LIMIT:
            transport.abort()  # a peer that does not read would never take the close frame
        else:
            transport.close()
            self.loop.call_later(self.close_timeout or 5.0, transport.abort)


# The generator code a `websockets` parser is suspended in between two frames, when the
# library looks like the versions this was written against (else the fast path is off).
# Older releases (the floor is 13.0) name the protocol's size fields differently: the
# fast path needs both, else it stays off rather than fail on every read.
_AT_EOF_CODE = getattr(getattr(StreamReader, "at_eof", None), "__code__", None)
_FIELDS_KNOWN = {"current_size", "max_message_size"} <= set(Protocol.__init__.__code__.co_names)


def _between_frames(protocol: Any) -> bool:
    """Whether the library's frame parser waits for the first byte of a frame, with
    nothing buffered: bytes handed to it now start a frame."""
    if _AT_EOF_CODE is None or protocol.reader.buffer:
        return False
    gen = getattr(protocol, "parser", None)
    for _ in range(4):  # ServerProtocol.parse -> Protocol.parse -> StreamReader.at_eof
        inner = getattr(gen, "gi_yieldfrom", None)
        if inner is None:
            return getattr(gen, "gi_code", None) is _AT_EOF_CODE
        gen = inner
    return False


def _frames_now(
    connection: GuardedServerConnection, hook: Callable[[str], bool], data: bytes
) -> int:
    """How many leading bytes of `data` the session's frame hook took, without the
    library parsing them: whole, short, masked text frames (acks) arriving on an open
    connection between two frames, with nothing queued and no extension. Each one goes
    to `hook` exactly as `process_event` would hand it; the first frame it does not take
    (or anything else: a ping, a longer or partial frame) and all that follows go to the
    library, which is then at that frame's first byte. The library's frame parse is
    most of the cost of an ack; this skips it.

    A frame taken here is one the library would have accepted: FIN, no RSV bit (no
    extension is active), the text opcode, masked, under 126 bytes (and under the
    library's size limit), valid UTF-8 (`offer_frame` declines anything else)."""
    protocol = connection.protocol
    if (
        not _FIELDS_KNOWN
        or protocol.state is not _OPEN
        or protocol.current_size is not None  # inside a fragmented message
        or protocol.extensions
        or protocol.debug
        or _queued(connection)
        or not _between_frames(protocol)
    ):
        return 0
    limit = protocol.max_message_size
    end = len(data)
    pos = 0
    while end - pos > 6:
        if data[pos] != _TEXT_HEADER:
            break
        size = data[pos + 1] ^ 0x80  # the mask bit must be set: 126 and above otherwise
        stop = pos + 6 + size
        if size >= 126 or stop > end or (limit is not None and size > limit):
            break
        payload = apply_mask(data[pos + 6 : stop], data[pos + 2 : pos + 6])
        if not offer_frame(hook, payload):
            break
        pos = stop
    return pos


def _queued(connection: ServerConnection) -> int:
    """Frames received but not yet read by the connection's task (1 if unknown)."""
    frames = getattr(connection.recv_messages, "frames", None)
    return 1 if frames is None else len(frames)


def guarded_connection(guard: ConnectionGuard) -> type[GuardedServerConnection]:
    """A `GuardedServerConnection` class whose connections share `guard` (one per server)."""
    return type("GuardedServerConnection", (GuardedServerConnection,), {"guard": guard})


def host_check(
    allowed_hosts: Sequence[str],
) -> Callable[[ServerConnection, Request], Response | None]:
    """A `process_request` hook answering HTTP 400 when `Host` is not an allowed host."""

    def process_request(connection: ServerConnection, request: Request) -> Response | None:
        if host_allowed(request.headers.get("Host"), allowed_hosts):
            return None
        return connection.respond(HTTPStatus.BAD_REQUEST, "Invalid host header\n")

    return process_request


def _chain(
    first: Callable[[ServerConnection, Request], Response | None],
    then: Callable[[ServerConnection, Request], Awaitable[Response | None] | Response | None],
) -> Callable[[ServerConnection, Request], Awaitable[Response | None]]:
    async def process_request(connection: ServerConnection, request: Request) -> Response | None:
        refusal = first(connection, request)
        if refusal is not None:
            return refusal
        result = then(connection, request)
        if isinstance(result, Awaitable):
            return await result
        return result

    return process_request


def select_subprotocol(
    connection: ServerConnection, subprotocols: Sequence[Subprotocol]
) -> Subprotocol | None:
    """Pick `tether.v1` when the client offers it; otherwise continue in plain mode.

    (The library's default would refuse a client that offers no subprotocol at all.)
    """
    return Subprotocol(SUBPROTOCOL) if SUBPROTOCOL in subprotocols else None


class Handler:
    """The connection handler `handler()` returns; `sessions` holds the live ones by client id."""

    def __init__(
        self, hub: Hub, *, client_id_param: str, authenticate: Authenticate | None
    ) -> None:
        self.hub = hub
        self.client_id_param = client_id_param
        # No hook given: `auth_secret` (TETHER_AUTH_SECRET), if set, turns on signed tokens.
        self.authenticate = (
            authenticate
            if authenticate is not None
            else auth_from_config(hub.config.auth_secret, clock=hub.clock.wall)
        )
        self.sessions: dict[str, Session] = {}

    async def __call__(self, ws: ServerConnection) -> None:
        request = ws.request
        hosts = self.hub.config.effective_allowed_hosts
        if request is not None and not host_allowed(request.headers.get("Host"), hosts):
            # `serve()` refuses these with HTTP 400 before the handshake; this covers a
            # handler installed in a server configured by hand.
            await ws.close(1008, "host not allowed")
            return
        target = urlsplit(request.path if request is not None else "/")
        info = ConnectionInfo(
            path=target.path,
            query=dict(parse_qsl(target.query)),
            headers={k.lower(): v for k, v in request.headers.raw_items()} if request else {},
            subprotocol=ws.subprotocol,
            remote=str(ws.remote_address) if ws.remote_address else None,
        )
        session = Session(
            self.hub,
            WebSocketsTransport(ws),
            info,
            client_id_param=self.client_id_param,
            authenticate=self.authenticate,
            on_connected=self._track,
        )
        try:
            await session.run()
        finally:
            if session.client_id is not None and self.sessions.get(session.client_id) is session:
                del self.sessions[session.client_id]

    def _track(self, session: Session) -> None:
        assert session.client_id is not None
        self.sessions[session.client_id] = session


def handler(
    hub: Hub,
    *,
    client_id_param: str = "client_id",
    authenticate: Authenticate | None = None,
) -> Handler:
    """A connection handler for `websockets.asyncio.server.serve` that serves `hub`.

    Pass `select_subprotocol=select_subprotocol` and `subprotocols=["tether.v1"]` to
    `serve` (or use `tether.transports.websockets.serve`, which does). `authenticate`,
    `async (info, hello) -> client_id`, may refuse a connection by raising (see
    `tether.auth`); when None, `hub.config.auth_secret` decides (signed tokens if set).
    """
    return Handler(hub, client_id_param=client_id_param, authenticate=authenticate)


def serve(
    hub: Hub,
    host: str | None = None,
    port: int | None = None,
    *,
    client_id_param: str = "client_id",
    authenticate: Authenticate | None = None,
    **kwargs: Any,
) -> Server:
    """`websockets.asyncio.server.serve` for `hub`, configured from `hub.config`.

    Use as `async with serve(hub, host, port) as server: ...` (or `server = await
    serve(...)`). Pings every `heartbeat_interval` seconds, and a connection whose pong
    does not come within `heartbeat_timeout` is closed (and the hub detaches it at most
    `min(heartbeat_timeout, 5)` seconds later, the close handshake's timeout). Frames
    up to `max_message_size` (plus a small slack, so an oversize frame gets an
    explanatory `error` frame) are accepted. `kwargs` go to `websockets` as-is and
    override these defaults (for example `write_limit`, or `ping_interval=None`).
    """
    options = server_options(hub)
    own_check = options.get("process_request")
    theirs = kwargs.get("process_request")
    options.update(kwargs)
    if own_check is not None and theirs is not None:
        options["process_request"] = _chain(own_check, theirs)
    return ws_serve(
        handler(hub, client_id_param=client_id_param, authenticate=authenticate),
        host,
        port,
        **options,
    )


def server_options(hub: Hub) -> dict[str, Any]:
    """The `websockets.asyncio.server.serve` keyword arguments `serve()` derives from
    `hub.config`: subprotocol negotiation, heartbeats, the frame size limit, the write
    buffer bound, the handshake timeout, the allowed hosts and origins, and the
    connection class that budgets pings."""
    cfg = hub.config
    options: dict[str, Any] = {
        # Every TCP connection must finish its opening handshake in this time.
        "open_timeout": cfg.handshake_timeout,
        "create_connection": guarded_connection(connection_guard(cfg)),
        "subprotocols": [Subprotocol(SUBPROTOCOL)],
        "select_subprotocol": select_subprotocol,
        "ping_interval": cfg.heartbeat_interval,
        "ping_timeout": cfg.heartbeat_timeout,
        # After a missed pong the library still attempts a close handshake before it
        # drops the TCP connection; a dead peer never answers, so keep that wait short
        # for the hub to learn of the loss soon after `heartbeat_timeout`.
        "close_timeout": min(cfg.heartbeat_timeout, 5.0),
        "max_size": cfg.max_message_size + OVERSIZE_SLACK,
        # A send waits once this much is unsent, so a peer that stops reading is cut
        # off by `send_timeout` instead of growing a buffer without bound.
        "write_limit": WRITE_LIMIT,
    }
    hosts = cfg.effective_allowed_hosts
    if hosts:
        options["process_request"] = host_check(hosts)
    if cfg.allowed_origins:
        # The library answers any other browser origin with HTTP 403 before the
        # handshake completes; None admits clients that send no Origin (non-browsers).
        options["origins"] = [*origin_patterns(cfg.allowed_origins), None]
    return options
