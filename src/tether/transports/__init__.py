"""Adapters from real WebSocket connections to `tether.Transport`."""

from .base import Transport, TransportClosed

__all__ = ["Transport", "TransportClosed"]
