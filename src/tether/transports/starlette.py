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

Fast path: under uvicorn's default WebSocket implementation (`websockets-sansio`, also
what `tether serve` runs), when nothing but Starlette's own pass-through wrappers stands
between the endpoint and uvicorn's `send`, the transport gets a synchronous `try_send`
that writes the frame straight into the connection, the way the `websockets` adapter
does (see `UvicornStarletteTransport`). Any other server, implementation or a
middleware that wraps `send` keeps the plain ASGI path.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import CodeType, MethodType
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
    WRITE_LIMIT,
    Authenticate,
    ConnectionInfo,
    PeerGone,
    Session,
)

__all__ = [
    "StarletteTransport",
    "UvicornStarletteTransport",
    "starlette_transport",
    "uvicorn_protocol",
    "websocket_endpoint",
    "websocket_route",
]


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


class UvicornStarletteTransport(StarletteTransport):
    """A `StarletteTransport` served by uvicorn's `websockets-sansio` protocol, with
    `try_send`: the frame is written into uvicorn's connection at once, without the
    task, timeout and ASGI `send` layers of an awaited delivery.

    Made by `starlette_transport` only when the endpoint's `send` is, through nothing but
    Starlette's pass-through wrappers, the unmodified `WebSocketsSansIOProtocol.send`.
    """

    __slots__ = ("awaiting", "conn", "protocol", "transport", "writable")

    def __init__(self, websocket: WebSocket, protocol: Any) -> None:
        super().__init__(websocket)
        self.protocol = protocol
        # Fixed for the connection's life once it is accepted (uvicorn sets them up
        # before it runs the app); held here to save lookups per frame.
        self.conn = protocol.conn
        self.transport = protocol.transport
        self.writable = protocol.writable
        # Awaited sends in flight: a frame waiting in uvicorn for the buffer to drain
        # must not be overtaken by a synchronous write.
        self.awaiting = 0

    async def send(self, data: str | bytes) -> None:
        self.awaiting += 1
        try:
            await super().send(data)
        finally:
            self.awaiting -= 1

    def set_frame_hook(self, hook: Callable[[str], bool] | None) -> None:
        """Let `hook` take complete text frames as they arrive (see `Session.frame_now`);
        None removes it. Only a protocol that looks for one offers it (`tether serve`'s
        `TetherWebSocketProtocol`); under stock uvicorn every frame goes to `receive`."""
        if hasattr(self.protocol, "frame_hook"):
            self.protocol.frame_hook = hook

    def try_send(self, data: str | bytes) -> bool:
        """Write now if uvicorn's `send` would write at once: open (no close sent or
        received, not disconnected), writable (uvicorn's flow control) with under
        `WRITE_LIMIT` unsent, and no awaited send waiting. False means "use `send`",
        which waits for the buffer to drain under `send_timeout`.

        A close by the app is seen here through uvicorn's `close_sent` (or, while the
        close waits for the buffer, through `writable`)."""
        p = self.protocol
        conn = self.conn
        if (
            self.awaiting
            or p.close_sent
            or p.disconnected
            or not self.writable.is_set()
            or self.transport.is_closing()  # a failed write closed it; uvicorn hears later
            or self.transport.get_write_buffer_size() > WRITE_LIMIT
            or conn.state is not _OPEN
        ):
            return False
        if isinstance(data, str):
            conn.send_text(data.encode())
        else:
            conn.send_binary(data)
        self.transport.write(b"".join(conn.data_to_send()))
        return True


