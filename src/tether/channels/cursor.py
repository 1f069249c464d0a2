"""A client's place in one channel, sans-I/O: each offset once, in order, or reported lost.

`ChannelCursor` turns the server's `subscribed` and `pub` frames into what the
application sees: publications in offset order, `ChannelLost` when the server says
messages are gone, and `RESUBSCRIBE` when the stream it receives has a hole (then the
caller sends `subscribe` with `since()` and the server replays the rest). Used by
`tether.Client`; the JS client implements the same rules.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Final

from .. import protocol

__all__ = ["RESUBSCRIBE", "ChannelCursor", "ChannelLost", "Publication"]


@dataclass(frozen=True, slots=True)
class Publication:
    """One channel message for the application."""

    channel: str
    offset: int
    id: str
    data: Any


@dataclass(frozen=True, slots=True)
class ChannelLost:
    """Messages of `channel` that will never arrive: `count` of them after offset
    `after` (they were older than the history). `reset`: the epoch the subscriber was
    in no longer exists, so more may be gone than `count` says."""

    channel: str
    count: int
    after: int
    reset: bool


class _Resubscribe(enum.Enum):
    RESUBSCRIBE = "resubscribe"


RESUBSCRIBE: Final = _Resubscribe.RESUBSCRIBE


class ChannelCursor:
    """Tracks the last offset handed to the application within an epoch."""

    __slots__ = ("active", "channel", "duplicates", "epoch", "offset")

    def __init__(self, channel: str, *, epoch: str | None = None, offset: int = 0) -> None:
        self.channel = channel
        self.epoch = epoch
        self.offset = offset
        self.active = False  # a `subscribed` answered the last `subscribe`
        self.duplicates = 0

    def since(self) -> protocol.Since | None:
        """What to send in `subscribe.since`: None before the first position."""
        return None if self.epoch is None else protocol.Since(self.epoch, self.offset)

    def subscribing(self) -> None:
        """A `subscribe` is being sent: `pub` frames until its answer are ignored (the
        answer replays them)."""
        self.active = False

    def on_subscribed(self, frame: protocol.Subscribed) -> ChannelLost | None:
        lost = None
        if self.epoch is not None and (frame.lost or frame.reset or not frame.recovered):
            lost = ChannelLost(self.channel, frame.lost, frame.after - frame.lost, frame.reset)
        self.epoch = frame.epoch
        self.offset = frame.after
        self.active = True
        return lost

    def on_pub(self, frame: protocol.Pub) -> Publication | _Resubscribe | None:
        if not self.active:
            return None
        if frame.offset <= self.offset:
            self.duplicates += 1
            return None
        if frame.offset != self.offset + 1:
            self.active = False
            return RESUBSCRIBE
        self.offset = frame.offset
        return Publication(self.channel, frame.offset, frame.id, protocol.decode_data(frame))
