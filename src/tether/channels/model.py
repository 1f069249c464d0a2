"""Channel streams, pure and clock-free: offsets within an epoch, a bounded history, recovery.

A channel's messages are numbered 1, 2, 3... within an *epoch* (a random name the stream
gets when it is created). The history keeps the newest `size` messages younger than
`ttl` seconds; a message id seen within the history is refused as a duplicate. A
subscriber that names the position it last saw is told exactly what it missed: the
messages still held (`recovered`), or how many are gone (`lost`) and that its epoch
no longer exists (`reset`). Callers pass the time in; nothing here reads a clock.
"""

from __future__ import annotations

import enum
import secrets
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..protocol import CHANNEL_PATTERN, MAX_CHANNEL_LENGTH

# How long a stream's position (epoch and last offset) outlives its last publish once
# nothing is held: a subscriber back within this is told exactly how many it lost; later,
# the stream is forgotten and its next publish starts a new epoch (a reset).
POSITION_KEPT = 86_400.0

__all__ = [
    "CHANNEL_PATTERN",
    "ChannelMessage",
    "ChannelStream",
    "Position",
    "PublishResult",
    "PublishStatus",
    "Recovery",
    "check_channel",
    "new_epoch",
]


def check_channel(channel: object) -> str:
    """`channel` when it is a valid channel name; raises ValueError (saying why) if not."""
    if not isinstance(channel, str) or CHANNEL_PATTERN.fullmatch(channel) is None:
        raise ValueError(
            f"invalid channel name {channel!r}: 1-{MAX_CHANNEL_LENGTH} characters "
            "of A-Z a-z 0-9 . _ : @ -"
        )
    return channel


def new_epoch() -> str:
    """A fresh epoch name: a stream recreated under the same channel name never reuses one."""
    return secrets.token_hex(6)


class PublishStatus(enum.Enum):
    PUBLISHED = "published"  # appended at `offset` and fanned out
    DUPLICATE = "duplicate"  # the id is already in the history, at `offset`
    REJECTED = "rejected"  # not appended (bad channel, payload, or the store refused)
    UNKNOWN = "unknown"  # the store may or may not have appended it (resend with the same id)


@dataclass(frozen=True, slots=True)
class PublishResult:
    """What `hub.publish` did. `offset`/`epoch` are 0/"" when nothing was appended."""

    channel: str
    offset: int
    epoch: str
    status: PublishStatus
    id: str = ""
    reason: str | None = None
    delivered: int = 0  # subscribers on this node it was written (or queued) to

    def to_dict(self) -> dict[str, Any]:
        return {
            "channel": self.channel,
            "offset": self.offset,
            "epoch": self.epoch,
            "status": self.status.value,
            "id": self.id,
            "reason": self.reason,
            "delivered": self.delivered,
        }


@dataclass(frozen=True, slots=True)
class ChannelMessage:
    """One message of a channel's history. `data` is the payload as published (bytes
    stay bytes); `data_json` its JSON text on the wire (`enc` "base64" for bytes);
    `time` the wall-clock time it was published."""

    offset: int
    id: str
    data: Any
    time: float
    data_json: bytes = field(default=b"null", repr=False, compare=False)
    enc: str | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "offset": self.offset,
            "id": self.id,
            "data": orjson.loads(self.data_json),
            "time": self.time,
        }
        if self.enc is not None:
            out["enc"] = self.enc
        return out


@dataclass(frozen=True, slots=True)
class Position:
    """Where a subscriber is: the last offset it saw within `epoch` (0: none yet)."""

    epoch: str
    offset: int


@dataclass(frozen=True, slots=True)
class Recovery:
    """The answer to a subscription: the stream's position now, whether the subscriber's
    gap could be filled, how many messages it lost, and the messages to replay (all
    after offset `after` of the current epoch, in order)."""

    epoch: str
    offset: int  # the stream's last offset now (0: nothing published in this epoch)
    recovered: bool
    lost: int
    reset: bool  # the subscriber's epoch is gone: losses from it cannot be counted
    after: int
    messages: tuple[ChannelMessage, ...] = ()


def recover(epoch: str, top: int, held: list[ChannelMessage], since: Position | None) -> Recovery:
    """The recovery decision for a subscriber at `since`, given the stream's `epoch`, its
    last offset `top` and the messages it still holds (`held`, ascending)."""
    first = held[0].offset if held else top + 1  # the oldest offset still held
    if since is None:  # a fresh subscription starts at the current position
        return Recovery(epoch, top, True, 0, False, top)
    if since.epoch != epoch or since.offset > top:
        # Another epoch, or a position this stream never reached (a store that lost its
        # newest writes): what the subscriber missed of its own epoch cannot be counted.
        return Recovery(epoch, top, False, first - 1, True, first - 1, tuple(held))
    if since.offset >= first - 1:
        replay = tuple(m for m in held if m.offset > since.offset)
        return Recovery(epoch, top, True, 0, False, since.offset, replay)
    return Recovery(epoch, top, False, first - 1 - since.offset, False, first - 1, tuple(held))


class ChannelStream:
    """One channel's stream in memory: the epoch, the last offset, the bounded history and
    the ids it holds (for dedup). Times are the caller's clock readings (seconds)."""

    __slots__ = ("epoch", "history", "ids", "last_publish", "size", "top", "ttl")

    def __init__(self, size: int, ttl: float, *, epoch: str | None = None) -> None:
        self.epoch = epoch if epoch is not None else new_epoch()
        self.size = size
        self.ttl = ttl
        self.top = 0
        self.history: deque[tuple[float, ChannelMessage]] = deque()
        self.ids: dict[str, ChannelMessage] = {}
        self.last_publish = float("-inf")

    def append(
        self, message_id: str, data: Any, data_json: bytes, enc: str | None, now: float, wall: float
    ) -> tuple[ChannelMessage, bool]:
        """Append a message (after trimming); returns it and False, or, when `message_id`
        is already held, the held message and True (nothing appended)."""
        self.trim(now)
        held = self.ids.get(message_id)
        if held is not None:
            return held, True
        self.top += 1
        message = ChannelMessage(self.top, message_id, data, wall, data_json, enc)
        self.history.append((now, message))
        self.ids[message_id] = message
        self.last_publish = now
        while len(self.history) > self.size:
            self._drop_oldest()
        return message, False

    def trim(self, now: float) -> None:
        """Drop messages older than the TTL."""
        deadline = now - self.ttl
        history = self.history
        while history and history[0][0] <= deadline:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        _, message = self.history.popleft()
        if self.ids.get(message.id) is message:
            del self.ids[message.id]

    def held(self, now: float) -> list[ChannelMessage]:
        self.trim(now)
        return [message for _, message in self.history]

    def recover(self, since: Position | None, now: float) -> Recovery:
        return recover(self.epoch, self.top, self.held(now), since)

    def read(self, after: int, limit: int, now: float) -> list[ChannelMessage]:
        """Up to `limit` held messages with an offset above `after`, oldest first."""
        out: list[ChannelMessage] = []
        for message in self.held(now):
            if message.offset > after:
                out.append(message)
                if len(out) >= limit:
                    break
        return out

    def idle(self, now: float) -> bool:
        """Nothing held and nothing published for `POSITION_KEPT` (and a TTL): the stream
        may be forgotten (its next publish starts a new epoch)."""
        self.trim(now)
        return not self.history and now - self.last_publish > max(self.ttl, POSITION_KEPT)
