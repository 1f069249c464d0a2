"""Channels on one node: publish once, fan out to this node's subscribers, subscribe with recovery.

`Channels` is what the hub delegates `publish`/`history`/`presence`/`subscribe` to. It
keeps, per connection, the subscriptions it serves and the frames waiting to be written;
per channel, a *feed* that hands subscribers the stream in offset order (a shared store
may report appends out of order or with gaps; a gap is read back from the store).

Slow consumers: frames a connection cannot take at once wait, in order, up to
`channel_send_buffer`; beyond that its subscriptions are ended with `unsubscribed` code
`slow_consumer` (counted, logged) and the client resubscribes from the last offset it
received, which replays the rest from history. Nothing is skipped silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, fields
from typing import Any, NoReturn

import orjson

from .. import protocol
from ..backends.base import BackendError, OutcomeUnknown
from ..clock import Clock
from ..config import HubConfig
from ..messages import unicode_text
from ..transports.base import Transport, TransportClosed
from .model import (
    ChannelMessage,
    Position,
    PublishResult,
    PublishStatus,
    Recovery,
    check_channel,
)
from .store import ChannelInfo, ChannelStore, MemoryChannelStore, StoreEvents

__all__ = ["Authorizer", "ChannelCounters", "Channels", "SubscribeRefused"]

log = logging.getLogger("tether.channels")

# Subscriptions one connection may hold: bounds what one client can make a node keep.
MAX_SUBSCRIPTIONS = 1000

Authorizer = Callable[[str, str], Awaitable[bool]]


class SubscribeRefused(Exception):
    """A subscription was refused: `code` (e.g. `forbidden`) and `reason` say why."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


@dataclass(slots=True)
class ChannelCounters:
    """Counters of the metrics section `channels` (this node)."""

    publishes: int = 0
    duplicates: int = 0
    rejected: int = 0
    deliveries: int = 0
    subscribes: int = 0
    refused: int = 0
    recoveries: int = 0
    losses: int = 0
    slow_consumers: int = 0


class _Conn:
    """One connection's subscriptions on this node and the frames waiting for it."""

    __slots__ = (
        "client_id",
        "closed",
        "draining",
        "pending",
        "replays",
        "subs",
        "transport",
        "try_send",
    )

    def __init__(self, client_id: str, transport: Transport) -> None:
        self.client_id = client_id
        self.transport = transport
        fast = getattr(transport, "try_send", None)
        self.try_send: Callable[[str | bytes], bool] | None = fast if callable(fast) else None
        self.subs: dict[str, _Sub] = {}
        self.pending: deque[str] = deque()
        # Subscriptions' history still to write, paced by the socket (see `_replay`):
        # read from the store already, written one frame at a time as the socket drains.
        self.replays: deque[tuple[_Sub, deque[ChannelMessage]]] = deque()
        self.draining = False
        self.closed = False


class _Sub:
    """A subscription: the last offset written to the connection; while it is being
    answered (`replaying`), live messages wait in `buffer`."""

    __slots__ = (
        "answered",
        "buffer",
        "channel",
        "conn",
        "epoch",
        "last",
        "presence",
        "replaying",
    )

    def __init__(self, conn: _Conn, channel: str, presence: bool) -> None:
        self.conn = conn
        self.channel = channel
        self.presence = presence
        self.epoch = ""
        self.last = 0
        self.replaying = True
        self.answered = False  # `subscribed` written: presence events may follow
        self.buffer: list[tuple[ChannelMessage, str]] = []


