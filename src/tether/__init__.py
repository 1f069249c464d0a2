"""Tether: resilient WebSocket delivery for asyncio — acked, ordered, resumable."""

from ._version import __version__
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
from .transports.base import Transport, TransportClosed

__all__ = [
    "BackendKind",
    "BroadcastResult",
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
    "SendResult",
    "SendStatus",
    "ShutdownStats",
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
