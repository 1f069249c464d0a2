"""tether.Client: a resumable tether.v1 client — reconnects, resumes, acks, never loses silently.

    async with Client("ws://127.0.0.1:8765", client_id="alice") as client:
        client.on_lost(lambda lost: print("lost", lost.count, lost.ranges, lost.reset))
        async for msg in client:          # Message(data, id, seq)
            print(msg.seq, msg.data)

Guarantees: every critical message is handed to the application exactly once and in
seq order for the lifetime of the `Client` object, or reported as lost — never skipped
silently. Losses are reported in stream order: `on_lost` callbacks run inside the
iteration, just before the first message after the gap is yielded (or when the
iteration reaches that point), and `client.lost` counts them as soon as they are known.
Non-critical messages (`msg.seq is None`) are best-effort.

Channels: `sub = await client.subscribe("news")` is an async iterator of `Publication`s
(offset, id, data), each offset once and in order or reported through `sub.on_lost`; it
resubscribes from its last offset after every reconnect (docs/protocol.md §11).

`token` is a string, or a function (sync or async) returning a fresh one: it is called
before every connection and, for tokens with an expiry (Tether's signed tokens), again
ahead of that expiry, the fresh token going to the server in an `auth` frame so the
connection stays open. A `token_expired` close then only happens if the refresh failed,
and with a function the client reconnects with a fresh token instead of stopping.

The connection is re-established with exponential backoff and full jitter
(`backoff_base`, `backoff_max`, `max_reconnect_attempts`). A rejection by the server
(an `error` frame followed by close 1002/1003/1007/1008/1009, or HTTP 401/403 at the
handshake) stops the client: the iteration raises `TetherRejected` (`TetherAuthError`
for authentication), after yielding what had already arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import inspect
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from . import protocol
from .channels.cursor import ChannelCursor
from .protocol import Lost
from .subscription import RESUBSCRIBE_CODES, Publication, Subscription, SubscriptionRefused

__all__ = [
    "Client",
    "ClientState",
    "Lost",
    "Message",
    "Publication",
    "Subscription",
    "SubscriptionRefused",
    "TetherAuthError",
    "TetherConnectionError",
    "TetherError",
    "TetherProtocolError",
    "TetherRejected",
]

log = logging.getLogger("tether.client")

# Close codes after an `error` frame that mean "do not come back like this".
_FATAL_CLOSES = frozenset({1002, 1003, 1007, 1008, 1009, 1010})
_AUTH_CODES = frozenset({"unauthorized", "forbidden", "auth_failed", "invalid_token"})
# The server reads frames a little over its limit so it can explain a refusal; the
# client mirrors that so the server's own `error` frames are never cut off.
_SIZE_SLACK = 64 * 1024


class ClientState(enum.Enum):
    CONNECTING = "connecting"  # first connection attempt(s)
    CONNECTED = "connected"  # welcome received
    RECONNECTING = "reconnecting"  # the connection dropped; retrying with backoff
    CLOSED = "closed"  # closed by the application, rejected, or gave up


@dataclass(frozen=True, slots=True)
class Message:
    """One message for the application. `seq` is None for a non-critical message."""

    data: Any
    id: str
    seq: int | None


class TetherError(Exception):
    """Base class of the client's errors."""


class TetherRejected(TetherError):
    """The server refused this client (an `error` frame and a policy close); not retried."""

    def __init__(self, code: str, reason: str, close_code: int | None = None) -> None:
        super().__init__(f"{code}: {reason}" + (f" (close {close_code})" if close_code else ""))
        self.code = code
        self.reason = reason
        self.close_code = close_code


class TetherAuthError(TetherRejected):
    """The server refused the client's credentials (HTTP 401/403 or an auth error frame)."""


class TetherProtocolError(TetherError):
    """The server broke the tether.v1 protocol; the client stopped rather than guess."""


class TetherConnectionError(TetherError):
    """The client gave up reconnecting (`max_reconnect_attempts`) or the connection was
    lost during `publish`."""


LostCallback = Callable[[Lost], "Awaitable[None] | None"]
TokenSource = Callable[[], "str | Awaitable[str]"]

