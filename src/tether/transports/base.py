"""The Transport protocol: the two methods a hub needs from a connection."""

from __future__ import annotations

from typing import Protocol, runtime_checkable


class TransportClosed(ConnectionError):
    """Raised by `Transport.send` when the connection is gone (not a delivery failure).

    The hub treats it as a disconnect: the client's critical messages wait in its
    outbox, and the circuit breaker is not charged. Any other exception from `send` is
    a failed delivery attempt and counts towards the breaker and the retry budget.
    """


@runtime_checkable
class Transport(Protocol):
    """A connection to one client.

    `send` writes one frame (`str` as a text frame, `bytes` as binary) and returns once
    the connection has accepted it; `close` ends the connection with a WebSocket close
    code. A transport may also have `try_send(data) -> bool`, a synchronous write that
    returns False when the frame cannot be taken at once (the hub then awaits `send`
    under `send_timeout`); it saves an await per message on the hot path. Real adapters
    live in `tether.transports.websockets` and `tether.transports.starlette`;
    `tether.testing.MockWebSocket` is one for tests.
    """

    async def send(self, data: str | bytes) -> None: ...

    async def close(self, code: int = 1000, reason: str = "") -> None: ...