def _sender_code() -> CodeType | None:
    """The code of the `send` wrapper Starlette's exception handling puts around every
    endpoint, if it only watches for `http.response.start` and passes messages on."""
    try:
        from starlette._exception_handler import wrap_app_handling_exceptions
    except ImportError:  # pragma: no cover - a Starlette without it
        return None
    for outer in wrap_app_handling_exceptions.__code__.co_consts:
        if isinstance(outer, CodeType) and outer.co_name == "wrapped_app":
            for inner in outer.co_consts:
                if (
                    isinstance(inner, CodeType)
                    and inner.co_name == "sender"
                    and "send" in inner.co_freevars
                    and {c for c in inner.co_consts if isinstance(c, str)}
                    <= {"type", "http.response.start"}
                ):
                    return inner
    return None  # pragma: no cover - a Starlette whose wrapper changed


log = logging.getLogger("tether.transports")

# `try_send` does what uvicorn's `WebSocketsSansIOProtocol.send` does for a text or binary
# frame, synchronously. It is used only with a `send` whose source is one it was checked
# against (uvicorn 0.55): a changed `send` (a lock, a queue) keeps the ASGI path, with a
# warning, until the write is checked against it again.
_CHECKED_SEND_SOURCES = frozenset(
    {"8e487fa6d1576005ef20a588aed6751a2878c65c2fe21823a9d0ee99d4ad65f5"}  # uvicorn 0.55
)


@functools.cache
def _sansio_send() -> Any:
    """uvicorn's `send`, when it is one `try_send` was checked against (looked up, and any
    warning logged, on the first WebSocket served, not on import)."""
    try:
        from uvicorn.protocols.websockets.websockets_sansio_impl import (
            WebSocketsSansIOProtocol,
        )
    except ImportError:  # pragma: no cover - served by another server
        return None
    send = WebSocketsSansIOProtocol.send
    try:
        # whitespace aside: reformatting uvicorn's source changes nothing `try_send` relies on
        source = "".join(inspect.getsource(send).split())
        digest = hashlib.sha256(source.encode()).hexdigest()
    except (OSError, TypeError):  # pragma: no cover - installed without sources
        digest = ""
    if digest not in _CHECKED_SEND_SOURCES:
        log.warning(
            "tether: this uvicorn's WebSocket send is not one the Starlette adapter's "
            "synchronous write was checked against; frames take the ASGI path (slower)"
        )
        return None
    return send


try:
    from websockets.protocol import State as _WsState

    _OPEN: Any = _WsState.OPEN
except ImportError:  # pragma: no cover - uvicorn's sansio implementation needs it
    _OPEN = None
_SENDER_CODE = _sender_code()
_SEND_CELL = _SENDER_CODE.co_freevars.index("send") if _SENDER_CODE is not None else 0


def uvicorn_protocol(websocket: WebSocket) -> Any | None:
    """The uvicorn `websockets-sansio` protocol object whose `send` the endpoint's `send`
    is, looking through Starlette's pass-through wrappers only; None for anything else
    (another server or implementation, a subclass overriding `send`, a middleware)."""
    send: Any = getattr(websocket, "_send", None)
    for _ in range(8):
        if _SENDER_CODE is None or getattr(send, "__code__", None) is not _SENDER_CODE:
            break
        send = send.__closure__[_SEND_CELL].cell_contents
    if (
        _OPEN is None
        or not isinstance(send, MethodType)
        or (sansio_send := _sansio_send()) is None
        or send.__func__ is not sansio_send
    ):
        return None
    protocol = send.__self__
    if not all(
        hasattr(protocol, name)
        for name in ("conn", "transport", "writable", "close_sent", "disconnected")
    ):
        return None  # pragma: no cover - a uvicorn whose protocol changed
    return protocol


def starlette_transport(websocket: WebSocket) -> StarletteTransport:
    """The transport for an accepted `websocket`: with `try_send` when it is served by
    uvicorn's `websockets-sansio` protocol directly (see `uvicorn_protocol`)."""
    protocol = uvicorn_protocol(websocket)
    if protocol is None:
        return StarletteTransport(websocket)
    return UvicornStarletteTransport(websocket, protocol)


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
        authenticate = auth_from_config(hub.config.auth_secret, clock=hub.clock.wall)
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
            starlette_transport(websocket),
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
