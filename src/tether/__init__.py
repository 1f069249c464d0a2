"""Tether: resilient WebSocket delivery for asyncio — acked, ordered, resumable."""

from .clock import Clock, ManualClock, SystemClock
from .config import BackendKind, ConfigError, DedupMode, HubConfig, OverflowPolicy
from .hub import Hub, HubClosedError
from .messages import BroadcastResult, DeadLetter, SendResult, SendStatus, ShutdownStats
from .resilience import CircuitState
from .transports.base import Transport, TransportClosed

__version__ = "0.1.0"

__all__ = [
    "BackendKind",
    "BroadcastResult",
    "CircuitState",
    "Clock",
    "ConfigError",
    "DeadLetter",
    "DedupMode",
    "Hub",
    "HubClosedError",
    "HubConfig",
    "ManualClock",
    "OverflowPolicy",
    "SendResult",
    "SendStatus",
    "ShutdownStats",
    "SystemClock",
    "Transport",
    "TransportClosed",
    "__version__",
]