# Refresh a token when this share of its remaining lifetime is left (at least
# `_REFRESH_MIN_AHEAD` seconds, but never more than half of what is left).
_REFRESH_SHARE = 0.25
_REFRESH_MIN_AHEAD = 1.0


@dataclass(frozen=True, slots=True)
class _End:
    error: BaseException | None


class _Fatal(Exception):
    def __init__(self, error: TetherError) -> None:
        super().__init__(error)
        self.error = error


class Client:
    """A tether.v1 client with exactly-once, in-order delivery of critical messages.

    `url` may be a list of URLs of hub nodes that share a backend: after a failed
    attempt the client tries the next one. Options: `token` (a string sent in `hello`,
    or a sync/async function returning a fresh one, refreshed ahead of expiry);
    `last_seq` (resume point persisted by the app from `client.last_seq`);
    `backoff_base` / `backoff_max` seconds and `max_reconnect_attempts` (consecutive
    failed attempts; None = forever); `ack_every` messages / `ack_interval` seconds
    (acks are cumulative and batched); `max_buffer` (messages received but not yet
    iterated; beyond it the client stops reading and the server holds the rest);
    `open_timeout`, `ping_interval`, `ping_timeout`, `max_message_size`, `headers`
    (extra HTTP headers), `rng` (for reproducible jitter) and `connect_options`
    (passed to `websockets.asyncio.client.connect`).
    Counters: `received`, `duplicates`, `reconnects`, `lost`.
    """

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        client_id: str | None = None,
        token: str | TokenSource | None = None,
        last_seq: int = 0,
        epoch: str | None = None,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        max_reconnect_attempts: int | None = None,
        ack_every: int = 64,
        ack_interval: float = 0.05,
        max_buffer: int = 10_000,
        open_timeout: float | None = 10.0,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        max_message_size: int = protocol.DEFAULT_MAX_MESSAGE_SIZE,
        headers: Mapping[str, str] | None = None,
        rng: random.Random | None = None,
        connect_options: Mapping[str, Any] | None = None,
    ) -> None:
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise ValueError("need at least one URL")
        for candidate in urls:
            try:
                parse_uri(candidate)
            except InvalidURI as exc:
                raise ValueError(str(exc)) from None
        if backoff_base <= 0 or backoff_max < backoff_base:
            raise ValueError("need 0 < backoff_base <= backoff_max")
        if max_reconnect_attempts is not None and max_reconnect_attempts < 0:
            raise ValueError("max_reconnect_attempts must be >= 0 or None")
        if max_buffer < 1:
            raise ValueError("max_buffer must be >= 1")
        # Several URLs (hub nodes sharing a Redis backend): a failed attempt moves on to
        # the next one, so the client fails over when its node dies.
        self.urls = urls
        self.url = urls[0]
        self.client_id = client_id if client_id is not None else "py-" + uuid.uuid4().hex[:16]
        self._token_source: TokenSource | None = token if callable(token) else None
        self._cp = protocol.ClientProtocol(
            self.client_id,
            last_seq=last_seq,
            token=token if isinstance(token, str) else None,
            epoch=epoch,
            ack_every=ack_every,
            ack_interval=ack_interval,
            max_message_size=max_message_size + _SIZE_SLACK,
        )
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.max_reconnect_attempts = max_reconnect_attempts
        self.max_buffer = max_buffer
        self._connect_options: dict[str, Any] = {
            "open_timeout": open_timeout,
            "ping_interval": ping_interval,
            "ping_timeout": ping_timeout,
            "max_size": max_message_size + _SIZE_SLACK,
            "additional_headers": dict(headers) if headers else None,
            **(connect_options or {}),
        }
        self._rng = rng if rng is not None else random.Random()
        self.received = 0
        self.reconnects = 0
        self.lost = 0
        self.token_refreshes = 0  # fresh tokens sent in `auth` frames
        self.welcome: protocol.Welcome | None = None
        self._state = ClientState.CLOSED
        self._ws: ClientConnection | None = None
        self._items: asyncio.Queue[Message | Lost | _End] = asyncio.Queue()
        self._space = asyncio.Event()
        self._connected = asyncio.Event()
        self._welcomed = asyncio.Event()  # set at the first welcome, never cleared
        self._ack_wake = asyncio.Event()
        self._callbacks: list[LostCallback] = []
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._error: BaseException | None = None
        self._ended = False
        self._subs: dict[str, Subscription] = {}
        self._pending_sends: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ public

    @property
    def state(self) -> ClientState:
        return self._state

    @property
    def duplicates(self) -> int:
        """Critical messages received again (after a resume) and dropped."""
        return self._cp.duplicates

    @property
    def last_seq(self) -> int:
        """The highest seq delivered or reported lost; persist it to resume after a restart."""
        return self._cp.last_seq

    @property
    def epoch(self) -> str | None:
        """The identity of the server's stream `last_seq` belongs to; persist it with
        `last_seq` so a resume after a restart can tell a recreated stream from yours."""
        return self._cp.epoch

    @property
    def connection(self) -> ClientConnection | None:
        """The current `websockets` connection (None between connections)."""
        return self._ws

    def on_lost(self, callback: LostCallback) -> LostCallback:
        """Call `callback(lost)` (sync or async) for every loss, in stream order."""
        self._callbacks.append(callback)
        return callback

    async def connect(self) -> None:
        """Start the client and wait for the first welcome. `async with` calls this.

        Raises the client's terminal error if it stopped before it was ever welcomed.
        """
        if self._task is None:
            self._state = ClientState.CONNECTING
            self._task = asyncio.create_task(self._run(), name=f"tether-client-{self.client_id}")
        await self._wait(self._welcomed)

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until connected; raises the client's terminal error if it stopped."""
        async with asyncio.timeout(timeout):
            await self._wait(self._connected)

    async def _wait(self, event: asyncio.Event) -> None:
        task = self._task
        if task is None:
            raise TetherError("client is not running; call connect() first")
        while not event.is_set():
            if task.done():
                raise self._error if self._error is not None else TetherError("client is closed")
            waiter = asyncio.ensure_future(event.wait())
            try:
                await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()

    async def publish(self, data: Any, *, id: str | None = None) -> None:
        """Send `data` to the server's `on_message` handlers (waits for a connection).

        Publishing is at-most-once: if the connection drops while sending this raises
        `TetherConnectionError` and the message may or may not have arrived.
        """
        if self._task is None or self._closing:
            raise TetherError("client is not running")
        await self.wait_connected()
        ws = self._ws
        if ws is None:
            raise TetherConnectionError("connection lost before publishing")
        try:
            await ws.send(self._cp.publish(data, id=id))
        except (ConnectionClosed, protocol.ProtocolError) as exc:
            raise TetherConnectionError(f"connection lost while publishing: {exc}") from exc

    # ------------------------------------------------------------------ channels

    @property
    def subscriptions(self) -> dict[str, Subscription]:
        """The channel subscriptions, by channel (the server's own ones included)."""
        return dict(self._subs)

    async def subscribe(
        self,
        channel: str,
        *,
        presence: bool = False,
        since: tuple[str, int] | None = None,
    ) -> Subscription:
        """Subscribe to `channel` and wait for the server's answer; returns the
        `Subscription` (an async iterator of `Publication`s), which resubscribes from its
        last offset after every reconnect. `presence` asks for join/leave events; `since`
        (epoch, offset) resumes a position persisted from an earlier `Subscription`.

        Raises ValueError for an invalid channel name, `SubscriptionRefused` when the
        server refuses (code `forbidden` from an `authorize_subscribe` hook), or the
        client's terminal error if it stops first.
        """
        if self._task is None or self._closing:
            raise TetherError("client is not running; call connect() first")
        if not isinstance(channel, str) or protocol.CHANNEL_PATTERN.fullmatch(channel) is None:
            raise ValueError(f"invalid channel name {channel!r}")
        sub = self._subs.get(channel)
        if sub is None:
            cursor = ChannelCursor(channel)
            if since is not None:
                cursor = ChannelCursor(channel, epoch=since[0], offset=since[1])
            sub = Subscription(self, channel, presence=presence, cursor=cursor)
            self._subs[channel] = sub
            await self._send_subscribe(sub)
        try:
            await sub.wait_subscribed()
        except BaseException:
            if sub.ended and self._subs.get(channel) is sub:
                del self._subs[channel]
            raise
        return sub

    async def _send_subscribe(self, sub: Subscription) -> None:
        """Send `subscribe` for `sub` on the current connection, once per connection (a
        later welcome sends it again)."""
        ws = self._ws
        if ws is None or not self._connected.is_set() or sub.sent_on is ws or sub.ended:
            return
        sub.cursor.subscribing()
        sub.sent_on = ws
        try:
            frame = self._cp.subscribe(sub.channel, sub.cursor.since(), presence=sub.presence)
            await ws.send(frame)
        except (ConnectionClosed, protocol.ProtocolError):
            sub.sent_on = None  # sent again after the next welcome

    def _resubscribe_soon(self, sub: Subscription) -> None:
        if self._subs.get(sub.channel) is sub and not sub.ended:
            sub.resubscribes += 1
            task = asyncio.ensure_future(self._send_subscribe(sub))
            self._pending_sends.add(task)
            task.add_done_callback(self._pending_sends.discard)

    async def _unsubscribe(self, sub: Subscription) -> None:
        if self._subs.get(sub.channel) is sub:
            del self._subs[sub.channel]
        sub.end(None)
        ws = self._ws
        if ws is not None and self._connected.is_set():
            with contextlib.suppress(ConnectionClosed, protocol.ProtocolError):
                await ws.send(self._cp.unsubscribe(sub.channel))

    async def _channel_event(self, event: protocol.ChannelFrame) -> None:
        sub = self._subs.get(event.channel)
        if isinstance(event, protocol.Subscribed):
            if sub is None:  # the server subscribed this client itself (hub.subscribe)
                sub = Subscription(
                    self, event.channel, presence=False, cursor=ChannelCursor(event.channel)
                )
                self._subs[event.channel] = sub
                sub.sent_on = self._ws
            sub.on_subscribed(event)
            return
        if sub is None:
            return  # in flight when the application unsubscribed
        if isinstance(event, protocol.Pub):
            outcome = sub.on_pub(event)
            if outcome is True:  # a hole in the offsets: the server replays from ours
                sub.resubscribes += 1
                sub.sent_on = None
                await self._send_subscribe(sub)
            elif isinstance(outcome, Publication):
                await sub.put(outcome)
        elif isinstance(event, protocol.Unsubscribed):
            if event.code in RESUBSCRIBE_CODES:
                log.info("tether client: %s: %s; resubscribing", event.channel, event.code)
                sub.resubscribes += 1
                sub.sent_on = None
                await self._send_subscribe(sub)
            elif event.code is None and not sub.cursor.active:
                return  # the answer to an earlier unsubscribe of this channel
            elif event.code == "unavailable" and sub.cursor.epoch is not None:
                # The server's channel store is down for now: an established subscription
                # keeps its position and asks again shortly.
                sub.sent_on = None
                asyncio.get_running_loop().call_later(
                    self._rng.uniform(0.2, 1.0), self._resubscribe_soon, sub
                )
            else:
                del self._subs[event.channel]
                error = None
                if event.code not in (None, "server"):
                    error = SubscriptionRefused(event.channel, event.code, event.reason)
                sub.end(error)
        else:
            await sub.presence_event(event.client_id, isinstance(event, protocol.Join))

    async def close(self) -> None:
        """Acknowledge what was received, close the connection and stop. Idempotent."""
        self._closing = True
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                frame = self._cp.ack_now()
                if frame is not None:
                    await ws.send(frame)
            with contextlib.suppress(Exception):
                await ws.close(1000, "client closing")
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._finish(None)

    async def __aenter__(self) -> Client:
        try:
            await self.connect()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __aiter__(self) -> Client:
        return self

    async def __anext__(self) -> Message:
        while True:
            item = await self._items.get()
            if self._items.qsize() < self.max_buffer:
                self._space.set()
            if isinstance(item, Message):
                return item
            if isinstance(item, _End):
                self._items.put_nowait(item)  # every later call ends the same way
                if item.error is not None:
                    raise item.error
                raise StopAsyncIteration
            for callback in list(self._callbacks):
                result = callback(item)
                if inspect.isawaitable(result):
                    await result

    # ------------------------------------------------------------------ connection loop

    async def _run(self) -> None:
        failures = 0  # consecutive attempts that did not reach a welcome
        try:
            while not self._closing:
                if await self._connection():
                    failures = 0
                if self._closing:
                    break
                self._state = (
                    ClientState.RECONNECTING if self.welcome is not None else ClientState.CONNECTING
                )
                failures += 1
                if len(self.urls) > 1 and failures > 1:
                    position = self.urls.index(self.url) if self.url in self.urls else -1
                    self.url = self.urls[(position + 1) % len(self.urls)]
                limit = self.max_reconnect_attempts
                if limit is not None and failures > limit:
                    raise _Fatal(
                        TetherConnectionError(
                            f"could not connect to {self.url} after {failures} attempt(s)"
                        )
                    )
                # Exponential backoff with full jitter: no thundering herd after a restart.
                cap = min(self.backoff_max, self.backoff_base * 2 ** (failures - 1))
                await asyncio.sleep(self._rng.uniform(0, cap))
        except _Fatal as fatal:
            self._finish(fatal.error)
        except Exception as exc:  # a bug must end the iteration, never hang it
            log.exception("tether client: connection loop failed")
            error = TetherError(f"client failed: {exc!r}")
            error.__cause__ = exc
            self._finish(error)

    async def _fresh_token(self) -> str:
        """A token from the application's token function (sync or async)."""
        assert self._token_source is not None
        token = self._token_source()
        if inspect.isawaitable(token):
            token = await token
        if not isinstance(token, str):
            raise TypeError(f"the token function returned {type(token).__name__}, not str")
        return token

    async def _refresh_loop(self, ws: ClientConnection) -> None:
        """Send a fresh token in an `auth` frame ahead of the current one's expiry."""
        from .auth import token_expires_at  # the client needs it only with a token function

        while True:
            token = self._cp.token
            expires = token_expires_at(token) if token else None
            if expires is None:
                return  # a token without a readable expiry: refreshed on reconnection only
            left = expires - time.time()
            ahead = min(max(left * _REFRESH_SHARE, _REFRESH_MIN_AHEAD), left / 2)
            await asyncio.sleep(max(0.05, left - ahead))
            try:
                fresh = await self._fresh_token()
            except Exception:
                log.exception("tether client: the token function failed; retrying")
                continue
            fresh_expiry = token_expires_at(fresh)
            if fresh == token or (fresh_expiry is not None and fresh_expiry <= expires):
                # Nothing fresher yet: ask again shortly, until the old one runs out.
                await asyncio.sleep(max(0.05, min(ahead / 4, expires - time.time())))
                if time.time() >= expires:
                    return  # the server closes with token_expired; we reconnect
                continue
            try:
                await ws.send(self._cp.auth(fresh))
            except (ConnectionClosed, protocol.ProtocolError):
                return
            self.token_refreshes += 1

    async def _connection(self) -> bool:
        """One connection from handshake to close. Returns whether a welcome came."""
        if self._token_source is not None:
            try:
                self._cp.token = await self._fresh_token()
            except Exception as exc:
                log.warning("tether client: the token function failed: %r", exc)
                return False
        try:
            ws = await connect(
                self.url, subprotocols=[Subprotocol(protocol.SUBPROTOCOL)], **self._connect_options
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403):
                raise _Fatal(
                    TetherAuthError("unauthorized", f"HTTP {status} at the handshake")
                ) from None
            log.info("tether client: handshake refused with HTTP %s; retrying", status)
            return False
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            log.info("tether client: cannot connect to %s: %r", self.url, exc)
            return False
        if ws.subprotocol != protocol.SUBPROTOCOL:
            await ws.close(1002, "tether.v1 required")
            raise _Fatal(
                TetherRejected("unsupported_protocol", "the server did not accept tether.v1")
            )
        self._ws = ws
        welcomed = False
        rejection: protocol.ServerRejected | None = None
        acker = asyncio.create_task(self._ack_loop(ws))
        refresher: asyncio.Task[None] | None = None
        loop = asyncio.get_running_loop()
        try:
            await ws.send(self._cp.hello())
            cp = self._cp
            async for raw in ws:
                now = loop.time()  # one clock read per frame: receive and ack_due agree
                for event in cp.receive(raw, now):
                    if isinstance(event, protocol.Received):
                        self.received += 1
                        if self._queue(Message(event.data, event.id, event.seq)):
                            await self._wait_for_space()
                    elif isinstance(event, protocol.Lost):
                        self.lost += event.count
                        await self._put(event)
                    elif isinstance(event, protocol.Welcomed):
                        welcomed = True
                        self._on_welcome(event.welcome)
                        if self._token_source is not None and refresher is None:
                            refresher = asyncio.create_task(self._refresh_loop(ws))
                        for sub in list(self._subs.values()):  # resubscribe from each offset
                            await self._send_subscribe(sub)
                    elif isinstance(event, protocol.ServerRejected):
                        rejection = event
                    else:
                        await self._channel_event(event)
                if rejection is not None:
                    break
                frame = cp.ack_due(now)
                if frame is not None:
                    await ws.send(frame)
                elif cp.ack_deadline is not None:
                    self._ack_wake.set()
        except ConnectionClosed:
            pass
        except protocol.ProtocolError as error:
            with contextlib.suppress(Exception):
                await ws.close(error.close_code, error.reason[:120])
            raise _Fatal(TetherProtocolError(f"server broke tether.v1: {error}")) from None
        finally:
            acker.cancel()
            if refresher is not None:
                refresher.cancel()
            self._cp.close()
            self._ws = None
            self._connected.clear()
            if not self._closing:
                self._state = ClientState.RECONNECTING
        if rejection is not None:
            await self._rejected(ws, rejection)
        return welcomed

    def _on_welcome(self, welcome: protocol.Welcome) -> None:
        # (ClientProtocol already moved last_seq past what earlier sessions acked.)
        if self.welcome is not None:
            self.reconnects += 1
        self.welcome = welcome
        self._state = ClientState.CONNECTED
        self._connected.set()
        self._welcomed.set()

    async def _rejected(self, ws: ClientConnection, rejection: protocol.ServerRejected) -> None:
        """An `error` frame came: stop for good unless the close says "try again"."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await ws.wait_closed()
        code = ws.close_code
        if rejection.code == "token_expired" and self._token_source is not None:
            log.info("tether client: token expired before a refresh; reconnecting")
            return
        if code in _FATAL_CLOSES or (code is None and rejection.code in _AUTH_CODES):
            kind = TetherAuthError if rejection.code in _AUTH_CODES else TetherRejected
            raise _Fatal(kind(rejection.code, rejection.reason, code))
        log.info(
            "tether client: server error %s (%s), close %s; reconnecting",
            rejection.code,
            rejection.reason,
            code,
        )

    async def _ack_loop(self, ws: ClientConnection) -> None:
        """Send the batched cumulative ack once the oldest unacked message waited long enough."""
        loop = asyncio.get_running_loop()
        cp = self._cp
        while True:
            deadline = cp.ack_deadline
            if deadline is None:
                self._ack_wake.clear()
                await self._ack_wake.wait()
                continue
            delay = deadline - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            frame = cp.ack_due(loop.time())
            if frame is not None:
                try:
                    await ws.send(frame)
                except ConnectionClosed:
                    return  # the reader sees the close and reconnects

    async def _put(self, item: Message | Lost) -> None:
        if self._queue(item):
            await self._wait_for_space()

    def _queue(self, item: Message | Lost) -> bool:
        """Hand `item` to the application; True when its buffer is now full (the caller
        then waits for space, so the common case costs no coroutine)."""
        self._items.put_nowait(item)
        return self._items.qsize() >= self.max_buffer

    async def _wait_for_space(self) -> None:
        # The application is behind: stop reading so the server keeps the rest.
        self._space.clear()
        await self._space.wait()

    def _finish(self, error: BaseException | None) -> None:
        if self._ended:
            return
        self._ended = True
        self._error = error
        self._state = ClientState.CLOSED
        self._connected.clear()
        self._items.put_nowait(_End(error))
        for sub in list(self._subs.values()):
            sub.end(error)
        self._subs.clear()
