"""Where channel streams and presence live: the `ChannelStore` protocol and its memory store.

A store appends each published message once (one operation, whatever the number of
subscribers), answers recovery and history reads, and keeps presence. A *shared* store
(Redis) also tells every node of each publish and presence change, through `StoreEvents`;
the memory store serves one process, whose hub fans out what it appends itself.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..clock import Clock
from .model import ChannelMessage, ChannelStream, Position, Recovery, recover

__all__ = [
    "Appended",
    "ChannelInfo",
    "ChannelStore",
    "LocalPresence",
    "MemoryChannelStore",
    "StoreEvents",
]


@dataclass(frozen=True, slots=True)
class Appended:
    """A store's answer to an append: the message (the held one for a duplicate id)."""

    epoch: str
    message: ChannelMessage
    duplicate: bool


@dataclass(frozen=True, slots=True)
class ChannelInfo:
    """A channel as the store knows it: epoch, last offset, messages held."""

    name: str
    epoch: str
    offset: int
    depth: int


@dataclass(frozen=True, slots=True)
class StoreEvents:
    """What a shared store reports from other nodes: a message appended (channel, epoch,
    message), a presence change (channel, client_id, joined), and `resync` when it may
    have missed reports (its listener reconnected): re-read every channel served."""

    published: Callable[[str, str, ChannelMessage], Awaitable[None]]
    presence: Callable[[str, str, bool], Awaitable[None]]
    resync: Callable[[], Awaitable[None]]


class ChannelStore(Protocol):
    """The storage of channel streams and presence. Methods raise
    `tether.backends.BackendError` (`OutcomeUnknown` when an append may have happened)."""

    name: str
    shared: bool

    async def start(self, events: StoreEvents) -> None: ...

    async def close(self) -> None: ...

    async def append(
        self, channel: str, message_id: str, data: Any, data_json: bytes, enc: str | None
    ) -> Appended: ...

    async def recover(self, channel: str, since: Position | None) -> Recovery: ...

    async def read(self, channel: str, after: int, limit: int) -> tuple[str, list[ChannelMessage]]:
        """The epoch and up to `limit` held messages above offset `after`."""
        ...

    async def channels(self) -> list[ChannelInfo]: ...

    async def presence_add(self, channel: str, client_id: str, info: dict[str, Any]) -> bool:
        """Record `client_id` present (written by this node); True if it was not present
        before (on any node)."""
        ...

    async def presence_remove(self, channel: str, client_id: str) -> bool:
        """Remove the entry this node wrote; True if the client is gone, False if another
        node holds its entry (it subscribed there since): that one stays."""
        ...

    async def presence(self, channel: str) -> dict[str, dict[str, Any]]: ...


class LocalPresence:
    """Presence kept in this process, for the single-node stores (memory, SQLite): the
    `ChannelStore` presence methods over `_presence` ({channel: {client_id: info}}; the
    store creates it), whose keys are the channels subscribed here."""

    _presence: dict[str, dict[str, dict[str, Any]]]

    async def presence_add(self, channel: str, client_id: str, info: dict[str, Any]) -> bool:
        members = self._presence.setdefault(channel, {})
        new = client_id not in members
        members[client_id] = info
        return new

    async def presence_remove(self, channel: str, client_id: str) -> bool:
        members = self._presence.get(channel)
        if members is not None:
            members.pop(client_id, None)
            if not members:
                del self._presence[channel]
        return True  # one node: nobody else holds an entry

    async def presence(self, channel: str) -> dict[str, dict[str, Any]]:
        return dict(self._presence.get(channel, {}))


