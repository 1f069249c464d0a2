"""One server-side WebSocket connection served by a hub: plain mode or tether.v1, written once.

The `websockets` and Starlette adapters differ only in how they receive, send and close;
everything about the protocol (hello first, hello timeout, ack and publish handling,
error frames, close codes, detaching from the hub on every exit) lives here so both
adapters behave identically and are tested once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from .. import protocol
from ..errors import HubClosedError, HubUnavailable
from .base import TransportClosed

if TYPE_CHECKING:
    from ..hub import Hub

log = logging.getLogger("tether.transports")
# An ack frame is short ({"type":"ack","seq":N}); anything longer is not offered to
# `Session.frame_now`, which would parse it only to hand it on.
_ACK_FRAME_MAX = 128


def offer_frame(hook: Callable[[str], bool], data: bytes | bytearray | memoryview) -> bool:
    """Hand a whole text frame's bytes to a session's frame hook (`Session.frame_now`)
    from an adapter's receive callback; True when the hook took it. Invalid UTF-8 and a
    failing hook leave the frame to the adapter's usual path (which reports 1007 for the
    former); a failure is logged, never raised into the server's protocol code."""
    try:
        return hook(str(data, "utf-8"))
    except UnicodeDecodeError:
        return False
    except Exception:
        log.exception("tether: frame hook failed; the frame goes the usual way")
        return False


SUBPROTOCOL = protocol.SUBPROTOCOL

# Close codes after which a connection ended normally rather than failed.
_NORMAL_CLOSES = frozenset({1000, 1001})

# Frames up to this many bytes beyond `max_message_size` are still read by the socket
# library, so our own size check can answer them with an `error` frame (a library-level
# limit would close with 1009 and no explanation). Anything larger is cut off by the library.
OVERSIZE_SLACK = 64 * 1024

# How far a connection may run ahead of `max_inbound_rate`: a burst of twice the rate.
BURST_FACTOR = 2.0

# Per-connection write buffer high-water mark for the socket libraries: a send waits
# (and `send_timeout` can cut a stalled peer off) once this much is unsent, so a client
# that stops reading holds at most this much kernel-side plus its outbox.
WRITE_LIMIT = 64 * 1024


# Pings and pongs a peer may send: `CONTROL_FRAME_RATE` per second, bursts up to
# `CONTROL_FRAME_BURST`. Each ping makes the server queue a pong, so without a budget a
# peer that pings and never reads grows the server's write buffer without bound.
CONTROL_FRAME_RATE = 10.0
CONTROL_FRAME_BURST = 50.0

# Beyond what a send may legitimately leave unsent (the write-limit plus one frame), this
# much more in a connection's write buffer means the peer is not reading while it makes
# the server write (pongs): the connection is closed and its buffer dropped.
WRITE_BUFFER_SLACK = 256 * 1024


def write_buffer_bound(max_frame_size: int) -> int:
    """The most a connection's outgoing buffer may hold before it is cut off."""
    return WRITE_LIMIT + max_frame_size + WRITE_BUFFER_SLACK


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    """What an `authenticate` hook may look at: the handshake request of the connection."""

    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]
    subprotocol: str | None
    remote: str | None = None
    extra: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Identity:
    """What an `authenticate` hook may return instead of a bare client id: the id and
    how many seconds its credentials remain valid (None: no expiry), measured on the
    hook's own clock and counted down by the server on the hub's (`Hub.clock`). When they
    run out the server ends the connection (`error` code `token_expired`, close 1008)
    unless the client sent a fresh token in an `auth` frame."""

    client_id: str
    expires_in: float | None = None
    # The channels the credentials grant (names, or prefixes ending in "*"); None: any
    # channel the hub's `authorize_subscribe` hooks allow.
    channels: frozenset[str] | None = None


Authenticate = Callable[[ConnectionInfo, "protocol.Hello | None"], Awaitable["str | Identity"]]
"""`async (info, hello) -> client_id | Identity`: return the client id to serve (it may
differ from the one the client asked for), or raise. A `protocol.ProtocolError` is
reported as is; any other exception becomes an `unauthorized` error with close code 1008.
`hello` is None in plain mode. The hook runs again for every `auth` frame (with a hello
carrying the connection's client id and the fresh token); it must name the same id."""


