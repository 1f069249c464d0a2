"""uvicorn protocol classes that bound every TCP connection before and after it is a WebSocket.

uvicorn (as of 0.54) lets a connection sit forever before it sends a request, and it
answers every WebSocket ping with a pong written straight to the transport, whether or
not the peer reads. `tether serve` (and `BackgroundServer` for an app made by
`create_app`) therefore runs uvicorn with:

- `TetherH11Protocol`: the HTTP request (and so the WebSocket upgrade) must arrive
  within `handshake_timeout` of the connection (or of the end of the previous response
  on a keep-alive connection); at most `ConnectionGuard.pending_limit` connections may
  wait for one, and the total stays under the file-descriptor budget: when either is
  full the oldest waiting connection is dropped (never one that is already served);
- `TetherWebSocketProtocol` (uvicorn's default `websockets-sansio` implementation) and
  `TetherWSProtocol` (`wsproto`): pings and pongs spend a per-connection budget, and a
  connection whose write buffer exceeds its bound is closed with 1008 and dropped,
  which frees the buffer.

Counts of everything refused are kept in `ConnectionGuard.stats` (Prometheus
`tether_connections_*`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.protocols.websockets.wsproto_impl import WSProtocol
from uvicorn.server import ServerState

from ..transports.connection import (
    CONTROL_FRAME_BURST,
    CONTROL_FRAME_RATE,
    WRITE_LIMIT,
    TokenBucket,
    offer_frame,
    write_buffer_bound,
)
from ..transports.guard import ConnectionGuard, GuardStats

log = logging.getLogger("tether.server")

__all__ = [
    "ConnectionGuard",
    "GuardStats",
    "TetherH11Protocol",
    "TetherWSProtocol",
    "TetherWebSocketProtocol",
    "guard_of",
]


def guard_of(config: Config) -> ConnectionGuard:
    """The guard attached to a uvicorn `Config` (one with defaults is attached if none is)."""
    guard = getattr(config, "tether_guard", None)
    if guard is None:
        guard = ConnectionGuard()
        config.tether_guard = guard  # type: ignore[attr-defined]
    assert isinstance(guard, ConnectionGuard)
    return guard


class TetherH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline and a cap on connections awaiting a request."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.guard = guard_of(config)
        self.handshake_timer: asyncio.TimerHandle | None = None
        self.awaited_cycle: object = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self.guard.admit(self, len(self.connections)):
            transport.abort()
            return
        self._arm()

    def _arm(self) -> None:
        """Start waiting for the next request (the current cycle is the one done)."""
        self.awaited_cycle = self.cycle
        self.guard.wait(self)
        if self.handshake_timer is not None:
            self.handshake_timer.cancel()
        self.handshake_timer = self.loop.call_later(self.guard.handshake_timeout, self._timed_out)

    def _disarm(self) -> None:
        self.guard.done(self)
        if self.handshake_timer is not None:
            self.handshake_timer.cancel()
            self.handshake_timer = None

    def _timed_out(self) -> None:
        self.handshake_timer = None
        self.guard.timed_out(self)

    def drop(self) -> None:
        """Close at once, discarding anything unsent: the peer never made a request."""
        self._disarm()
        if not self.transport.is_closing():
            self.transport.abort()

    def handle_events(self) -> None:
        super().handle_events()
        if self.handshake_timer is not None and self.cycle is not self.awaited_cycle:
            self._disarm()  # a request's head arrived: the app's timeouts apply from here

    def handle_websocket_upgrade(self, event: Any) -> None:
        self._disarm()  # the WebSocket protocol takes over (and `hello_timeout` after it)
        super().handle_websocket_upgrade(event)

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._arm()  # keep-alive: the next request must come in time too
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


class TetherWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's `websockets-sansio` WebSocket protocol with a ping budget and a bounded
    write buffer (the library queues one pong per ping, read or not).

    It keeps uvicorn's `send` as is: the Starlette adapter writes synchronously only into
    a protocol whose `send` is that one (`tether.transports.starlette.uvicorn_protocol`),
    and its `close_sent` set by `cut` stops those writes."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.guard = guard_of(config)
        self.control_budget = TokenBucket(CONTROL_FRAME_RATE, CONTROL_FRAME_BURST)
        self.buffer_bound = write_buffer_bound(config.ws_max_size)
        self.cut_reason: str | None = None
        # Set by the session while a tether.v1 connection is open (`Session.frame_now`,
        # through `UvicornStarletteTransport.set_frame_hook`).
        self.frame_hook: Callable[[str], bool] | None = None

    def handle_text(self, event: Any) -> None:
        hook = self.frame_hook
        # A whole text frame with nothing queued ahead of it: the session may settle it
        # here (an ack) instead of queueing it for the app, waking its task and pausing
        # and resuming the socket's reads for it.
        if (
            hook is not None
            and event.fin
            and self.queue.empty()
            and not self.close_sent
            and offer_frame(hook, event.data)
        ):
            return
        super().handle_text(event)

    def handle_ping(self) -> None:
        if self.cut_reason is not None:
            return
        if not self.control_budget.take():
            self.cut(f"more than {CONTROL_FRAME_RATE:g} pings/pongs per second")
            return
        super().handle_ping()
        if self.transport.get_write_buffer_size() > self.buffer_bound:
            self.cut(f"write buffer over {self.buffer_bound} bytes: the peer does not read")

    def handle_pong(self, event: Any) -> None:
        if self.cut_reason is not None:
            return
        if not self.control_budget.take():
            self.cut(f"more than {CONTROL_FRAME_RATE:g} pings/pongs per second")
            return
        super().handle_pong(event)

    def keepalive_timeout(self) -> None:
        super().keepalive_timeout()
        # uvicorn closes gracefully, which waits for the buffer to drain; a peer that
        # stopped answering pings is not reading either, so the buffer would stay.
        _drop_soon(self.transport, self.loop, self.close_timeout)

    def cut(self, reason: str) -> None:
        """Close with 1008 and `reason`, and free the write buffer."""
        self.cut_reason = reason
        self.guard.stats.flood_closes += 1
        log.warning("tether: closing %s: %s (close 1008)", _peer(self.client), reason)
        if not self.close_sent and not self.transport.is_closing():
            self.queue.put_nowait({"type": "websocket.disconnect", "code": 1008, "reason": reason})
            self.conn.fail(1008, reason)
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.close_sent = True
        _drop_soon(self.transport, self.loop, self.close_timeout)


class TetherWSProtocol(WSProtocol):
    """uvicorn's `wsproto` WebSocket protocol with the same ping budget and buffer bound."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.guard = guard_of(config)
        self.control_budget = TokenBucket(CONTROL_FRAME_RATE, CONTROL_FRAME_BURST)
        self.buffer_bound = write_buffer_bound(config.ws_max_size)
        self.cut_reason: str | None = None

    def handle_ping(self, event: Any) -> None:
        if self.cut_reason is not None:
            return
        if not self.control_budget.take():
            self.cut(f"more than {CONTROL_FRAME_RATE:g} pings/pongs per second")
            return
        super().handle_ping(event)
        if self.transport.get_write_buffer_size() > self.buffer_bound:
            self.cut(f"write buffer over {self.buffer_bound} bytes: the peer does not read")

    def cut(self, reason: str) -> None:
        self.cut_reason = reason
        self.guard.stats.flood_closes += 1
        log.warning("tether: closing %s: %s (close 1008)", _peer(self.client), reason)
        self.queue.put_nowait({"type": "websocket.disconnect", "code": 1008, "reason": reason})
        self.transport.abort()


def _drop_soon(transport: asyncio.Transport, loop: asyncio.AbstractEventLoop, delay: float) -> None:
    """Abort now if much is unsent (it would never drain), else after `delay` at the latest."""
    if transport.get_write_buffer_size() > WRITE_LIMIT:
        transport.abort()
    else:
        transport.close()
        loop.call_later(delay, transport.abort)


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "a client"
