"""Serve a hub from Starlette or FastAPI: a WebSocket endpoint and a ready-made route.

    app = Starlette(routes=[websocket_route(hub, "/ws")])
    # FastAPI: app.router.routes.append(websocket_route(hub, "/ws")), or
    #          app.add_api_websocket_route("/ws", websocket_endpoint(hub))

Clients that offer the `tether.v1` subprotocol get the resumable protocol; any other
client is served in plain mode (payloads written as-is, client id from `?client_id=`).

Heartbeats: ASGI gives the application no access to ping/pong, so dead connections
are detected by the server. With uvicorn, set `ws_ping_interval` and `ws_ping_timeout`
to the hub's `heartbeat_interval` and `heartbeat_timeout` (uvicorn's defaults are 20 s
each, the same as Tether's), e.g. `uvicorn.run(app, ws_ping_interval=20,
ws_ping_timeout=20)`. Frames are limited by uvicorn's `ws_max_size` (16 MiB by default)
and then by the hub's `max_message_size`, which an oversize frame is answered with an
`error` frame (tether.v1) or close code 1009 (plain).

Hardening (see docs/security.md): a handshake whose `Host` is not an allowed host
(`allowed_hosts`) or from a browser origin not in `allowed_origins` is refused before it
is accepted (uvicorn answers HTTP 403; `create_app` answers a bad Host with 400 from
`TrustedHostMiddleware` before this endpoint runs); the session enforces
`max_connections`, `max_inbound_rate`, `max_message_size`, `hello_timeout` and token
expiry. Pings and the write buffer are bounded by the uvicorn protocol classes in
`tether.monitoring.protocols` (`tether serve` uses them; see `uvicorn_options`). With no
`authenticate` hook given and `auth_secret` set, clients need tokens signed with it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketDisconnected

from ..access import host_allowed, origin_allowed, origin_patterns
from ..auth import auth_from_config
from ..hub import Hub
from .base import TransportClosed
from .connection import (
    SUBPROTOCOL,
    Authenticate,
    ConnectionInfo,
    PeerGone,
    Session,
)

__all__ = ["StarletteTransport", "websocket_endpoint", "websocket_route"]


class StarletteTransport:
    """An accepted Starlette `WebSocket` as a `tether.Transport` that can also receive."""

    __slots__ = ("websocket",)

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket

    async def send(self, data: str | bytes) -> None:
        message: dict[str, Any] = {"type": "websocket.send"}
        message["bytes" if isinstance(data, bytes) else "text"] = data
        try:
            await self.websocket.send(message)
        except (WebSocketDisconnect, WebSocketDisconnected, OSError) as exc:
            # Starlette raises these once the peer is gone or a close was sent.
            raise TransportClosed(repr(exc)) from exc

    async def recv(self) -> str | bytes:
        try:
            message = await self.websocket.receive()
        except WebSocketDisconnected as exc:
            raise PeerGone() from exc
        if message["type"] == "websocket.disconnect":
            raise PeerGone(message.get("code"), message.get("reason") or "")
        text = message.get("text")
        if text is not None:
            return str(text)
        return bytes(message.get("bytes") or b"")

    async def close(self, code: int = 1000, reason: str = "") -> None:
        try:
            await self.websocket.close(code, reason)
        except (WebSocketDisconnect, WebSocketDisconnected, OSError) as exc:
            raise TransportClosed(repr(exc)) from exc


def websocket_endpoint(
    hub: Hub,
    *,
    client_id_param: str = "client_id",
    authenticate: Authenticate | None = None,
) -> Callable[[WebSocket], Awaitable[None]]:
    """An ASGI WebSocket endpoint, `async (websocket) -> None`, that serves `hub`.

    Accepts with subprotocol `tether.v1` only when the client offers it. `authenticate`,
    `async (info, hello) -> client_id`, may refuse a connection by raising (see
    `tether.auth`); when None, `hub.config.auth_secret` decides (signed tokens if set).
    """
    if authenticate is None:
        authenticate = auth_from_config(hub.config.auth_secret)
    origins = origin_patterns(hub.config.allowed_origins)
    hosts = hub.config.effective_allowed_hosts

    async def endpoint(websocket: WebSocket) -> None:
        if not host_allowed(websocket.headers.get("host"), hosts):
            await websocket.close(1008, "host not allowed")
            return
        if not origin_allowed(websocket.headers.get("origin"), origins):
            # Closing before accept makes the server refuse the handshake (uvicorn: 403).
            await websocket.close(1008, "origin not allowed")
            return
        offered = websocket.scope.get("subprotocols") or []
        subprotocol = SUBPROTOCOL if SUBPROTOCOL in offered else None
        await websocket.accept(subprotocol=subprotocol)
        client = websocket.client
        info = ConnectionInfo(
            path=websocket.url.path,
            query=dict(websocket.query_params),
            headers=dict(websocket.headers),
            subprotocol=subprotocol,
            remote=f"{client.host}:{client.port}" if client else None,
        )
        await Session(
            hub,
            StarletteTransport(websocket),
            info,
            client_id_param=client_id_param,
            authenticate=authenticate,
        ).run()

    return endpoint


def websocket_route(
    hub: Hub,
    path: str = "/ws",
    *,
    client_id_param: str = "client_id",
    authenticate: Authenticate | None = None,
    name: str | None = "tether",
) -> WebSocketRoute:
    """A Starlette `WebSocketRoute` at `path` serving `hub` (see `websocket_endpoint`)."""
    return WebSocketRoute(
        path,
        websocket_endpoint(hub, client_id_param=client_id_param, authenticate=authenticate),
        name=name,
    )


# ---------------------------------------------------------------------- one-call recipe
# (kept at the end of the module so it merges cleanly with changes above)

BROWSER_CLIENT = Path(__file__).resolve().parent.parent / "static" / "tether.js"


def add_tether(
    app: Starlette,
    hub: Hub,
    path: str = "/ws",
    *,
    client_path: str = "/static/tether.js",
    client_id_param: str = "client_id",
    authenticate: Authenticate | None = None,
) -> None:
    """Serve `hub` from an existing Starlette or FastAPI app in one call.

    Adds the WebSocket endpoint at `path` (see `websocket_endpoint`) and the browser
    client at `client_path`, so a page of the app can `import { TetherClient } from
    "/static/tether.js"`. Only that one file is routed: the app's own `/static` mount,
    if any, keeps serving everything else. Start the hub with the app, e.g.
    `FastAPI(lifespan=hub.lifespan)`. Raises `ValueError` for paths not starting with "/".
    """
    for value in (path, client_path):
        if not value.startswith("/"):
            raise ValueError(f"paths must start with '/': {value!r}")

    async def browser_client(request: Request) -> Response:
        # no-cache: browsers revalidate (cheap, ETag) so an upgraded server is picked up
        return FileResponse(
            BROWSER_CLIENT, media_type="text/javascript", headers={"Cache-Control": "no-cache"}
        )

    # inserted first, so a catch-all route or mount of the app cannot shadow them
    app.router.routes[0:0] = [
        websocket_route(
            hub, path, client_id_param=client_id_param, authenticate=authenticate, name=None
        ),
        Route(client_path, browser_client, methods=["GET", "HEAD"], name="tether-client"),
    ]


__all__ += ["add_tether"]
