"""Best-effort delivery: a non-critical message is written now, forwarded, or dropped."""

from __future__ import annotations

from .accounting import Accounting
from .backends import Backend, BackendError
from .clock import Clock
from .messages import Envelope, SendResult, SendStatus
from .session import ClientSession
from .writes import (
    NOT_CONNECTED,
    OK,
    PENDING,
    WriteOutcome,
    Writer,
    blocked,
    can_write_now,
    delivering,
    msg_frame,
)


class BestEffort:
    """Sends that are never stored: SENT when written, else DROPPED with the reason."""

    __slots__ = ("_acct", "_backend", "_batch_now", "_batch_sent", "_clock", "_writer")

    def __init__(
        self, clock: Clock, backend: Backend, accounting: Accounting, writer: Writer
    ) -> None:
        self._clock = clock
        self._backend = backend
        self._acct = accounting
        self._writer = writer
        self._batch_now = 0.0
        self._batch_sent = 0

    async def send(self, client: ClientSession, envelope: Envelope) -> SendResult:
        """Write now or drop (lock held); touches the client with the clock read that also
        times the delivery."""
        reason = blocked(client)
        if reason is not None:
            if reason is NOT_CONNECTED and self._backend.shared:
                client.last_seen = self._clock.now()
                return await self._forward(client, envelope)
            return self.dropped(client, envelope, reason)
        frame = msg_frame(client, envelope) if client.v1 else envelope.data
        writer = self._writer  # write_now, then write_awaited: no extra coroutine
        outcome = writer.write_now(client, frame)
        if outcome is PENDING:
            outcome = await writer.write_awaited(client, frame)
        result = self.written(client, envelope, outcome)
        key = envelope.dedup_key
        if result.status is SendStatus.SENT and key is not None:
            if client.dedup is not None:
                client.dedup.record(key)
            await self._backend.remember(client, key)
        return result

    def send_now(self, client: ClientSession, envelope: Envelope) -> SendResult | None:
        """A delivery that completes without suspending — the common case of a broadcast,
        done without a task per client — or None when it needs the awaited `send`. Safe
        without the lock: nothing here awaits, and nothing is written unless the whole
        delivery completes."""
        if not can_write_now(client) or delivering(client):
            return None
        frame = msg_frame(client, envelope) if client.v1 else envelope.data
        outcome = self._writer.write_now(client, frame)
        if outcome is PENDING:
            return None
        return self.written(client, envelope, outcome)

    def start_batch(self) -> None:
        """Begin a fan-out's synchronous loop (nothing may await until `end_batch`): one
        clock read stamps every client it writes to."""
        self._batch_now = self._clock.now()
        self._batch_sent = 0

    def send_now_batched(self, client: ClientSession, envelope: Envelope) -> SendResult | None:
        """`send_now` inside a batch: the batch's clock read touches the client; the
        latency of the batch's writes is recorded once, by `end_batch`."""
        if not can_write_now(client) or delivering(client):
            return None
        frame = msg_frame(client, envelope) if client.v1 else envelope.data
        outcome = self._writer.write_now(client, frame)
        if outcome is PENDING:
            return None
        if outcome is not OK:
            return self.dropped(client, envelope, outcome.value)
        client.last_seen = self._batch_now
        self._acct.sent_and_delivered_untimed(client)
        self._batch_sent += 1
        return SendResult(SendStatus.SENT, client.client_id, envelope.message_id)

    def end_batch(self, envelope: Envelope) -> None:
        """The batch's writes are all done: their latency, up to now, in one sample."""
        if self._batch_sent:
            self._acct.delivered_latency(envelope, self._clock.now(), self._batch_sent)
            self._batch_sent = 0

    def written(
        self, client: ClientSession, envelope: Envelope, outcome: WriteOutcome
    ) -> SendResult:
        """Count a write's outcome; one clock read touches and times it."""
        if outcome is not OK:
            return self.dropped(client, envelope, outcome.value)
        now = self._clock.now()
        client.last_seen = now
        self._acct.sent_and_delivered(client, envelope, now)
        return SendResult(SendStatus.SENT, client.client_id, envelope.message_id)

    def dropped(self, client: ClientSession, envelope: Envelope, reason: str) -> SendResult:
        client.last_seen = self._clock.now()
        self._acct.dropped(client)
        return SendResult(SendStatus.DROPPED, client.client_id, envelope.message_id, reason)

    async def _forward(self, client: ClientSession, envelope: Envelope) -> SendResult:
        """A client that may be connected to another node: hand the message to that node."""
        backend = self._backend
        try:
            node = await backend.owner(client.client_id)
            if node is not None and node != backend.node_id:
                await backend.forward(node, client.client_id, envelope)
                self._acct.sent(client)
                return SendResult(
                    SendStatus.SENT, client.client_id, envelope.message_id, f"forwarded to {node}"
                )
            reason = NOT_CONNECTED
        except BackendError as exc:
            reason = f"backend unavailable: {exc}"
        self._acct.dropped(client)
        return SendResult(SendStatus.DROPPED, client.client_id, envelope.message_id, reason)
