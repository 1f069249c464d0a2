"""The critical delivery pipeline: store, write in order, retry, ack, expire, dead-letter."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from .accounting import Accounting
from .backends import Accepted, Backend, BackendError, OutcomeUnknown, Refused
from .best_effort import BestEffort
from .clock import Clock
from .config import OverflowPolicy
from .messages import DeadLetter, Envelope, SendResult, SendStatus
from .registry import ClientRegistry
from .resilience import CircuitState, RetryPolicy
from .session import ClientSession
from .streams import StreamKeeper, mirror
from .tasks import BackgroundTasks
from .writes import (
    CLOSED,
    NOT_CONNECTED,
    OK,
    PENDING,
    Writer,
    can_write_now,
    delivering,
    msg_frame,
)

log = logging.getLogger("tether")

_WARN_EVERY = 10.0  # seconds between repeated warnings of one kind

# Module-level aliases: an enum member looked up on its class costs ~7x a global read on
# Python 3.11, and these are read for every copy of a critical broadcast.
_DUPLICATE = Refused.DUPLICATE
_FULL = Refused.FULL
_SENT = SendStatus.SENT
_QUEUED = SendStatus.QUEUED

Trims = list[tuple[ClientSession, int]]  # plain-mode deliveries a durable store must trim


class DeliveryPipeline:
    """Gets one envelope to one client. Critical: stored (backend `append`), then written
    in order when the connection and breaker allow, kept until delivered (written in
    plain mode, acknowledged in tether.v1), retried with backoff, expired or
    dead-lettered. Best-effort: handed to `BestEffort`. Everything that writes or
    reorders a client's outbox runs under the client's lock."""

    def __init__(
        self,
        clock: Clock,
        backend: Backend,
        accounting: Accounting,
        registry: ClientRegistry,
        writer: Writer,
        streams: StreamKeeper,
        tasks: BackgroundTasks,
        retry: RetryPolicy,
    ) -> None:
        self.clock = clock
        self.backend = backend
        self._acct = accounting
        self._registry = registry
        self.writer = writer
        self.streams = streams
        # A shared store that can store a recreated stream's lost copies again
        # (`restore`): `restore_append(session, envelope, epoch, seq)`.
        self._restore_append = getattr(backend, "restore_append", None)
        if self._restore_append is not None:
            streams.restore = self.restore
        self._tasks = tasks
        self._retry = retry
        self.best_effort = BestEffort(clock, backend, accounting, writer)
        # A backend that can store without suspending lets critical fan-out skip tasks.
        self.append_now = getattr(backend, "append_now", None)
        # Optional, single-node stores only (no `local` argument):
        # `append_future(session, envelope) -> Future | None`, `append` without its
        # coroutine frame (a stored send's resume wakes one frame less); None: await
        # `append`.
        self.append_future = getattr(backend, "append_future", None)
        # Optional, durable stores: `record_attempts(session, envelope) -> None` keeps a
        # stored message's failed-attempt count (not awaited), so that its retry budget
        # survives a restart.
        self._record_attempts = getattr(backend, "record_attempts", None)
        # A store that is the session's own outbox (nothing durable or shared to trim):
        # an ack is settled in process, without awaiting the backend.
        self.acks_in_process = (
            self.append_now is not None and not backend.durable and not backend.shared
        )
        self._overflow_warned_at = -_WARN_EVERY
        self._batching = False
        self._batch_now = 0.0
        self._batch_delivered = 0
        self._overflow_unwarned = 0

    def deliver_now(self, client: ClientSession, envelope: Envelope) -> SendResult | None:
        """`deliver` of a best-effort message when it completes without suspending (what
        a fan-out does for each client), else None: nothing was done, await `deliver`.
        A critical one always goes through `deliver`: a single send waits (up to
        `send_timeout`) for a socket that cannot take the frame at once, where a
        fan-out's `accept_now` leaves it to a background flush."""
        if envelope.critical or envelope.dedup_key is not None:  # a key: the backend's
            return None
        return self.best_effort.send_now(client, envelope)

    def deliver(self, client: ClientSession, envelope: Envelope) -> Coroutine[Any, Any, SendResult]:
        """Deliver one envelope (takes the client's lock): the coroutine to await. A plain
        call, so that a critical send awaits `_accept` itself (which takes the lock): one
        coroutine frame less to suspend and resume while a store commits it."""
        if envelope.critical:
            return self._accept(client, envelope, lock=client.lock)
        return self._deliver(client, envelope)

    async def _deliver(self, client: ClientSession, envelope: Envelope) -> SendResult:
        """`deliver` of a best-effort message."""
        lock = client.lock  # acquire/release: `async with` adds two coroutine frames
        await lock.acquire()
        try:
            key = envelope.dedup_key
            if key is not None and await self.backend.seen(client, key):
                client.last_seen = self.clock.now()
                return self.duplicate(client, envelope)
            return await self.best_effort.send(client, envelope)  # it touches the client
        finally:
            lock.release()

    def duplicate(self, client: ClientSession, envelope: Envelope) -> SendResult:
        self._acct.deduplicated(client)
        return SendResult(
            SendStatus.DUPLICATE,
            client.client_id,
            envelope.message_id,
            "duplicate within the dedup window",
        )

    # ------------------------------------------------------------------ accepting critical

    async def _accept(
        self,
        client: ClientSession,
        envelope: Envelope,
        *,
        direct: bool = True,
        lock: asyncio.Lock | None = None,
    ) -> SendResult:
        """Store a critical message, then write it if it heads the queue: with the
        client's `lock` taken here (`deliver`: in this frame, not one more), else held by
        the caller."""
        accepted_at = None
        if lock is not None:
            await lock.acquire()  # acquire/release: `async with` adds two coroutine frames
            client.last_seen = accepted_at = self.clock.now()
        try:
            backend = self.backend
            local = client.connected or not backend.shared
            # A store that must be awaited (not the memory store, which is the session itself)
            # may clear a plain-mode message for a direct write instead of storing it.
            if direct and self.append_now is None and may_write_directly(client, envelope):
                envelope.direct = True
            try:
                append_future = self.append_future
                waiting = append_future(client, envelope) if append_future is not None else None
                if waiting is not None:
                    stored = await waiting
                else:
                    stored = await backend.append(client, envelope, local=local)
            except BackendError as exc:
                return self.store_failed(client, envelope, exc)
            except asyncio.CancelledError:
                # The producer went away, but the store may have the message: a client
                # connected here gets it from the store, as from another node.
                if backend.shared and client.connected:
                    self._tasks.spawn(self.load_new(client.client_id))
                raise
            if isinstance(stored, Accepted) and stored.direct:
                return await self._write_directly(client, envelope)
            settled = self.settle(client, envelope, stored, local)
            if settled is not None:
                return settled
            if (
                client.connected
                and len(client.outbox.queue) == 1
                and envelope.attempts == 0  # else its retry is scheduled
                and client.breaker.allow()
                and await self.write_head(client, accepted_at)
            ):
                return SendResult(_SENT, client.client_id, envelope.message_id, None, envelope.seq)
            return self.queued(client, envelope)
        finally:
            if lock is not None:
                lock.release()

    def start_batch(self) -> None:
        """Begin a fan-out's synchronous loop of `accept_now` (nothing may await until
        `end_batch`): one clock read stamps every client it touches, and the latency of
        the plain-mode deliveries it makes is recorded once."""
        self._batch_now = self.clock.now()
        self._batching = True
        self._batch_delivered = 0

    def end_batch(self, envelope: Envelope) -> None:
        """The batch's writes are done: their latency, up to now, in one sample."""
        self._batching = False
        if self._batch_delivered:
            self._acct.delivered_latency(envelope, self.clock.now(), self._batch_delivered)
            self._batch_delivered = 0

    def accept_now(self, client: ClientSession, envelope: Envelope) -> SendResult | None:
        """A critical delivery done without suspending (a store that appends in process,
        lock free, socket ready), or None — then nothing was stored and `deliver` takes
        over. Once stored, a write the socket cannot take at once stays at the head of
        the queue and is flushed in the background. A fan-out calls it inside a batch
        (`start_batch`)."""
        append = self.append_now
        if append is None or not can_write_now(client) or delivering(client):
            return None
        client.last_seen = self._batch_now
        stored = append(client, envelope)
        # An acceptance with nothing pushed out and no dedup key to record (most copies of
        # a broadcast) leaves `_refused` nothing to do.
        if type(stored) is not Accepted or stored.evicted or envelope.dedup_key is not None:
            refused = self._refused(client, envelope, stored)
            if refused is not None:
                return refused
        # Still writable, with this message at the head: the queue was empty, the store
        # put it there, and nothing was awaited (a full outbox evicts in-flight ones).
        return self._write_head_now(client, envelope, None)

    async def _write_directly(self, client: ClientSession, envelope: Envelope) -> SendResult:
        """Write a message the store cleared for direct delivery (lock held); if the socket
        does not take it, store it after all: that was its first delivery attempt, so it
        is retried with backoff, in order."""
        outcome = await self.writer.write(client, envelope.data)
        if outcome is OK:
            return self.written_directly(client, envelope)
        envelope.direct = False
        if outcome is not CLOSED:
            envelope.attempts += 1
            envelope.next_attempt_at = self.clock.now() + self._retry.delay(envelope.attempts)
        return await self._accept(client, envelope, direct=False)

    def written_directly(
        self, client: ClientSession, envelope: Envelope, now: float | None = None
    ) -> SendResult:
        """Count a message written without being stored (plain mode: delivered); `now`:
        the clock read once for a batch of such writes (a broadcast's)."""
        envelope.written_once = True
        self._acct.sent(client)
        if now is None:
            now = self.clock.now()  # one reading for the latency sample and last_seen
        self.delivered(client, envelope, now)
        client.last_seen = now
        return SendResult(_SENT, client.client_id, envelope.message_id)

    def store_failed(
        self, client: ClientSession, envelope: Envelope, exc: BackendError
    ) -> SendResult:
        """A critical message the backend could not store, or may have stored."""
        if isinstance(exc, OutcomeUnknown):
            self._acct.outcome_unknown(client)
            return SendResult(
                SendStatus.UNKNOWN,
                client.client_id,
                envelope.message_id,
                f"outcome unknown ({exc}); resend with message_id {envelope.message_id!r}: "
                "through this node it is looked for among the pending messages first; a "
                "message sent with its own id is a duplicate through any node (dedup by id)",
            )
        self._acct.rejected(client)
        return SendResult(
            SendStatus.REJECTED,
            client.client_id,
            envelope.message_id,
            f"backend unavailable: {exc}",
        )

    def settle(
        self,
        client: ClientSession,
        envelope: Envelope,
        stored: Accepted | Refused,
        local: bool,
    ) -> SendResult | None:
        """After the backend answered an append (lock held): the result when there is
        nothing to write here, else None — then the message is in the session's outbox."""
        refused = self._refused(client, envelope, stored)
        if refused is not None or not self.backend.shared:
            return refused
        assert isinstance(stored, Accepted)
        if not local:  # a node that mirrors the client expires (and counts) its own copies
            for _ in stored.expired:
                self._acct.expired(client)
        if local and stored.changed:
            self.streams.lost(client, stored.rolled_back_to)
            return self.queued(
                client, envelope, "stored; the client's stream was recreated, it is reconnecting"
            )
        if not local or not client.connected or stored.unmirrored:
            if client.connected:  # it connected here while we stored
                self._tasks.spawn(self.load_new(client.client_id))
            reason = NOT_CONNECTED
            if stored.holder is not None and stored.holder != self.backend.node_id:
                reason = f"delivered by node {stored.holder}"
            elif client.connected:  # stored by an attempt whose reply was lost
                reason = "stored; delivered from the store"
            return self.queued(client, envelope, reason)
        if client.epoch is None:
            client.epoch = stored.epoch
        for missing in stored.gap:
            mirror(client, missing)
        mirror(client, envelope)
        client.next_seq = max(client.next_seq, stored.seq + 1)
        return None

    def _refused(
        self, client: ClientSession, envelope: Envelope, stored: Accepted | Refused
    ) -> SendResult | None:
        """The result of a critical message the backend did not store, else None (after
        recording its dedup key and counting what a full outbox pushed out to make room)."""
        if stored is _DUPLICATE:
            return self.duplicate(client, envelope)
        acct = self._acct
        if stored is _FULL:
            outbox = client.outbox
            acct.overflow(client)
            limit = f"outbox full ({outbox.max_size} messages)"
            if outbox.policy is OverflowPolicy.REJECT:
                acct.rejected(client)
                return SendResult(SendStatus.REJECTED, client.client_id, envelope.message_id, limit)
            acct.dropped(client)
            return SendResult(SendStatus.DROPPED, client.client_id, envelope.message_id, limit)
        assert isinstance(stored, Accepted)
        key = envelope.dedup_key
        if key is not None and client.dedup is not None and not stored.unmirrored:
            # Accepted: the session's window answers later checks (and best-effort `seen`)
            # without asking the store. An unmirrored message was stored by an earlier
            # attempt, whose acceptance this node never saw.
            client.dedup.record(key)
        for evicted in stored.evicted:
            acct.overflow(client)
            if (evicted.in_flight or evicted.written_once) and evicted.seq is not None:
                # Written, not yet acknowledged (in flight, or back in the queue after its
                # connection dropped): delivered if an ack or the next hello covers it,
                # dropped when the stream moves on without it (`settle_evicted`).
                client.outbox.evicted_unacked.add(evicted.seq)
            else:
                acct.dropped(client)
            self._warn_overflow(client, evicted)
        return None

    def queued(
        self, client: ClientSession, envelope: Envelope, reason: str | None = None
    ) -> SendResult:
        self._acct.queued(client)
        return SendResult(
            _QUEUED,
            client.client_id,
            envelope.message_id,
            reason or _why_queued(client),
            seq=envelope.seq,
        )

    def write_stored_now(
        self, client: ClientSession, envelope: Envelope, trims: Trims | None
    ) -> SendResult:
        """Write a just-stored message without suspending when it heads the queue and the
        socket takes it; else it stays queued (a write the socket cannot take at once is
        flushed in the background). Lock held, or free and nothing awaited since checked.
        Plain-mode deliveries that a durable store must trim go to `trims` (or are trimmed
        in the background when it is None)."""
        if not can_write_now(client, head=envelope):
            return self.queued(client, envelope)
        return self._write_head_now(client, envelope, trims)

    def _write_head_now(
        self, client: ClientSession, envelope: Envelope, trims: Trims | None
    ) -> SendResult:
        """`write_stored_now` once `can_write_now(client, head=envelope)` holds."""
        frame = msg_frame(client, envelope) if client.v1 else envelope.data
        outcome = self.writer.write_now(client, frame)
        if outcome is OK:
            self._head_written(client, envelope, False, None)
            if not client.v1 and self.backend.durable:  # written = delivered: trim the store
                if trims is None:
                    self._tasks.spawn(self.ack_stored(client, envelope.seq or 0))
                else:
                    trims.append((client, envelope.seq or 0))
            return SendResult(_SENT, client.client_id, envelope.message_id, None, envelope.seq)
        if outcome is PENDING:
            self._tasks.spawn(self.flush_locked(client))
            return self.queued(client, envelope, "waiting for the connection to drain")
        if outcome is not CLOSED:
            doomed = self._head_failed(client, envelope)
            if doomed is not None:
                self._tasks.spawn(
                    self.dead_letter(client, doomed, "retries exhausted", locked=False)
                )
        return self.queued(client, envelope)

    def _warn_overflow(self, client: ClientSession, evicted: Envelope) -> None:
        """One warning per `_WARN_EVERY` seconds: a stalled client pushing out thousands of
        messages must not flood the log (every drop is counted in the metrics)."""
        self._overflow_unwarned += 1
        now = self.clock.now()
        if now - self._overflow_warned_at < _WARN_EVERY:
            return
        log.warning(
            "tether: outbox of %s full; dropped oldest message %s (seq %s); "
            "%d overflow drop(s) since the last warning",
            client.client_id,
            evicted.message_id,
            evicted.seq,
            self._overflow_unwarned,
        )
        self._overflow_warned_at = now
        self._overflow_unwarned = 0

    # ------------------------------------------------------------------ writing the outbox

    async def flush(self, client: ClientSession, *, force: bool) -> int:
        """Write queued messages in order while the connection and breaker allow (lock
        held). `force` ignores backoff (a fresh connection); order is never skipped."""
        written = 0
        queue = client.outbox.queue
        now = self.clock.now()
        while queue and client.connected:
            if not force and queue[0].next_attempt_at > now:
                break
            if not client.breaker.allow():
                break
            if not await self.write_head(client):
                break
            written += 1
        return written

    async def flush_locked(self, client: ClientSession) -> None:
        async with client.lock:
            await self.flush(client, force=True)

    async def write_head(self, client: ClientSession, now: float | None = None) -> bool:
        """Write the first unwritten outbox message (lock held; breaker already allowed);
        `now`: the reading taken when the lock was (`_accept`), else None."""
        envelope = client.outbox.queue[0]
        is_retry = envelope.attempts > 0
        if is_retry:
            self._acct.retry_attempt(client)
        frame = msg_frame(client, envelope) if client.v1 else envelope.data
        writer = self.writer  # write_now, then write_awaited: no extra coroutine per message
        outcome = writer.write_now(client, frame)
        if outcome is PENDING:
            outcome = await writer.write_awaited(client, frame)
            now = None  # the write waited: a reading taken before it would not time it
        queue = client.outbox.queue
        if outcome is OK and not (queue and queue[0] is envelope):
            outcome = CLOSED  # detached while writing: the message went back to the queue
        if outcome is OK:
            self._head_written(client, envelope, is_retry, now)
            if not client.v1 and self.backend.durable:  # written = delivered: trim the store
                await self.ack_stored(client, envelope.seq or 0)
            return True
        if is_retry:
            self._acct.retry_failure(client)
        if outcome is CLOSED:
            return False
        doomed = self._head_failed(client, envelope)
        if doomed is not None:
            await self.dead_letter(client, doomed, "retries exhausted")
        return False

    def _head_written(
        self, client: ClientSession, envelope: Envelope, is_retry: bool, now: float | None
    ) -> None:
        """The head of the queue was written: in flight (tether.v1) or delivered (plain)."""
        if is_retry:
            self._acct.retry_success(client)
        v1 = client.v1
        client.outbox.mark_written(keep=v1)
        if v1 and envelope.seq is not None and envelope.seq > client.highest_written:
            client.highest_written = envelope.seq
        if not envelope.written_once:
            envelope.written_once = True
            self._acct.sent(client)
        if not v1:
            # A plain-mode write is a delivery: it advances the stream's acknowledged
            # position, so a later tether.v1 hello starts after it (durable stores record
            # the same through `ack_stored`).
            if envelope.seq is not None and envelope.seq > client.acked:
                client.acked = envelope.seq
            # `now` was read when the lock was taken: with the session's own outbox as the
            # store nothing was awaited since, so it times this write too (one clock
            # reading, not two); a store that suspends is timed after the write.
            self.delivered(client, envelope, now if self.acks_in_process else None)

    def _head_failed(self, client: ClientSession, envelope: Envelope) -> Envelope | None:
        """A write of the head failed: schedule its retry, or take it out of the queue
        to be dead-lettered (returned) when its retries are used up."""
        envelope.attempts += 1
        if self._retry.exhausted(envelope.attempts):
            return client.outbox.remove_head()
        envelope.next_attempt_at = self.clock.now() + self._retry.delay(envelope.attempts)
        if self._record_attempts is not None:
            self._record_attempts(client, envelope)
        return None

    # ------------------------------------------------------------------ leaving the outbox

    def delivered(
        self, client: ClientSession, envelope: Envelope, now: float | None = None
    ) -> None:
        acct = self._acct
        if self._batching:  # timed once for the whole batch, by `end_batch`
            acct.delivered_untimed(client)
            self._batch_delivered += 1
        else:
            if now is None and acct.enabled:
                now = self.clock.now()
            acct.delivered(client, envelope, now or 0.0)
        if client.drained is not None and not client.outbox:
            client.drained.set()

    async def acknowledge(self, client: ClientSession, seq: int) -> int:
        """A tether.v1 ack of every message up to `seq` (already validated): delivered."""
        delivered = self._settle_ack(client, seq)
        if delivered is not None and not self.acks_in_process:
            try:
                current = await self.backend.ack(client, seq)
            except BackendError as exc:  # re-sent on resume; the client drops the duplicate
                log.warning("tether: could not record ack %d of %s: %s", seq, client.client_id, exc)
            else:
                if not current:  # the stored stream is no longer the one this ack speaks of
                    self.streams.lost(client)
        return delivered or 0

    def acknowledge_now(self, client: ClientSession, seq: int) -> int | None:
        """`acknowledge` without suspending, when the store needs no word of it (the
        session's outbox is the store): how many messages it delivered. None when the
        store must be told: nothing was done, use `acknowledge`."""
        if not self.acks_in_process:
            return None
        return self._settle_ack(client, seq) or 0

    def _settle_ack(self, client: ClientSession, seq: int) -> int | None:
        """Trim the outbox up to `seq` and count what that delivered; None when the ack
        delivered nothing (a repeat)."""
        outbox = client.outbox
        done = outbox.ack(seq)
        late = outbox.evicted_unacked.take_upto(seq) if outbox.evicted_unacked else 0
        if late:
            self._acct.delivered_evicted(client, late)
        if seq > client.acked:
            client.acked = seq
        now = self.clock.now()  # one clock read times every message this ack delivers
        client.last_seen = now
        if done:
            self._acct.delivered_many(client, done, now)
            if client.drained is not None and not client.outbox:
                client.drained.set()
        elif not late:
            return None
        return len(done)

    def settle_evicted(self, client: ClientSession, acked: int) -> None:
        """The stream moves on (a new connection, or the session is forgotten): in-flight
        messages pushed out of the outbox are delivered up to `acked` (what the client
        acknowledged, -1 when nothing can be vouched for) and dropped above it — a
        resuming client is told of those as lost."""
        unacked = client.outbox.evicted_unacked
        if not unacked:
            return
        late = unacked.take_upto(acked) if acked > 0 else 0
        if late:
            self._acct.delivered_evicted(client, late)
        never = unacked.take_all()
        if never:
            self._acct.dropped(client, never)

    async def ack_stored(self, client: ClientSession, seq: int) -> None:
        """Tell a durable backend that everything up to `seq` was delivered."""
        try:
            current = await self.backend.ack(client, seq)
        except BackendError as exc:  # re-sent after a reconnect; counted by the backend
            log.warning(
                "tether: could not record delivery %d of %s: %s", seq, client.client_id, exc
            )
        else:
            if not current and client.connected:
                self.streams.lost(client)

    async def expire(self, client: ClientSession, now: float) -> None:
        """Take out the messages whose TTL has passed (lock held), counted and logged."""
        expired = client.outbox.expire(now)
        for envelope in expired:
            self._acct.expired(client)
            log.info(
                "tether: message %s to %s expired undelivered (seq %s)",
                envelope.message_id,
                client.client_id,
                envelope.seq,
            )
        if client.drained is not None and not client.outbox:
            client.drained.set()
        if expired:
            try:
                await self.backend.discard(client, expired)
            except BackendError as exc:
                log.warning("tether: could not discard expired messages: %s", exc)

    async def dead_letter(
        self, client: ClientSession, envelope: Envelope, reason: str, *, locked: bool = True
    ) -> None:
        """Keep a message whose retries are used up in the dead-letter store (and the
        backend's), counted and logged. When the backend cannot record it (a full disk),
        the message is not dead-lettered: it goes back to the outbox, still stored, and its
        next failed attempt dead-letters it again (a successful one delivers it).
        `locked`: the caller holds the client's lock (else it is taken to requeue)."""
        letter = DeadLetter(
            client_id=client.client_id,
            message_id=envelope.message_id,
            seq=envelope.seq,
            attempts=envelope.attempts,
            reason=reason,
            failed_at=self.clock.wall(),
            data=envelope.data,
        )
        try:
            await self.backend.dead_letter(client, letter)
        except BackendError as exc:
            log.warning(
                "tether: could not record dead letter for %s: %s; message %s (seq %s) stays queued",
                client.client_id,
                exc,
                envelope.message_id,
                envelope.seq,
            )
            if locked:
                self._requeue(client, envelope)
            else:
                async with client.lock:
                    self._requeue(client, envelope)
            return
        try:
            await self.backend.discard(client, [envelope])
        except BackendError as exc:
            log.warning("tether: could not discard dead letter for %s: %s", client.client_id, exc)
        self._acct.dead_lettered(client)
        if len(client.dead_letters) == client.dead_letters.maxlen:
            log.warning(
                "tether: dead-letter store of %s full; discarding its oldest entry",
                client.client_id,
            )
        client.dead_letters.append(letter)
        log.warning(
            "tether: message %s to %s dead-lettered after %d attempts (%s)",
            envelope.message_id,
            client.client_id,
            envelope.attempts,
            reason,
        )

    def _requeue(self, client: ClientSession, envelope: Envelope) -> None:
        """Put back, in seq order among the unwritten, a message taken out of the queue
        to be dead-lettered whose dead letter could not be recorded; retried after the
        backoff of its (exhausted) attempt count."""
        envelope.next_attempt_at = self.clock.now() + self._retry.delay(envelope.attempts)
        queue = client.outbox.queue
        seq = envelope.seq
        index = 0 if seq is None else len(queue)
        if seq is not None:
            for position, queued in enumerate(queue):
                if queued.seq is None or queued.seq > seq:
                    index = position
                    break
        queue.insert(index, envelope)

    async def retry(self, clients: list[ClientSession]) -> int:
        """One retry cycle: for each client with anything pending, expire, then write
        what is due (taking each client's lock). Returns how many were written."""
        now = self.clock.now()
        written = 0
        for client in clients:
            if not client.outbox:
                continue
            async with client.lock:
                await self.expire(client, now)
                if client.connected and client.outbox.queue:
                    written += await self.flush(client, force=False)
        return written

    async def restore(
        self,
        client: ClientSession,
        envelopes: list[Envelope],
        epoch: str | None = None,
        upto: int | None = None,
    ) -> None:
        """Store again, in order, a plain-mode client's copies that its recreated stream
        lost (see `StreamKeeper.lost`), behind whatever the new stream already holds. A
        copy the stream still holds (a failover that rolled back only the last writes)
        is not stored twice, nor is one another node delivered meanwhile (the stream was
        rolled back to `upto` in `epoch`, the epoch the copies' seqs belong to, so a copy
        numbered up to there kept its number, and is still that epoch, acked past the
        copy: delivered from there; numbers above `upto` may have been reused); one that has
        expired is counted expired; one that cannot be stored again is counted dropped and
        logged — never thrown away uncounted. Its dedup key may have outlived the stream:
        recorded anew, not checked (the copy is not in the stream)."""
        cid = client.client_id
        left = list(envelopes)
        again = self._restore_append
        assert again is not None  # wired only then (see __init__)
        restored = 0
        try:
            async with client.lock:
                try:
                    stored = await self.backend.load(client, after=0)
                except BackendError as exc:
                    self._restore_failed(client, left, f"backend unavailable: {exc}")
                    left = []
                    return
                held: set[str] = set()
                if stored is not None:
                    held = {e.message_id for e in stored.envelopes}
                    # removed by the load: counted here, unless the session mirrors them
                    # (reconnected meanwhile), whose own expiry counts them
                    mirrored = {id(e) for e in client.outbox}
                    for gone in stored.expired:
                        if id(gone) not in mirrored:
                            self._acct.expired(client)
                now = self.clock.now()
                while left:
                    envelope = left[0]  # taken off once settled: a cancel counts it
                    if envelope.message_id in held:
                        left.pop(0)  # still stored: delivered from there
                        continue
                    if envelope.expires_at <= now:
                        left.pop(0)
                        self._acct.expired(client)
                        continue
                    old_seq, envelope.seq = envelope.seq, None
                    kept = upto is not None and old_seq is not None and old_seq <= upto
                    try:
                        outcome = await again(client, envelope, epoch if kept else None, old_seq)
                    except BackendError as exc:
                        left.pop(0)
                        self._restore_failed(client, [envelope], f"backend unavailable: {exc}")
                        continue
                    left.pop(0)
                    if outcome is None:  # delivered by another node meanwhile
                        continue
                    if outcome is _FULL:
                        self._acct.overflow(client)
                        self._restore_failed(client, [envelope], "outbox full")
                    else:  # stored: count what it pushed out, as for any append
                        restored += 1
                        self._refused(client, envelope, outcome)
                        if isinstance(outcome, Accepted):
                            for _ in outcome.expired:
                                self._acct.expired(client)
        except asyncio.CancelledError:
            self._restore_failed(client, left, "hub stopping")
            raise
        log.info("tether: stored %d message(s) to %s again in its new stream", restored, cid)
        await self.load_new(cid)  # connected here again meanwhile: deliver them

    def _restore_failed(self, client: ClientSession, envelopes: list[Envelope], why: str) -> None:
        for envelope in envelopes:
            self._acct.dropped(client)
            log.warning(
                "tether: message %s to %s dropped: its stored stream was recreated and it "
                "could not be stored again (%s)",
                envelope.message_id,
                client.client_id,
                why,
            )

    async def load_new(self, client_id: str) -> None:
        """Another node stored critical messages for a client connected here: mirror
        them and write what is due."""
        client = self._registry.get(client_id)
        if client is None or not client.connected:
            return
        async with client.lock:
            known = client.next_seq - 1
            try:
                stored = await self.backend.load(client, after=known)
            except BackendError as exc:
                log.warning("tether: could not load new messages for %s: %s", client_id, exc)
                return
            if stored is None or not self.streams.extend(client, stored, known):
                return
            await self.flush(client, force=False)

    async def drain(self, client: ClientSession) -> None:
        """Deliver everything the client has pending (in tether.v1: until acked)."""
        client.drained = asyncio.Event()
        async with client.lock:
            if client.connected and client.outbox.queue:
                await self.flush(client, force=True)
        if client.v1 and client.outbox and client.connected:
            await client.drained.wait()


def _why_queued(client: ClientSession) -> str:
    if not client.connected:
        return NOT_CONNECTED
    if client.breaker.state is not CircuitState.CLOSED:
        return f"circuit {client.breaker.state.value}"
    if len(client.outbox.queue) > 1:
        return "behind earlier undelivered messages"
    return "send failed; will retry"


def may_write_directly(client: ClientSession, envelope: Envelope) -> bool:
    """A plain-mode client connected here with nothing queued and a CLOSED breaker, and a
    message without a dedup key: it may be written without being stored (written is
    delivered in plain mode), once the store confirmed that no other node holds anything
    for the client (cross-node FIFO). A message with a dedup key is stored: its key must
    be recorded with the message, or a failed write would leave it claiming a delivery
    that never happened."""
    return (
        (envelope.dedup_key is None or client.dedup is None)
        and not client.v1
        and client.connected
        and not client.outbox.queue
        and client.breaker.state is CircuitState.CLOSED
    )
