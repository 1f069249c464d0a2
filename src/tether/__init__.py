"""Tether: resilient WebSocket delivery for asyncio — acked, ordered, resumable."""

from ._version import __version__
from .channels import ChannelMessage, Position, PublishResult, PublishStatus
from .client import (
    Client,
    ClientState,
    Message,
    TetherAuthError,
    TetherConnectionError,
    TetherError,
    TetherProtocolError,
    TetherRejected,
)
from .clock import Clock, ManualClock, SystemClock
from .config import BackendKind, ConfigError, DedupMode, HubConfig, OverflowPolicy
from .errors import HubClosedError, HubUnavailable
from .hub import Hub
from .messages import BroadcastResult, DeadLetter, SendResult, SendStatus, ShutdownStats
from .resilience import CircuitState
from .subscription import ChannelLost, Publication, Subscription, SubscriptionRefused
from .transports.base import Transport, TransportClosed

__all__ = [
    "BackendKind",
    "BroadcastResult",
    "ChannelLost",
    "ChannelMessage",
    "CircuitState",
    "Client",
    "ClientState",
    "Clock",
    "ConfigError",
    "DeadLetter",
    "DedupMode",
    "Hub",
    "HubClosedError",
    "HubConfig",
    "HubUnavailable",
    "ManualClock",
    "Message",
    "OverflowPolicy",
    "Position",
    "Publication",
    "PublishResult",
    "PublishStatus",
    "SendResult",
    "SendStatus",
    "ShutdownStats",
    "Subscription",
    "SubscriptionRefused",
    "SystemClock",
    "TetherAuthError",
    "TetherConnectionError",
    "TetherError",
    "TetherProtocolError",
    "TetherRejected",
    "Transport",
    "TransportClosed",
    "__version__",
]