class MemoryChannelStore(LocalPresence):
    """Channel streams in this process. A stream with nothing held that saw no publish
    for a day (`model.POSITION_KEPT`) is forgotten (its next publish starts a new epoch),
    so memory follows the channels in use, not every channel ever named.

    A channel nobody published to has no stream: subscribing to it or reading it
    answers as an empty stream whose epoch is derived from the name (`_epoch_of`), the
    epoch its first publish then creates the stream with — so a subscriber told offset 0
    recovers everything on its return, and naming channels costs no memory. Forgetting
    a stream of that epoch moves on `_generation`, so a recreated stream never reuses
    it; channels subscribed meanwhile get their stream then, keeping their epoch.
    """

    name = "memory"
    shared = False

    def __init__(self, size: int, ttl: float, clock: Clock) -> None:
        self.size = size
        self.ttl = ttl
        self.clock = clock
        self._streams: dict[str, ChannelStream] = {}
        self._presence: dict[str, dict[str, dict[str, Any]]] = {}
        self._swept_at = clock.now()
        self._key = secrets.token_bytes(16)  # this store's epochs (a restart: new ones)
        self._generation = 0

    def _epoch_of(self, channel: str) -> str:
        """The epoch a stream of `channel` created now gets."""
        name = f"{self._generation}:{channel}".encode()
        return hashlib.blake2b(name, digest_size=6, key=self._key).hexdigest()

    def _maybe_sweep(self, now: float) -> None:
        if now - self._swept_at > self.ttl:  # at most one sweep per TTL
            self._sweep(now)

    async def start(self, events: StoreEvents) -> None:
        return None

    async def close(self) -> None:
        return None

    def _stream(self, channel: str) -> ChannelStream:
        stream = self._streams.get(channel)
        if stream is None:
            stream = self._streams[channel] = ChannelStream(
                self.size, self.ttl, epoch=self._epoch_of(channel)
            )
        return stream

    def append_now(
        self, channel: str, message_id: str, data: Any, data_json: bytes, enc: str | None
    ) -> Appended:
        """`append` without suspending (the memory store never waits)."""
        now = self.clock.now()
        self._maybe_sweep(now)
        stream = self._stream(channel)
        message, duplicate = stream.append(message_id, data, data_json, enc, now, self.clock.wall())
        return Appended(stream.epoch, message, duplicate)

    async def append(
        self, channel: str, message_id: str, data: Any, data_json: bytes, enc: str | None
    ) -> Appended:
        return self.append_now(channel, message_id, data, data_json, enc)

    def _sweep(self, now: float) -> None:
        self._swept_at = now
        reused = False
        for name in [n for n, s in self._streams.items() if s.idle(now)]:
            if name not in self._presence:  # subscribed channels keep their epoch
                forgotten = self._streams.pop(name)
                reused = reused or forgotten.epoch == self._epoch_of(name)
        if reused:  # a stream recreated now must not get the epoch of the one forgotten
            for name in self._presence:  # subscribed, never published: keep the epoch given
                self._stream(name)
            self._generation += 1

    async def recover(self, channel: str, since: Position | None) -> Recovery:
        now = self.clock.now()
        self._maybe_sweep(now)
        stream = self._streams.get(channel)
        if stream is None:  # never published (or forgotten): an empty stream, not kept
            return recover(self._epoch_of(channel), 0, [], since)
        return stream.recover(since, now)

    async def read(self, channel: str, after: int, limit: int) -> tuple[str, list[ChannelMessage]]:
        now = self.clock.now()
        self._maybe_sweep(now)
        stream = self._streams.get(channel)
        if stream is None:  # the epoch it has while subscribed ("" : none yet)
            return (self._epoch_of(channel) if channel in self._presence else ""), []
        return stream.epoch, stream.read(after, limit, now)

    async def channels(self) -> list[ChannelInfo]:
        now = self.clock.now()
        infos = [
            ChannelInfo(name, s.epoch, s.top, len(s.held(now))) for name, s in self._streams.items()
        ]
        # Subscribed channels nobody published to yet: kept as long as subscribed.
        infos += [
            ChannelInfo(name, self._epoch_of(name), 0, 0)
            for name in self._presence
            if name not in self._streams
        ]
        return sorted(infos, key=lambda info: info.name)
