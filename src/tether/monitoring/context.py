"""Monitor: what every monitoring route is handed besides its request: the hub, the parts."""

from __future__ import annotations

from dataclasses import dataclass

from ..hub import Hub
from .access import Access
from .health import HealthCheck
from .history import SampleHistory
from .live import LiveFeed

__all__ = ["Monitor"]


@dataclass(frozen=True, slots=True)
class Monitor:
    """One app's hub, access rules, health check, live feed and sample history."""

    hub: Hub
    access: Access
    health: HealthCheck
    feed: LiveFeed
    history: SampleHistory
    ws_path: str  # where the delivery WebSocket is served, for the OpenAPI text
