"""tether.Client's channel subscriptions: async iterators of publications that survive reconnects.

    sub = await client.subscribe("news")
    sub.on_lost(lambda lost: print("lost", lost.count))
    async for pub in sub:              # Publication(channel, offset, id, data)
        print(pub.offset, pub.data)

Each offset reaches the application once and in order, or a `ChannelLost` says how
many are gone (callbacks run inside the iteration, in stream order). After a
reconnect the client resubscribes from the last offset on its own.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import protocol
from .channels.cursor import RESUBSCRIBE, ChannelCursor, ChannelLost, Publication

if TYPE_CHECKING:
    from .client import Client

__all__ = ["ChannelLost", "Publication", "Subscription", "SubscriptionRefused"]

LostCallback = Callable[[ChannelLost], "Awaitable[None] | None"]
PresenceCallback = Callable[[str], "Awaitable[None] | None"]

# Codes of an `unsubscribed` frame after which the client resubscribes from its offset.
RESUBSCRIBE_CODES = frozenset({"slow_consumer", "epoch_changed", "history_gap"})


class SubscriptionRefused(Exception):
    """The server refused or ended a subscription: `code` (e.g. `forbidden`), `reason`."""

    def __init__(self, channel: str, code: str, reason: str) -> None:
        super().__init__(f"{channel}: {code}: {reason}")
        self.channel = channel
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class _Ended:
    error: BaseException | None


class Subscription:
    """One channel subscription of a `tether.Client` (made by `client.subscribe`).

    Counters: `received`, `lost`, `duplicates`; `offset` and `epoch` are the position
    (persist them and pass `since=` to `client.subscribe` to resume after a restart).
    """

    def __init__(
        self, client: Client, channel: str, *, presence: bool, cursor: ChannelCursor
    ) -> None:
        self.client = client
        self.channel = channel
        self.presence = presence
        self.cursor = cursor
        self.received = 0
        self.lost = 0
        self.resubscribes = 0
        self.last_subscribed: protocol.Subscribed | None = None
        self._items: asyncio.Queue[Publication | ChannelLost | _Ended] = asyncio.Queue()
        self._space = asyncio.Event()
        self._lost_callbacks: list[LostCallback] = []
        self._join_callbacks: list[PresenceCallback] = []
        self._leave_callbacks: list[PresenceCallback] = []
        self._first: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.sent_on: object = None  # the connection the last `subscribe` went out on
        self.ended = False

    @property
    def offset(self) -> int:
        return self.cursor.offset

    @property
    def epoch(self) -> str | None:
        return self.cursor.epoch

    @property
    def duplicates(self) -> int:
        return self.cursor.duplicates

    def on_lost(self, callback: LostCallback) -> LostCallback:
        """Call `callback(lost)` (sync or async) for every loss, in stream order."""
        self._lost_callbacks.append(callback)
        return callback

    def on_join(self, callback: PresenceCallback) -> PresenceCallback:
        """Call `callback(client_id)` when a client subscribes (needs `presence=True`)."""
        self._join_callbacks.append(callback)
        return callback

    def on_leave(self, callback: PresenceCallback) -> PresenceCallback:
        self._leave_callbacks.append(callback)
        return callback

    async def unsubscribe(self) -> None:
        """End the subscription (the iteration stops)."""
        await self.client._unsubscribe(self)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Publication:
        while True:
            item = await self._items.get()
            if self._items.qsize() < self.client.max_buffer:
                self._space.set()
            if isinstance(item, Publication):
                return item
            if isinstance(item, _Ended):
                self._items.put_nowait(item)
                if item.error is not None:
                    raise item.error
                raise StopAsyncIteration
            for callback in list(self._lost_callbacks):
                result = callback(item)
                if inspect.isawaitable(result):
                    await result

    # ------------------------------------------------------------------ driven by the Client

    async def wait_subscribed(self) -> None:
        await asyncio.shield(self._first)

    def on_subscribed(self, frame: protocol.Subscribed) -> None:
        self.last_subscribed = frame
        lost = self.cursor.on_subscribed(frame)
        if lost is not None:
            self.lost += lost.count
            self._items.put_nowait(lost)
        if not self._first.done():
            self._first.set_result(None)

    def on_pub(self, frame: protocol.Pub) -> Publication | bool | None:
        """A `pub` frame: the publication to queue, True when the caller must resubscribe."""
        outcome = self.cursor.on_pub(frame)
        if outcome is RESUBSCRIBE:
            return True
        if isinstance(outcome, Publication):
            self.received += 1
            return outcome
        return None

    async def put(self, item: Publication) -> None:
        self._items.put_nowait(item)
        if self._items.qsize() >= self.client.max_buffer:
            # The application is behind: stop reading; the server's slow-consumer policy
            # then ends the subscription and it is resumed from history.
            self._space.clear()
            await self._space.wait()

    async def presence_event(self, client_id: str, joined: bool) -> None:
        for callback in list(self._join_callbacks if joined else self._leave_callbacks):
            result = callback(client_id)
            if inspect.isawaitable(result):
                await result

    def end(self, error: BaseException | None) -> None:
        if self.ended:
            return
        self.ended = True
        if not self._first.done():
            if error is not None:
                self._first.set_exception(error)
            else:
                self._first.set_exception(SubscriptionRefused(self.channel, "closed", "ended"))
            self._first.exception()  # retrieved: no "never retrieved" warning
        self._items.put_nowait(_Ended(error))
        self._space.set()
