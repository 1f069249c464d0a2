"""Channels: client subscriptions to named streams with history, recovery by offset and presence.

`model` (the stream and the recovery decision, pure), `store` (where streams and presence
live: memory here, Redis in `redis_store`), `service` (this node's subscribers, fan-out,
the slow-consumer policy). The hub's `publish`/`history`/`presence`/`subscribe` delegate
to `service.Channels`; docs/protocol.md ("Channels") specifies the frames.
"""

from .model import ChannelMessage, Position, PublishResult, PublishStatus, Recovery
from .service import ChannelCounters, Channels, SubscribeRefused
from .store import ChannelInfo, ChannelStore, MemoryChannelStore

__all__ = [
    "ChannelCounters",
    "ChannelInfo",
    "ChannelMessage",
    "ChannelStore",
    "Channels",
    "MemoryChannelStore",
    "Position",
    "PublishResult",
    "PublishStatus",
    "Recovery",
    "SubscribeRefused",
]