class PeerGone(Exception):
    """Raised by `ServerConnection.recv` when the peer closed or the connection dropped.

    `code` is the close code received, or None when the connection died without one.
    """

    def __init__(self, code: int | None = None, reason: str = "") -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


class TooBig(Exception):
    """Raised by `ServerConnection.recv` when the socket library refused an oversize frame."""


class ServerConnection(Protocol):
    """What an adapter provides: a `tether.Transport` that can also receive."""

    async def recv(self) -> str | bytes:
        """The next data frame; raises `PeerGone` when the connection is over."""
        ...

    async def send(self, data: str | bytes) -> None:
        """Write one frame; raises `TransportClosed` when the connection is gone."""
        ...

    async def close(self, code: int = 1000, reason: str = "") -> None: ...


class TokenBucket:
    """Frames a connection may still send: refills at `rate` per second up to `burst`.

    Monotonic wall time on purpose, not the hub's clock: a flood is a real-time thing.
    """

    __slots__ = ("burst", "clock", "rate", "stamp", "tokens")

    def __init__(
        self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.tokens = burst
        self.stamp = clock()

    def take(self) -> bool:
        """Spend one token; False when there is none (the sender is over its rate)."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class ConnectionCounter:
    """Open connections of one hub, across every adapter that serves it."""

    __slots__ = ("open",)

    def __init__(self) -> None:
        self.open = 0


# One counter per hub (weak: a hub that is gone takes its counter with it), so the
# `websockets` and Starlette adapters share `max_connections` without the hub knowing.
_COUNTERS: weakref.WeakKeyDictionary[Hub, ConnectionCounter] = weakref.WeakKeyDictionary()


def connection_counter(hub: Hub) -> ConnectionCounter:
    """The counter of `hub`'s open connections (created on first use)."""
    counter = _COUNTERS.get(hub)
    if counter is None:
        counter = _COUNTERS[hub] = ConnectionCounter()
    return counter


def anonymous_id() -> str:
    """A client id for a plain-mode client that did not name itself."""
    return "anon-" + uuid.uuid4().hex[:16]


def _close_reason(reason: str) -> str:
    # A close frame's reason is limited to 123 bytes of UTF-8.
    data = reason.encode("utf-8")
    return reason if len(data) <= 123 else data[:120].decode("utf-8", "ignore") + "..."


class Session:
    """Serves one accepted connection until it ends. Adapters call `await Session(...).run()`.

    The session itself is the `tether.Transport` the hub holds for the client (it wraps
    the adapter's connection), so it can watch the seqs the hub writes and so a close
    notice always names the very connection that ended. `abort()` drops the connection
    without a close handshake when the adapter supports it (`websockets` does).
    """

    def __init__(
        self,
        hub: Hub,
        conn: ServerConnection,
        info: ConnectionInfo,
        *,
        client_id_param: str = "client_id",
        authenticate: Authenticate | None = None,
        on_connected: Callable[[Session], None] | None = None,
    ) -> None:
        self.hub = hub
        self.on_connected = on_connected
        self.conn = conn
        self.info = info
        self.client_id_param = client_id_param
        self.authenticate = authenticate
        self.v1 = info.subprotocol == SUBPROTOCOL
        # The adapter's synchronous write, if it has one: the hub uses it when present.
        self.try_send: Callable[[str | bytes], bool] | None = getattr(conn, "try_send", None)
        self.client_id: str | None = None
        self.failed = False
        # When the connection's credentials expire, on the hub's clock (None: never).
        self.expires_at: float | None = None
        # The channels its credentials grant (None: no restriction from the credentials).
        self.channel_grants: frozenset[str] | None = None
        # Token expiry. Who may cancel what: only the session's own task starts and
        # cancels the watchdog (`_set_expiry`, and `run` on every exit), and never one
        # that is ending the connection (`_expiry_closing`: `run` waits for it instead).
        # The watchdog cancels only the session task, only while it waits in
        # `_recv_expiring`'s receive (`_receiving`), only when no other cancellation is
        # pending, and only once: it sets `_expired` first, and that receive takes its
        # cancellation back (`uncancel`, as `asyncio.Timeout` does) and raises `_Expired`.
        # A cancellation from anyone else (hub shutdown) still propagates as
        # CancelledError. Whatever the task is doing, the watchdog detaches the
        # connection from the hub at once; when the task is busy elsewhere (a slow
        # `on_message` handler, hook or store) it also writes the `token_expired` error
        # and closes, itself. `_ending` makes the error frame and the close happen once,
        # whichever of the two paths gets there first.
        self._expired = False
        self._ending = False
        self._expiry_closing = False
        self._watchdog: asyncio.Task[None] | None = None
        self._task: asyncio.Task[object] | None = None  # the session's, for the watchdog
        self._cancels_before = 0  # its `cancelling()` count when the watchdog started
        self._receiving = False
        self._expiry_cancel = False
        # A renewal under way: the `auth` hook checks a fresh token that arrived before
        # the deadline; done when it has an outcome. Until then (bounded by
        # `_renewal_until`, on the hub's clock) the watchdog waits instead of expiring.
        self._renewal: asyncio.Future[None] | None = None
        self._renewal_until = 0.0
        # Whether `send`/`try_send` refuse to write once `_expired` is set (installed for
        # connections whose credentials expire only: the others keep the plain writes).
        self._guarded = False
        cfg = hub.config
        self.bucket = TokenBucket(cfg.max_inbound_rate, cfg.max_inbound_rate * BURST_FACTOR)
        # The tether.v1 state while the connection is open (for `frame_now`).
        self._sp: protocol.ServerProtocol | None = None

    async def run(self) -> None:
        """Serve the connection; on any exit detach it from the hub (its outbox stays)."""
        counter = connection_counter(self.hub)
        counter.open += 1
        try:
            if counter.open > self.hub.config.max_connections:
                await self._over_capacity()
            elif self.v1:
                await self._run_v1()
            else:
                await self._run_plain()
        except asyncio.CancelledError:
            self.failed = True
            raise
        except Exception:
            self.failed = True
            log.exception("tether: connection of %s failed", self.client_id)
            if not self._ending:  # else the close is under way (the watchdog's)
                self._ending = True  # a watchdog firing during this close adds no other
                with contextlib.suppress(Exception):
                    await self.conn.close(1011, "internal error")
        finally:
            counter.open -= 1
            watchdog, self._watchdog = self._watchdog, None
            closing = watchdog is not None and self._expiry_closing
            if watchdog is not None and not closing:
                watchdog.cancel()
            if self.client_id is not None:
                self.hub.channel_connection_closed(self.client_id, self)
                await self.hub.disconnect(self.client_id, transport=self, failed=self.failed)
            if closing:
                assert watchdog is not None
                # It is writing the token_expired error and closing: let it finish (a
                # cancellation of this task, hub shutdown, cancels it too).
                try:
                    await asyncio.wait({watchdog})
                finally:
                    watchdog.cancel()

    async def _over_capacity(self) -> None:
        """Refuse a connection beyond `max_connections`: 1013, try again later."""
        self.failed = True
        limit = self.hub.config.max_connections
        log.warning("tether: refusing a connection: max_connections=%d reached", limit)
        error = protocol.ProtocolError(
            "unavailable",
            f"too many connections (max_connections={limit}); try again later",
            protocol.CloseCode.TRY_AGAIN_LATER,
        )
        if self.v1:
            with contextlib.suppress(TransportClosed):
                await self.conn.send(error.to_frame())
        await self._close(error.close_code, error.reason)

    async def _recv(self) -> str | bytes:
        """The next frame, charged to the connection's inbound rate; raises `_Expired`
        when the connection's token expires first."""
        if self.expires_at is None:
            data = await self.conn.recv()
        else:
            data = await self._recv_expiring()
        if not self.bucket.take():
            raise _RateLimited
        return data

    async def _recv_expiring(self) -> str | bytes:
        """The next frame of a connection whose credentials expire; raises `_Expired`
        when they have, or when the watchdog ends the receive because they just did.
        No timer per frame: the watchdog alone keeps the time."""
        if self._expired:
            raise _Expired
        self._receiving = True
        try:
            # Cancelling a receive is safe in both adapters (nothing is consumed).
            return await self.conn.recv()
        except asyncio.CancelledError:
            if self._expiry_cancel:
                self._expiry_cancel = False
                assert self._task is not None
                if self._task.uncancel() <= self._cancels_before:
                    raise _Expired from None  # the watchdog's cancellation, and only it
            raise
        finally:
            self._receiving = False

    # ------------------------------------------------------------------ plain mode

    async def _run_plain(self) -> None:
        client_id = self.info.query.get(self.client_id_param) or anonymous_id()
        if self.authenticate is not None:
            authed = await self._authenticated(None)
            if authed is None:
                return
            client_id = authed
        if not protocol.valid_client_id(client_id):
            self.failed = True
            await self._close(1008, f"invalid client id {client_id!r}")
            return
        try:
            await self.hub.connect(client_id, self)
        except HubUnavailable as exc:  # max_clients, backend down
            self.failed = True
            await self._close(protocol.CloseCode.TRY_AGAIN_LATER, str(exc))
            return
        except HubClosedError:
            await self._close(1001, "server shutting down")
            return
        if self._expired:  # while the hub connected it: nothing was written, nothing will be
            self.client_id = client_id
            await self._plain_refuse(1008, _PLAIN_EXPIRED)
            return
        self._connected(client_id)
        limit = self.hub.config.max_message_size
        while True:
            try:
                data = await self._recv()
            except PeerGone as gone:
                self.failed = gone.code not in _NORMAL_CLOSES
                return
            except TooBig:
                await self._plain_too_big(limit)
                return
            except _RateLimited:
                await self._plain_refuse(1008, self._rate_reason())
                return
            except _Expired:
                await self._plain_refuse(1008, _PLAIN_EXPIRED)
                return
            if len(data) > limit or (
                isinstance(data, str) and len(data) * 4 > limit and len(data.encode()) > limit
            ):
                await self._plain_too_big(limit)
                return
            await self.hub.receive(client_id, data)

    async def _plain_too_big(self, limit: int) -> None:
        await self._plain_refuse(1009, f"message exceeds {limit} bytes")

    async def _plain_refuse(self, code: int, reason: str) -> None:
        if self._ending:
            return  # the watchdog is closing the connection already
        self._ending = True
        self.failed = True
        log.info("tether: closing %s: %s (close %d)", self.client_id, reason, code)
        if self.client_id is not None:
            await self.hub.disconnect(self.client_id, transport=self, failed=True)
        await self._close(code, reason)

    def _rate_reason(self) -> str:
        return f"more than {self.hub.config.max_inbound_rate:g} frames per second"

    # ------------------------------------------------------------------ tether.v1

    async def _run_v1(self) -> None:
        cfg = self.hub.config
        sp = protocol.ServerProtocol(max_message_size=cfg.max_message_size)
        try:
            try:
                async with asyncio.timeout(cfg.hello_timeout):
                    raw = await self._recv_v1(sp)
            except TimeoutError:
                raise protocol.ProtocolError(
                    "hello_timeout",
                    f"no hello within {cfg.hello_timeout:g} seconds",
                    protocol.CloseCode.POLICY_VIOLATION,
                ) from None
            hello = sp.receive(raw)
            assert isinstance(hello, protocol.Hello)  # ServerProtocol enforces hello first
            client_id = hello.client_id
            if self.authenticate is not None:
                authed = await self._authenticated(hello)
                if authed is None:
                    return
                client_id = authed
                # An id the hook returned that breaks the rule is its mistake, not capacity.
                if not protocol.valid_client_id(client_id):
                    raise protocol.ProtocolError(
                        "invalid_client_id",
                        f"invalid client id {client_id!r}",
                        protocol.CloseCode.POLICY_VIOLATION,
                    )
            try:
                welcome = await self.hub.connect(client_id, self, hello=hello)
            except HubUnavailable as exc:
                raise protocol.ProtocolError(
                    "unavailable", str(exc), protocol.CloseCode.TRY_AGAIN_LATER
                ) from None
            except HubClosedError:
                raise protocol.ProtocolError(
                    "going_away", "server shutting down", protocol.CloseCode.GOING_AWAY
                ) from None
            if self._expired:
                # The token ran out while the hub connected it: the guarded writes let
                # nothing through (not even the welcome); detach it and say why.
                self.client_id = client_id
                raise _token_expired()
            self._connected(client_id)
            assert welcome is not None
            sp.welcome(welcome)  # the hub already wrote it; this opens the protocol state
            self._sp = sp
            hook = getattr(self.conn, "set_frame_hook", None)
            if hook is not None and self.hub.acks_in_process:  # handle acks as they arrive
                hook(self.frame_now)
            while True:
                raw = await self._recv_v1(sp)
                # The hub writes `msg` frames itself; it knows the highest seq written.
                sp.highest_sent = max(sp.highest_sent, self.hub.highest_sent(client_id))
                frame = sp.receive(raw)
                if isinstance(frame, protocol.Ack):
                    await self.hub.ack(client_id, frame.seq)
                elif isinstance(frame, protocol.Publish):
                    await self.hub.receive(client_id, protocol.decode_data(frame))
                elif isinstance(frame, protocol.Auth):
                    await self._reauthenticate(client_id, frame.token)
                elif isinstance(frame, protocol.Subscribe | protocol.Unsubscribe):
                    await self.hub.channel_frame(client_id, self, frame, self.channel_grants)
        except _Ended:
            return
        except protocol.ProtocolError as error:
            await self._fail(sp, error)
        finally:
            self._sp = None
            hook = getattr(self.conn, "set_frame_hook", None)
            if hook is not None:
                hook(None)

    def frame_now(self, raw: str | bytes) -> bool:
        """A text frame the adapter received while nothing is queued ahead of it: handled
        at once, in the adapter's receive callback (no task switch), when it is a valid
        ack the hub settles without suspending — the frame a busy tether.v1 connection
        receives most. False: nothing was done, the frame goes to `recv` as usual
        (anything else, an invalid ack, a rate-limited peer, a store to await)."""
        sp = self._sp
        client_id = self.client_id
        if (
            sp is None
            or client_id is None
            or self.expires_at is not None
            or not isinstance(raw, str)
            or len(raw) > _ACK_FRAME_MAX
            or '"ack"' not in raw
        ):
            return False  # not an ack: parsed once, by the receive loop
        hub = self.hub
        seq = sp.receive_ack_seq(raw, hub.highest_sent(client_id))
        if seq < 0 or not self.bucket.take():
            return False
        try:
            return hub.ack_now(client_id, seq) is not None
        except protocol.ProtocolError:
            return False  # `recv` gets it and reports the error

    async def _recv_v1(self, sp: protocol.ServerProtocol) -> str | bytes:
        try:
            return await self._recv()
        except _RateLimited:
            raise protocol.ProtocolError(
                "rate_limited", self._rate_reason(), protocol.CloseCode.POLICY_VIOLATION
            ) from None
        except _Expired:
            raise _token_expired() from None
        except PeerGone as gone:
            sp.close()
            self.failed = gone.code not in _NORMAL_CLOSES
            raise _Ended from None
        except TooBig:
            limit = self.hub.config.max_message_size
            raise protocol.ProtocolError(
                "too_big", f"frame exceeds {limit} bytes", protocol.CloseCode.MESSAGE_TOO_BIG
            ) from None

    async def send(self, data: str | bytes) -> None:
        """`Transport.send` for the hub. Raises `TransportClosed` (from the adapter) when
        the connection is gone."""
        await self.conn.send(data)

    def _guard_writes(self) -> None:
        """From now on the hub's writes (`send`, `try_send`) raise `TransportClosed` once
        the credentials have expired, whatever still holds the connection (a hub that is
        connecting it, a delivery under way): the hub then detaches it and keeps the
        messages. Installed as instance attributes, before the hub first sees the
        connection, and only for credentials that expire: the writes of every other
        connection stay the adapter's own, without a check per message."""
        if self._guarded:
            return
        self._guarded = True
        conn = self.conn
        fast = self.try_send

        async def send(data: str | bytes) -> None:
            if self._expired:
                raise TransportClosed("the token expired")
            await conn.send(data)

        self.send = send  # type: ignore[method-assign]
        if fast is not None:

            def try_send(data: str | bytes) -> bool:
                if self._expired:
                    raise TransportClosed("the token expired")
                return fast(data)

            self.try_send = try_send

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """`Transport.close` for the hub."""
        await self.conn.close(code, _close_reason(reason))

    def abort(self) -> None:
        """Drop the connection without a close handshake, when the adapter can."""
        abort = getattr(self.conn, "abort", None)
        if abort is not None:
            abort()

    async def _fail(self, sp: protocol.ServerProtocol, error: protocol.ProtocolError) -> None:
        """Report a protocol error to this client only: error frame, close, detach."""
        if self._ending:
            return  # the watchdog is closing the connection already (token_expired)
        self._ending = True
        self.failed = True
        log.info("tether: closing %s: %s (close %d)", self.client_id, error, error.close_code)
        if self.client_id is not None:
            # Detach first so the hub writes nothing after the error frame.
            await self.hub.disconnect(self.client_id, transport=self, failed=True)
        with contextlib.suppress(TransportClosed):
            await self.conn.send(sp.fail(error))
        await self._close(error.close_code, error.reason)

    # ------------------------------------------------------------------ shared

    def _connected(self, client_id: str) -> None:
        self.client_id = client_id
        if self.on_connected is not None:
            self.on_connected(self)

    async def _reauthenticate(self, client_id: str, token: str) -> None:
        """An `auth` frame: check the fresh token and move the expiry; raises
        `ProtocolError` (close 1008) when it is refused or names another client id."""
        if self.authenticate is None:
            return  # nothing expires without an authenticate hook
        if self._expired:
            raise _token_expired()  # too late: the watchdog is ending the connection
        renewal: asyncio.Future[None] | None = None
        if self.expires_at is not None:
            # Received before the deadline: should the hook answer after it, the
            # watchdog waits for the answer (at most `hello_timeout` from now) and the
            # connection keeps delivering meanwhile.
            renewal = asyncio.get_running_loop().create_future()
            self._renewal = renewal
            self._renewal_until = self.hub.clock.now() + self.hub.config.hello_timeout
        try:
            identity = await self._check_fresh_token(client_id, token)
            if self._expired:
                # The watchdog stopped waiting for the hook (`hello_timeout`) and has
                # ended the connection; a token cannot revive it.
                raise _token_expired()
            self._set_expiry(identity)  # cancels the waiting watchdog, starts the next
        finally:
            if renewal is not None:
                self._renewal = None
                if not renewal.done():
                    renewal.set_result(None)  # refused: the watchdog may go on
        await self.hub.channel_grants_changed(client_id, self, self.channel_grants)

    async def _check_fresh_token(self, client_id: str, token: str) -> str | Identity:
        """Run the `authenticate` hook on an `auth` frame's token; raises `ProtocolError`
        when it is refused or names another client id."""
        assert self.authenticate is not None
        try:
            identity = await self.authenticate(self.info, protocol.Hello(client_id, 0, token))
        except protocol.ProtocolError:
            raise
        except Exception as exc:
            raise protocol.ProtocolError(
                "unauthorized", str(exc) or "authentication failed", 1008
            ) from None
        renewed = identity.client_id if isinstance(identity, Identity) else identity
        if renewed != client_id:
            raise protocol.ProtocolError(
                "forbidden_client_id",
                "the fresh token names another client id",
                protocol.CloseCode.POLICY_VIOLATION,
            )
        return identity

    def _set_expiry(self, identity: str | Identity) -> None:
        """Take the expiry and the channel grants of fresh credentials: (re)start the
        watchdog that ends the connection when they run out (on the session's task)."""
        self.channel_grants = identity.channels if isinstance(identity, Identity) else None
        remaining = identity.expires_in if isinstance(identity, Identity) else None
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._expired = False
        if remaining is None:
            self.expires_at = None
            return
        self._guard_writes()
        clock = self.hub.clock
        self.expires_at = deadline = clock.now() + remaining
        self._task = task = asyncio.current_task()
        self._cancels_before = task.cancelling() if task is not None else 0
        self._watchdog = asyncio.get_running_loop().create_task(
            self._expire_after(deadline), name="tether-token-expiry"
        )

    async def _expire_after(self, deadline: float) -> None:
        """The watchdog: at `deadline` on the hub's clock the credentials have expired.
        Delivery stops now, whatever the session task is doing: writes are refused and
        the connection is detached from the hub (critical sends queue, in-flight
        messages go back to the outbox). A task waiting in the receive is cancelled
        there and reports the expiry itself; a task busy elsewhere is left to finish
        while the watchdog writes the error and closes (see `__init__` for who cancels
        what). A renewal received before the deadline and still being checked is waited
        for first (its success cancels this watchdog; its refusal ends the connection
        from the session task), for at most `hello_timeout` after it arrived."""
        clock = self.hub.clock
        await clock.sleep(deadline - clock.now())
        renewal = self._renewal
        if renewal is not None and not renewal.done():
            await self._await_renewal(renewal)
        self._expired = True
        task = self._task
        client_id = self.client_id
        if self._ending or task is None or task.cancelling() != self._cancels_before:
            return  # the connection is ending already, or its task is being cancelled
        if self._receiving:
            # The session task waits in the receive (it is not running: this is); the
            # cancellation lands there, whatever frame may be on its way.
            self._expiry_cancel = True
            task.cancel()
        elif client_id is not None:
            self._ending = self._expiry_closing = True
            self.failed = True
        if client_id is None:
            return  # not attached yet: its next receive reports the expiry
        self.hub.channel_connection_closed(client_id, self)
        await self.hub.disconnect(client_id, transport=self, failed=True)
        if not self._expiry_closing:
            return
        error = _token_expired()
        log.info("tether: closing %s: %s (close %d)", client_id, error, error.close_code)
        if self.v1:
            sp = self._sp
            with contextlib.suppress(TransportClosed):
                await self.conn.send(sp.fail(error) if sp is not None else error.to_frame())
            await self._close(error.close_code, error.reason)
        else:
            await self._close(1008, _PLAIN_EXPIRED)

    async def _await_renewal(self, renewal: asyncio.Future[None]) -> None:
        """Wait until the hook has answered the renewal, or until `_renewal_until`."""
        clock = self.hub.clock
        timer = asyncio.ensure_future(clock.sleep(self._renewal_until - clock.now()))
        try:
            await asyncio.wait({renewal, timer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()

    async def _authenticated(self, hello: protocol.Hello | None) -> str | None:
        """Run the `authenticate` hook; on refusal report it and return None."""
        assert self.authenticate is not None
        try:
            identity = await self.authenticate(self.info, hello)
            self._set_expiry(identity)
            client_id = identity.client_id if isinstance(identity, Identity) else identity
        except protocol.ProtocolError as error:
            rejection = error
        except Exception as exc:
            rejection = protocol.ProtocolError(
                "unauthorized", str(exc) or "authentication failed", 1008
            )
        else:
            return client_id
        self.failed = True
        if self.v1:
            with contextlib.suppress(TransportClosed):
                await self.conn.send(rejection.to_frame())
        await self._close(rejection.close_code, rejection.reason)
        return None

    async def _close(self, code: int, reason: str) -> None:
        """Close from the session's own task (nothing else is reading the connection).

        A peer refused for flooding usually has frames queued; a socket library that
        stopped reading (its receive queue full) would then never see the peer's close
        frame and hang until its close timeout. Reading the queue off while closing lets
        the handshake finish at once.
        """
        closing = asyncio.ensure_future(self.conn.close(code, _close_reason(reason)))
        reading: asyncio.Future[str | bytes] | None = None
        try:
            while not closing.done():
                reading = asyncio.ensure_future(self.conn.recv())
                await asyncio.wait({closing, reading}, return_when=asyncio.FIRST_COMPLETED)
                if reading.done() and reading.exception() is not None:
                    break  # the peer is gone (or the adapter refuses to read): just wait
        finally:
            if reading is not None and not reading.done():
                reading.cancel()
                await asyncio.wait({reading})
            with contextlib.suppress(Exception):
                await closing


_PLAIN_EXPIRED = "token_expired: the token expired"


def _token_expired() -> protocol.ProtocolError:
    return protocol.ProtocolError(
        "token_expired",
        "the token expired; send a fresh one in an auth frame before it does",
        protocol.CloseCode.POLICY_VIOLATION,
    )


class _Ended(Exception):
    """The peer went away: nothing to report, just detach."""


class _Expired(Exception):
    """The connection's token expired and no `auth` frame renewed it."""


class _RateLimited(Exception):
    """The peer sent frames faster than `max_inbound_rate` allows (beyond the burst)."""
