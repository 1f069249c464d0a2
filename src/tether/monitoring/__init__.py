"""Monitoring: one Starlette app with /ws, health, Prometheus, the JSON/publish API, dashboard."""

from .app import HealthThresholds, LiveCadence, create_app, openapi_spec
from .server import BackgroundServer

__all__ = ["BackgroundServer", "HealthThresholds", "LiveCadence", "create_app", "openapi_spec"]