class _Turn:
    """Presence changes of one (channel, client id) in order: `_joined`/`_left` take turns."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


class _Feed:
    """The stream of one channel as this node hands it out: `top` is the last offset
    given to subscribers; later offsets that arrived early wait in `early`."""

    __slots__ = ("early", "epoch", "filling", "top")

    def __init__(self, epoch: str, top: int) -> None:
        self.epoch = epoch
        self.top = top
        self.early: dict[int, ChannelMessage] = {}
        self.filling = False


class Channels:
    """The channels of one hub (see the module docstring): streams in `store` (default:
    in this process), subscribers of this node, named `node_id` in presence."""

    def __init__(
        self,
        config: HubConfig,
        clock: Clock,
        *,
        store: ChannelStore | None = None,
        node_id: str = "",
        current: Callable[[str], Transport | None] | None = None,
    ) -> None:
        self.config = config
        # The client's current connection (the hub's registry): frames of a connection a
        # takeover replaced are ignored (None: every caller's connection is current).
        self._current = current
        self.clock = clock
        self.node_id = node_id
        self.store: ChannelStore = (
            store
            if store is not None
            else MemoryChannelStore(config.channel_history_size, config.channel_history_ttl, clock)
        )
        self._append_now: Callable[..., Any] | None = getattr(self.store, "append_now", None)
        self._subscribers: dict[str, dict[str, _Sub]] = {}
        self._conns: dict[str, _Conn] = {}
        self._feeds: dict[str, _Feed] = {}
        # Clients whose `join` this node announced, per channel (until their `leave`).
        self._announced: dict[str, set[str]] = {}
        self._turns: dict[tuple[str, str], _Turn] = {}
        self._authorizers: list[Authorizer] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._started = False
        self._closed = False
        self.counters = ChannelCounters()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        await self.store.start(
            StoreEvents(self._on_remote_publish, self._on_remote_presence, self._resync)
        )

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.store.close()

    # ------------------------------------------------------------------ publish

    async def publish(
        self, channel: str, payload: Any, *, message_id: str | None = None
    ) -> PublishResult:
        """Append `payload` to `channel` once and write it to this node's subscribers.

        PUBLISHED (with its offset and epoch), DUPLICATE (the id is in the history: the
        held message's offset), REJECTED (bad channel name or payload, store down) or
        UNKNOWN (the store may have appended it: resend with the same id), with a reason.
        """
        explicit = _explicit_id(payload, message_id)
        try:
            check_channel(channel)
            if not unicode_text(explicit):
                raise ValueError("message_id is not valid Unicode text (a lone surrogate)")
            data_json, enc = _encode(payload, self.config.max_message_size)
        except ValueError as exc:
            self.counters.rejected += 1
            return PublishResult(str(channel), 0, "", PublishStatus.REJECTED, explicit, str(exc))
        msg_id = explicit or uuid.uuid4().hex
        try:
            if self._append_now is not None:
                appended = self._append_now(channel, msg_id, payload, data_json, enc)
            else:
                appended = await self.store.append(channel, msg_id, payload, data_json, enc)
        except OutcomeUnknown as exc:
            self.counters.rejected += 1
            return PublishResult(
                channel,
                0,
                "",
                PublishStatus.UNKNOWN,
                msg_id,
                f"outcome unknown ({exc}); resend with message_id {msg_id!r}",
            )
        except BackendError as exc:
            self.counters.rejected += 1
            return PublishResult(
                channel, 0, "", PublishStatus.REJECTED, msg_id, f"backend unavailable: {exc}"
            )
        message = appended.message
        if appended.duplicate:
            self.counters.duplicates += 1
            return PublishResult(
                channel,
                message.offset,
                appended.epoch,
                PublishStatus.DUPLICATE,
                msg_id,
                "duplicate within the channel history",
            )
        self.counters.publishes += 1
        delivered = self._arrived(channel, appended.epoch, message)
        return PublishResult(
            channel,
            message.offset,
            appended.epoch,
            PublishStatus.PUBLISHED,
            msg_id,
            None,
            delivered,
        )

    async def _on_remote_publish(self, channel: str, epoch: str, message: ChannelMessage) -> None:
        self._arrived(channel, epoch, message)

    def _arrived(self, channel: str, epoch: str, message: ChannelMessage) -> int:
        """A message appended to `channel` (here or on another node): hand it and any
        early successors to the subscribers, in offset order. Returns how many writes."""
        feed = self._feeds.get(channel)
        if feed is None:
            return 0
        if epoch != feed.epoch:
            self._epoch_changed(channel, epoch, message.offset)
            return 0
        if message.offset <= feed.top:
            return 0
        if message.offset > feed.top + 1:
            feed.early[message.offset] = message
            if not feed.filling:
                feed.filling = True
                self._spawn(self._fill(channel, feed))
            return 0
        written = self._hand_out(channel, message)
        feed.top = message.offset
        while feed.early:
            following = feed.early.pop(feed.top + 1, None)
            if following is None:
                break
            written += self._hand_out(channel, following)
            feed.top = following.offset
        return written

    async def _resync(self) -> None:
        """Reports from other nodes may have been missed: read every served channel's
        stream after the last offset handed out."""
        for channel, feed in list(self._feeds.items()):
            try:
                epoch, missing = await self.store.read(
                    channel, feed.top, self.config.channel_history_size
                )
            except BackendError as exc:
                log.warning("tether: could not re-read channel %s: %s", channel, exc)
                continue
            if self._feeds.get(channel) is not feed:
                continue
            if epoch != feed.epoch:
                self._epoch_changed(channel, epoch, 0)
                continue
            if missing and missing[0].offset != feed.top + 1:
                self._resubscribe_all(channel, "history_gap")
                feed.top = missing[0].offset - 1
            for message in missing:
                self._arrived(channel, epoch, message)

    async def _fill(self, channel: str, feed: _Feed) -> None:
        """Read from the store what this node missed of a channel (a gap in the offsets
        it was told of), then hand out everything in order."""
        try:
            while feed.early and self._feeds.get(channel) is feed:
                want = min(feed.early) - feed.top - 1
                try:
                    epoch, missing = await self.store.read(channel, feed.top, max(want, 1))
                except BackendError as exc:
                    log.warning(
                        "tether: could not read channel %s from the store: %s", channel, exc
                    )
                    await asyncio.sleep(0.05)  # real time: the store is what we wait for
                    continue
                if epoch != feed.epoch:
                    self._epoch_changed(channel, epoch, 0)
                    return
                if not missing or missing[0].offset != feed.top + 1:
                    # The gap is no longer held: the subscribers are told through a
                    # resubscription, whose answer counts what they lost.
                    self._resubscribe_all(channel, "history_gap")
                    feed.top = min(feed.early) - 1
                    continue
                for message in missing:
                    if message.offset == feed.top + 1:
                        self._hand_out(channel, message)
                        feed.top = message.offset
                while feed.early:
                    following = feed.early.pop(feed.top + 1, None)
                    if following is None:
                        break
                    self._hand_out(channel, following)
                    feed.top = following.offset
                for stale in [o for o in feed.early if o <= feed.top]:
                    del feed.early[stale]
        finally:
            feed.filling = False

    def _epoch_changed(self, channel: str, epoch: str, offset: int) -> None:
        """The stream was recreated (another epoch): every subscriber resubscribes, and
        the answer tells it its old epoch is gone."""
        log.warning(
            "tether: channel %s has a new epoch %s; resubscribing its subscribers", channel, epoch
        )
        self._feeds.pop(channel, None)
        self._resubscribe_all(channel, "epoch_changed")

    def _resubscribe_all(self, channel: str, code: str) -> None:
        for sub in list(self._subscribers.get(channel, {}).values()):
            self._remove(sub)
            self._write(
                sub.conn,
                protocol.encode(
                    protocol.Unsubscribed(channel, "resubscribe from your last offset", code)
                ),
            )

    def _hand_out(self, channel: str, message: ChannelMessage) -> int:
        subs = self._subscribers.get(channel)
        if not subs:
            return 0
        frame = protocol.encode_pub(
            channel, message.offset, message.id, message.data_json, message.enc
        )
        written = 0
        for sub in list(subs.values()):
            if sub.replaying:
                sub.buffer.append((message, frame))
                if len(sub.buffer) > self.config.channel_send_buffer:
                    self._slow(sub.conn)  # live traffic outruns the replay: from history
            elif message.offset > sub.last:
                sub.last = message.offset
                if self._write(sub.conn, frame):
                    written += 1
        self.counters.deliveries += written
        return written

    # ------------------------------------------------------------------ writing

    def _replay(self, conn: _Conn, sub: _Sub, backlog: deque[ChannelMessage]) -> None:
        """Write a subscription's missed messages as far as the socket takes them at once;
        the rest is written by `_drain` one frame at a time as the socket drains. The
        replay (read from the store once, at most the channel's history) is held until
        written, outside `channel_send_buffer`: counted there, a long catch-up would end
        the very subscription it answers. A socket that stalls is cut by `send_timeout`."""
        if conn.closed or conn.subs.get(sub.channel) is not sub:
            return  # the connection or the subscription ended while it was answered
        fast = conn.try_send
        while backlog and fast is not None and not conn.pending and not conn.replays:
            message = backlog[0]
            frame = protocol.encode_pub(
                sub.channel, message.offset, message.id, message.data_json, message.enc
            )
            try:
                if not fast(frame):
                    break
            except Exception as exc:
                log.debug("tether: channel write to %s failed: %r", conn.client_id, exc)
                self._drop(conn)
                return
            backlog.popleft()
            sub.last = message.offset
        if backlog:
            conn.replays.append((sub, backlog))
            if not conn.draining:
                conn.draining = True
                self._spawn(self._drain(conn))
        else:
            self._replayed(conn, sub)

    def _replayed(self, conn: _Conn, sub: _Sub) -> None:
        """A subscription's replay is written: the live messages that came meanwhile follow."""
        buffered, sub.buffer = sub.buffer, []
        sub.replaying = False
        for message, frame in buffered:
            if message.offset > sub.last:
                sub.last = message.offset
                self._write(conn, frame)

    def _next_frame(self, conn: _Conn) -> str | None:
        """The next frame `_drain` writes: what waits in `pending`, else the next message
        of a replay; None when there is nothing."""
        while True:
            if conn.pending:
                return conn.pending.popleft()
            if not conn.replays:
                return None
            sub, backlog = conn.replays[0]
            if conn.subs.get(sub.channel) is not sub:  # ended meanwhile
                conn.replays.popleft()
                continue
            if not backlog:
                conn.replays.popleft()
                self._replayed(conn, sub)  # may queue into `pending`
                continue
            message = backlog.popleft()
            sub.last = message.offset
            return protocol.encode_pub(
                sub.channel, message.offset, message.id, message.data_json, message.enc
            )

    def _write(self, conn: _Conn, frame: str) -> bool:
        """Write now, or queue behind what is waiting; False when the connection is gone
        or was found slow (its subscriptions then end)."""
        if conn.closed:
            return False
        fast = conn.try_send
        if fast is not None and not conn.pending and not conn.replays:
            try:
                if fast(frame):
                    return True
            except Exception as exc:
                log.debug("tether: channel write to %s failed: %r", conn.client_id, exc)
                self._drop(conn)
                return False
        conn.pending.append(frame)
        if len(conn.pending) > self.config.channel_send_buffer:
            self._slow(conn)
            return False
        if not conn.draining:
            conn.draining = True
            self._spawn(self._drain(conn))
        return True

    async def _drain(self, conn: _Conn) -> None:
        try:
            while not conn.closed:
                frame = self._next_frame(conn)
                if frame is None:
                    break
                try:
                    async with asyncio.timeout(self.config.send_timeout):
                        await conn.transport.send(frame)
                except TimeoutError:
                    log.warning("tether: channel frames to %s stalled; closing", conn.client_id)
                    self._drop(conn)
                    with contextlib.suppress(Exception):
                        await conn.transport.close(1011, "send timeout")
                    return
                except (TransportClosed, Exception) as exc:
                    log.debug("tether: channel write to %s failed: %r", conn.client_id, exc)
                    self._drop(conn)
                    return
        finally:
            conn.draining = False

    def _slow(self, conn: _Conn) -> None:
        """The slow-consumer policy: end the connection's subscriptions (the client
        resubscribes from its last offset and the rest is replayed from history)."""
        self.counters.slow_consumers += 1
        log.warning(
            "tether: %s is not reading its channels (%d frames waiting); ending its "
            "subscriptions with slow_consumer, it resubscribes from its last offset",
            conn.client_id,
            len(conn.pending),
        )
        conn.pending.clear()
        conn.replays.clear()
        for sub in list(conn.subs.values()):
            self._remove(sub)
            conn.pending.append(
                protocol.encode(
                    protocol.Unsubscribed(
                        sub.channel,
                        "too far behind; resubscribe from your last offset",
                        "slow_consumer",
                    )
                )
            )
        if conn.pending and not conn.draining:
            conn.draining = True
            self._spawn(self._drain(conn))

    # ------------------------------------------------------------------ subscriptions

    def authorize_subscribe(self, check: Authorizer) -> Authorizer:
        self._authorizers.append(check)
        return check

    async def _authorized(self, client_id: str, channel: str) -> bool:
        for check in self._authorizers:
            try:
                if not await check(client_id, channel):
                    return False
            except Exception:
                log.exception(
                    "tether: authorize_subscribe hook failed for %s on %s", client_id, channel
                )
                return False
        return True

    def replaced(self, client_id: str, transport: Transport) -> bool:
        """Whether `transport` is no longer `client_id`'s connection (a newer one took
        over while it lingered): what it asks for is ignored."""
        current = self._current
        return current is not None and current(client_id) is not transport

    def _conn(self, client_id: str, transport: Transport) -> _Conn:
        conn = self._conns.get(client_id)
        if conn is not None and conn.transport is not transport:
            if self.replaced(client_id, transport):  # never displace the current one
                raise _replaced()
            self._drop(conn)  # a replaced connection: its subscriptions went with it
            conn = None
        if conn is None:
            conn = self._conns[client_id] = _Conn(client_id, transport)
        return conn

    async def subscribe(
        self,
        client_id: str,
        transport: Transport,
        channel: str,
        since: Position | None = None,
        *,
        presence: bool = False,
        authorize: bool = True,
        grants: frozenset[str] | None = None,
    ) -> Recovery:
        """Subscribe the connection `transport` of `client_id` to `channel`: answer with a
        `subscribed` frame and replay what it missed since `since`, then live messages.

        Raises `SubscribeRefused` (after writing an `unsubscribed` frame with its code)
        when the connection's token `grants` do not name the channel, an
        `authorize_subscribe` hook says no, or the store is unavailable; the connection
        stays open. Raises ValueError for an invalid channel name.
        """
        check_channel(channel)
        if self.replaced(client_id, transport):
            raise _replaced()
        if grants is not None and not granted(channel, grants):
            await self._refuse(
                client_id,
                transport,
                channel,
                SubscribeRefused("forbidden", f"the token does not grant {channel!r}"),
            )
        if authorize:
            allowed = await self._authorized(client_id, channel)
            if self.replaced(client_id, transport):  # taken over while the hooks ran
                raise _replaced()
            if not allowed:
                await self._refuse(
                    client_id,
                    transport,
                    channel,
                    SubscribeRefused("forbidden", f"not allowed to subscribe to {channel!r}"),
                )
        conn = self._conn(client_id, transport)
        old = conn.subs.get(channel)
        if old is not None:
            self._remove(old, presence_left=False)
        elif len(conn.subs) >= MAX_SUBSCRIPTIONS:
            self.counters.refused += 1
            refusal = SubscribeRefused(
                "too_many_subscriptions",
                f"a connection may hold at most {MAX_SUBSCRIPTIONS} subscriptions",
            )
            self._write(conn, _refusal(channel, refusal))
            raise refusal
        sub = _Sub(conn, channel, presence)
        conn.subs[channel] = sub
        self._subscribers.setdefault(channel, {})[client_id] = sub
        try:
            recovery = await self.store.recover(channel, since)
        except BackendError as exc:
            # A subscription it replaced is gone too, and with it the presence. Always
            # left, even with nothing replaced on this connection: a takeover's deferred
            # leave of the old connection may have run (and skipped, seeing this
            # subscription) while the store was asked; `_left` only announces a leave
            # the channel saw a join for.
            self._remove(sub)
            refusal = SubscribeRefused("unavailable", f"backend unavailable: {exc}")
            self._write(conn, _refusal(channel, refusal))
            raise refusal from None
        if conn.subs.get(channel) is not sub:  # the connection ended meanwhile
            return recovery
        feed = self._feeds.get(channel)
        if feed is None or feed.epoch != recovery.epoch:
            self._feeds[channel] = _Feed(recovery.epoch, recovery.offset)
        sub.epoch = recovery.epoch
        self._write(
            conn,
            protocol.encode(
                protocol.Subscribed(
                    channel,
                    recovery.epoch,
                    recovery.offset,
                    recovery.recovered,
                    recovery.lost,
                    recovery.after,
                    recovery.reset,
                )
            ),
        )
        sub.last = recovery.after
        sub.answered = True
        self._replay(conn, sub, deque(m for m in recovery.messages if m.offset > sub.last))
        self.counters.subscribes += 1
        if since is not None:
            if recovery.recovered:
                self.counters.recoveries += 1
            self.counters.losses += recovery.lost
        await self._joined(channel, client_id)
        return recovery

    async def _refuse(
        self, client_id: str, transport: Transport, channel: str, refusal: SubscribeRefused
    ) -> NoReturn:
        """Refuse a subscription: a subscription the connection held to the channel ends
        (its presence too) before the `unsubscribed` frame; raises `refusal`."""
        self.counters.refused += 1
        conn = self._conn(client_id, transport)
        old = conn.subs.get(channel)
        if old is not None:
            self._remove(old, presence_left=False)
        self._write(conn, _refusal(channel, refusal))
        if old is not None:
            await self._left(channel, client_id)
        raise refusal

    async def unsubscribe(
        self,
        client_id: str,
        channel: str,
        *,
        reason: str = "unsubscribed",
        code: str | None = None,
        transport: Transport | None = None,
    ) -> bool:
        """End `client_id`'s subscription to `channel` on this node, with an
        `unsubscribed` frame; with `transport`, only the subscription of that connection.
        Returns whether there was one."""
        conn = self._conns.get(client_id)
        sub = conn.subs.get(channel) if conn is not None else None
        if conn is None or sub is None:
            return False
        if transport is not None and conn.transport is not transport:
            return False
        self._remove(sub, presence_left=False)
        self._write(conn, protocol.encode(protocol.Unsubscribed(channel, reason, code)))
        await self._left(channel, client_id)
        return True

    def _remove(self, sub: _Sub, *, presence_left: bool = True) -> None:
        conn = sub.conn
        if conn.subs.get(sub.channel) is sub:
            del conn.subs[sub.channel]
        subs = self._subscribers.get(sub.channel)
        if subs is not None and subs.get(conn.client_id) is sub:
            del subs[conn.client_id]
            if not subs:
                del self._subscribers[sub.channel]
                self._feeds.pop(sub.channel, None)
        if presence_left:
            self._spawn(self._left(sub.channel, conn.client_id))

    def _drop(self, conn: _Conn) -> None:
        """Forget a connection that ended: its subscriptions end without frames."""
        if conn.closed:
            return
        conn.closed = True
        conn.pending.clear()
        conn.replays.clear()
        if self._conns.get(conn.client_id) is conn:
            del self._conns[conn.client_id]
        for sub in list(conn.subs.values()):
            self._remove(sub)

    def connection_closed(self, client_id: str, transport: Transport) -> None:
        """The connection `transport` of `client_id` ended (called by the transport
        adapters on every exit)."""
        conn = self._conns.get(client_id)
        if conn is not None and conn.transport is transport:
            self._drop(conn)

    async def regrant(
        self, client_id: str, transport: Transport, grants: frozenset[str] | None
    ) -> None:
        """The connection's credentials were refreshed and now grant `grants` (None: no
        limit from them): its subscriptions to channels they no longer name end with
        `unsubscribed` code `forbidden`."""
        conn = self._conns.get(client_id)
        if grants is None or conn is None or conn.transport is not transport:
            return
        for channel in [c for c in conn.subs if not granted(c, grants)]:
            await self.unsubscribe(
                client_id,
                channel,
                reason=f"the token no longer grants {channel!r}",
                code="forbidden",
                transport=transport,
            )

    def subscriptions(self, client_id: str) -> frozenset[str]:
        conn = self._conns.get(client_id)
        return frozenset(conn.subs) if conn is not None else frozenset()

    def subscribers(self, channel: str) -> frozenset[str]:
        """Client ids subscribed to `channel` on this node."""
        return frozenset(self._subscribers.get(channel, ()))

    # ------------------------------------------------------------------ presence

    @contextlib.asynccontextmanager
    async def _turn(self, channel: str, client_id: str) -> AsyncIterator[None]:
        """One presence change of `client_id` in `channel` at a time, in the order asked
        (a takeover's deferred `leave` of the old connection, then the new `join`)."""
        key = (channel, client_id)
        turn = self._turns.get(key)
        if turn is None:
            turn = self._turns[key] = _Turn()
        turn.users += 1
        try:
            async with turn.lock:
                yield
        finally:
            turn.users -= 1
            if not turn.users:
                del self._turns[key]

    async def _joined(self, channel: str, client_id: str) -> None:
        info = {"node": self.node_id, "since": self.clock.wall()}
        async with self._turn(channel, client_id):
            new = True
            try:
                new = await self.store.presence_add(channel, client_id, info)
            except BackendError as exc:
                log.warning(
                    "tether: presence of %s in %s not recorded: %s", client_id, channel, exc
                )
            announced = self._announced.setdefault(channel, set())
            if client_id not in announced:  # present already (resubscribed): no new join
                announced.add(client_id)
                if new:  # else present through another node, whose join was announced
                    self._presence_event(channel, client_id, True)

    async def _left(self, channel: str, client_id: str) -> None:
        async with self._turn(channel, client_id):
            if client_id in self._subscribers.get(channel, ()):
                return  # subscribed again meanwhile (a takeover's new connection): present
            gone = True
            try:
                gone = await self.store.presence_remove(channel, client_id)
            except BackendError as exc:
                log.warning("tether: presence of %s in %s not removed: %s", client_id, channel, exc)
            announced = self._announced.get(channel)
            if announced is not None and client_id in announced:
                announced.discard(client_id)
                if not announced:
                    del self._announced[channel]
                if gone:  # else it subscribed on another node since: still present
                    self._presence_event(channel, client_id, False)

    async def _on_remote_presence(self, channel: str, client_id: str, joined: bool) -> None:
        self._presence_event(channel, client_id, joined)

    def _presence_event(self, channel: str, client_id: str, joined: bool) -> None:
        subs = self._subscribers.get(channel)
        if not subs:
            return
        event = protocol.Join(channel, client_id) if joined else protocol.Leave(channel, client_id)
        frame = None
        for sub in list(subs.values()):
            if sub.presence and sub.answered and sub.conn.client_id != client_id:
                frame = frame or protocol.encode(event)
                self._write(sub.conn, frame)

    async def presence(self, channel: str) -> dict[str, dict[str, Any]]:
        """Who is subscribed to `channel` across every node: {client_id: info}."""
        check_channel(channel)
        return await self.store.presence(channel)

    # ------------------------------------------------------------------ history

    async def history(
        self, channel: str, since: Position | int | None = None, limit: int = 100
    ) -> list[ChannelMessage]:
        """Up to `limit` held messages of `channel` after `since` (an offset, or a
        `Position`: one of another epoch reads from the start), oldest first. Raises
        ValueError for a bad name or limit, `BackendError` when the store is down."""
        check_channel(channel)
        if not isinstance(limit, int) or limit < 1:
            raise ValueError("limit must be a positive integer")
        after = 0
        epoch = None
        if isinstance(since, Position):
            after, epoch = since.offset, since.epoch
        elif since is not None:
            if not isinstance(since, int) or since < 0:
                raise ValueError("since must be an offset >= 0 or a Position")
            after = since
        current, messages = await self.read(channel, after, limit)
        if epoch is not None and epoch != current and after:
            _, messages = await self.read(channel, 0, limit)
        return messages

    async def read(self, channel: str, after: int, limit: int) -> tuple[str, list[ChannelMessage]]:
        """The channel's epoch ("" when it has none yet) and up to `limit` held messages
        after offset `after`: a page can show them, then subscribe with
        `since={epoch, offset of the last}` to continue exactly after them. Raises
        ValueError for a bad name, `BackendError` when the store is down."""
        check_channel(channel)
        return await self.store.read(channel, after, limit)

    async def channels(self) -> list[dict[str, Any]]:
        """Every channel the store holds, with this node's subscriber count."""
        infos: list[ChannelInfo] = await self.store.channels()
        return [
            {
                "name": info.name,
                "epoch": info.epoch,
                "offset": info.offset,
                "depth": info.depth,
                "subscribers": len(self._subscribers.get(info.name, ())),
            }
            for info in infos
        ]

    # ------------------------------------------------------------------ metrics

    COUNTERS = tuple(f.name for f in fields(ChannelCounters))

    def to_dict(self) -> dict[str, Any]:
        """The metrics section `channels`: the counters, `count` (channels with
        subscribers on this node) and `subscribers` (subscriptions on this node)."""
        out: dict[str, Any] = {
            f.name: getattr(self.counters, f.name) for f in fields(ChannelCounters)
        }
        out["count"] = len(self._subscribers)
        out["subscribers"] = sum(len(s) for s in self._subscribers.values())
        return out

    @classmethod
    def idle_metrics(cls) -> dict[str, Any]:
        """The `channels` section of a hub that never used channels."""
        return {**dict.fromkeys(cls.COUNTERS, 0), "count": 0, "subscribers": 0}

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        if self._closed:  # shut down: nothing more runs (the store is closed)
            coroutine.close()
            return
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def granted(channel: str, grants: frozenset[str]) -> bool:
    """Whether a token's channel `grants` (names, or prefixes ending in `*`) name `channel`."""
    if channel in grants:
        return True
    return any(g.endswith("*") and channel.startswith(g[:-1]) for g in grants)


def _replaced() -> SubscribeRefused:
    """Raised (nothing written) for a connection a takeover replaced: ignored."""
    return SubscribeRefused("replaced", "the connection was replaced by a newer one")


def _refusal(channel: str, refusal: SubscribeRefused) -> str:
    return protocol.encode(protocol.Unsubscribed(channel, refusal.reason, refusal.code))


def _explicit_id(payload: Any, message_id: str | None) -> str:
    if message_id is not None:
        return str(message_id)
    if isinstance(payload, dict):
        value = payload.get("id")
        if isinstance(value, str | int) and not isinstance(value, bool):
            return str(value)
    return ""


def _encode(payload: Any, limit: int) -> tuple[bytes, str | None]:
    """The payload's JSON text on the wire and its encoding; raises ValueError for a
    payload JSON cannot carry or one over `limit` bytes."""
    try:
        data_json, enc = protocol.encode_data(payload)
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise ValueError(f"payload is not JSON-serialisable: {exc}") from None
    if len(data_json) > limit:
        raise ValueError(f"payload is {len(data_json)} bytes, over max_message_size ({limit})")
    return data_json, enc
