"""create_app: one Starlette app serving /ws, health, Prometheus, the JSON + publish API, /ws/live
and the dashboard for a Hub, assembled from the route table."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.routing import BaseRoute, WebSocketRoute
from starlette.websockets import WebSocket

from ..access import origin_patterns
from ..config import ConfigError
from ..hub import Hub
from ..transports.connection import Authenticate
from .access import Access, is_loopback
from .context import Monitor
from .health import HealthCheck, HealthThresholds
from .history import SampleHistory
from .live import LiveCadence, LiveFeed, live
from .pages import static_files
from .routes import ROUTES, openapi_spec
from .routing import route

log = logging.getLogger("tether.monitoring")

_UNSET: Any = object()


def create_app(
    hub: Hub,
    *,
    monitor_token: str | None = _UNSET,
    api_token: str | None = _UNSET,
    host: str | None = None,
    ws_path: str = "/ws",
    realtime_interval: float = 1.0,
    performance_interval: float = 5.0,
    aggregate_interval: float = 30.0,
    health: HealthThresholds | None = None,
    start_hub: bool = True,
    shutdown_hub: bool = False,
    include_ws: bool = True,
    authenticate: Authenticate | None = None,
    history: SampleHistory | None = None,
) -> Starlette:
    """A Starlette app serving `hub`: the delivery WebSocket at `ws_path` and monitoring.

    Tokens and `host` (the address the server binds, which decides whether the network
    can reach it) default to `hub.config`. Binding beyond loopback without `api_token`
    is refused with `ConfigError`: an open publish API would let anyone message every
    client. Without `monitor_token` the monitoring routes then answer loopback callers
    only. Mounted in FastAPI the lifespan may not run; the hub starts on first use.
    `authenticate` is the `/ws` hook (see `tether.auth`); without one, `auth_secret`
    (TETHER_AUTH_SECRET) turns on signed tokens. `history` (default: a new
    `SampleHistory(hub)`) is sampled from app start-up, dashboard open or not, and
    served at `/api/history`. Raises `ConfigError` for a missing or short token and
    `ValueError` for a live update interval that is not positive.
    """
    cfg = hub.config
    monitor = cfg.monitor_token if monitor_token is _UNSET else monitor_token
    api = cfg.api_token if api_token is _UNSET else api_token
    bind = cfg.host if host is None else host
    public = not is_loopback(bind)
    if public and not api:
        raise ConfigError(
            f"TETHER_API_TOKEN: required when binding {bind!r} (beyond loopback): "
            "POST /api/send and /api/broadcast would otherwise let anyone message any client"
        )
    for name, value in (("TETHER_MONITOR_TOKEN", monitor), ("TETHER_API_TOKEN", api)):
        if value is not None and len(value) < 8:
            raise ConfigError(f"{name}: a token must be at least 8 characters")
    cadence = LiveCadence(realtime_interval, performance_interval, aggregate_interval)
    if min(realtime_interval, performance_interval, aggregate_interval) <= 0:
        raise ValueError("live update intervals must be positive")
    hosts = cfg.effective_allowed_hosts
    access = Access(
        monitor or None, api or None, public, origin_patterns(cfg.allowed_origins), hosts
    )
    feed = LiveFeed(hub, cadence)
    checker = HealthCheck(hub, health or HealthThresholds())
    feed.health = checker
    samples = history if history is not None else SampleHistory(hub)
    m = Monitor(hub, access, checker, feed, samples, ws_path)

    async def live_feed(websocket: WebSocket) -> None:
        await live(websocket, m)

    routes: list[BaseRoute] = []
    if include_ws:
        routes.extend(_delivery_routes(hub, ws_path, authenticate))
    routes += [route(endpoint, m) for endpoint in ROUTES]
    routes += [WebSocketRoute("/ws/live", live_feed), static_files()]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if start_hub:
            await hub.start()
        samples.start()
        try:
            yield
        finally:
            await samples.stop()
            if shutdown_hub:
                await hub.shutdown()

    # DNS rebinding: a page on evil.example re-pointed at 127.0.0.1 sends `Host:
    # evil.example`; only the names this server is reachable as are served.
    middleware = (
        [Middleware(TrustedHostMiddleware, allowed_hosts=hosts, www_redirect=False)]
        if hosts
        else []
    )
    app = Starlette(routes=routes, lifespan=lifespan, middleware=middleware)
    app.state.hub = hub
    app.state.live_feed = feed
    app.state.health = checker
    app.state.history = samples
    return app


def _delivery_routes(hub: Hub, path: str, authenticate: Authenticate | None) -> list[BaseRoute]:
    # imported here: the Starlette transport is optional for users who only want monitoring
    try:
        from ..transports.starlette import websocket_route
    except ImportError as exc:  # pragma: no cover - only while the transport is missing
        log.warning("tether: %s not served (%s)", path, exc)
        return []
    route: BaseRoute = websocket_route(hub, path=path, authenticate=authenticate)
    return [route]


__all__ = ["HealthThresholds", "LiveCadence", "create_app", "is_loopback", "openapi_spec"]
