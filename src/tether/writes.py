"""Writing one frame to one client: the typed outcome, the write rules, failure handling."""

from __future__ import annotations

import asyncio
import logging
from enum import Enum

from . import protocol
from .accounting import Accounting
from .messages import Envelope
from .registry import ClientRegistry
from .resilience import CircuitState
from .session import ClientSession
from .tasks import BackgroundTasks
from .transports.base import Transport, TransportClosed

log = logging.getLogger("tether")


class WriteOutcome(Enum):
    """What one write did. The value of a failure is the reason a dropped send reports."""

    OK = "written"
    PENDING = "the socket cannot take it without waiting"
    FAILED = "send failed"
    CLOSED = "connection closed"
    TIMEOUT = "send timeout"


OK = WriteOutcome.OK
PENDING = WriteOutcome.PENDING
CLOSED = WriteOutcome.CLOSED


_CLOSED_CIRCUIT = CircuitState.CLOSED


def can_write_now(client: ClientSession, head: Envelope | None = None) -> bool:
    """Whether a frame may be written to `client` without suspending and without jumping
    the queue: the connection has a synchronous `try_send` (set only while a transport
    is attached), the breaker is CLOSED (so `allow()` would have no side effect), and
    nothing is queued ahead — the queue is empty, or `head` is at its front."""
    if client.try_send is None or client.breaker.state is not _CLOSED_CIRCUIT:
        return False
    queue = client.outbox.queue
    if head is None:
        return not queue
    return bool(queue) and queue[0] is head


def delivering(client: ClientSession) -> bool:
    """Whether a delivery to `client` holds its lock or waits for it: a synchronous write
    now would overtake it. (Right after a release, `locked()` is False while the next
    waiter has yet to run; asyncio's lock hands it over in order, and so must we.)"""
    lock = client.lock
    return lock.locked() or bool(getattr(lock, "_waiters", None))


NOT_CONNECTED = "client not connected"


def blocked(client: ClientSession) -> str | None:
    """Why nothing may be written to `client` now — not connected, messages queued ahead,
    or a breaker that refuses — or None. The rule of the awaited write paths; a
    HALF_OPEN breaker's `allow()` takes one of its probe calls. `can_write_now` is the
    same rule for the synchronous paths (plus a socket that takes the frame at once)."""
    if not client.connected:
        return NOT_CONNECTED
    if client.outbox.queue:
        return "behind undelivered critical messages"
    if not client.breaker.allow():
        return f"circuit {client.breaker.state.value}"
    return None


def msg_frame(client: ClientSession, envelope: Envelope) -> str | bytes:
    """What goes on the wire for `envelope`: the payload in plain mode, a tether.v1 `msg`
    frame (built by `protocol.encode_msg`) otherwise."""
    if not client.v1:
        return envelope.data
    data_json = envelope.data_json
    if data_json is None:  # str or bytes data: its JSON form is made once, when first sent
        data_json, _ = protocol.encode_data(envelope.data)
        envelope.data_json = data_json
    seq = envelope.seq if envelope.critical else None
    if seq is None:
        return protocol.encode_msg(None, envelope.message_id, data_json, enc=envelope.enc)
    # A broadcast's copies share their id and data: only the seq differs, so the rest of
    # the frame is made once, for the first copy, and reused while the copies are written.
    last = _LAST_TAIL
    if last[0] is data_json and last[1] == envelope.message_id and last[2] == envelope.enc:
        return f"{_MSG_HEAD}{seq}{last[3]}"
    return _framed(seq, data_json, envelope.message_id, envelope.enc)


_MSG_HEAD = '{"type":"msg","seq":'
_LAST_TAIL: tuple[object, str, str | None, str] = (None, "", None, "")


def _framed(seq: int, data_json: bytes, message_id: str, enc: str | None) -> str:
    """A critical `msg` frame (`protocol.encode_msg`); what follows its seq is kept for
    the next copy of the same message."""
    global _LAST_TAIL
    frame = protocol.encode_msg(seq, message_id, data_json, enc=enc)
    _LAST_TAIL = (data_json, message_id, enc, frame[len(_MSG_HEAD) + len(str(seq)) :])
    return frame


class Writer:
    """Writes frames to clients' connections (their lock held) and charges the breaker:
    success closes it further, a failure or timeout counts against it, a closed
    connection is detached without charge."""

    __slots__ = ("_acct", "_registry", "_tasks", "send_timeout")

    def __init__(
        self,
        send_timeout: float,
        accounting: Accounting,
        registry: ClientRegistry,
        tasks: BackgroundTasks,
    ) -> None:
        self.send_timeout = send_timeout
        self._acct = accounting
        self._registry = registry
        self._tasks = tasks

    async def write(self, client: ClientSession, frame: str | bytes) -> WriteOutcome:
        """Write one frame: synchronously when the socket takes it, else awaited."""
        outcome = self.write_now(client, frame)
        if outcome is PENDING:
            outcome = await self.write_awaited(client, frame)
        return outcome

    def write_now(self, client: ClientSession, frame: str | bytes) -> WriteOutcome:
        """The synchronous path: OK when the transport's `try_send` took the frame,
        PENDING when the write must be awaited (no `try_send`, or the socket cannot take
        it now), or the failure. No coroutine, no timer."""
        fast = client.try_send
        if fast is None:
            return PENDING
        transport = client.transport
        if transport is None:
            return CLOSED
        try:
            if not fast(frame):
                return PENDING
        except Exception as exc:
            return self._failed(client, transport, exc)
        client.breaker.record_success()
        return OK

    async def write_awaited(self, client: ClientSession, frame: str | bytes) -> WriteOutcome:
        """The awaited path, bounded by `send_timeout`."""
        transport = client.transport
        if transport is None:
            return CLOSED
        try:
            async with asyncio.timeout(self.send_timeout):
                await transport.send(frame)
        except Exception as exc:
            return self._failed(client, transport, exc)
        client.breaker.record_success()
        return OK

    def _failed(self, client: ClientSession, transport: Transport, exc: Exception) -> WriteOutcome:
        """Account a failed write: charge the breaker; detach a closed or stalled connection."""
        if isinstance(exc, TimeoutError):
            client.breaker.record_failure()
            self._acct.timeout(client)
            self._registry.detach(client, transport, failed=True)
            self._tasks.close_later(transport, 1011, "send timeout")
            return WriteOutcome.TIMEOUT
        if isinstance(exc, TransportClosed):
            client.breaker.release()
            self._registry.detach(client, transport, failed=False)
            return CLOSED
        client.breaker.record_failure()
        self._acct.failed(client)
        log.debug("tether: send to %s failed: %r", client.client_id, exc)
        return WriteOutcome.FAILED
