"""Hub: accepts sends for client ids and gets critical messages delivered, once and in order."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import logging
import random
import re
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import orjson

from . import protocol
from .backends import (
    Accepted,
    Backend,
    BackendError,
    BackendEvents,
    MemoryBackend,
    OutcomeUnknown,
    Refused,
    StoredOutbox,
    create_backend,
)
from .channels import ChannelMessage, Channels, Position, PublishResult, PublishStatus
from .channels.service import Authorizer, SubscribeRefused
from .clock import Clock, SystemClock
from .config import BackendKind, DedupMode, HubConfig, OverflowPolicy
from .inspection import HubInspection
from .messages import (
    BroadcastResult,
    DeadLetter,
    Envelope,
    SendResult,
    SendStatus,
    ShutdownStats,
)
from .metrics import Counters, HubMetrics
from .resilience import (
    BreakerPolicy,
    CircuitBreaker,
    CircuitState,
    DedupWindow,
    Outbox,
    RetryPolicy,
    content_key,
)
from .resume import resume
from .session import ClientSession
from .transports.base import Transport, TransportClosed

log = logging.getLogger("tether")

MessageHandler = Callable[[str, Any], Awaitable[None]]

CLIENT_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")

_OK, _FAILED, _CLOSED, _TIMEOUT, _PENDING = 0, 1, 2, 3, 4
_WRITE_FAILURES = {_FAILED: "send failed", _CLOSED: "connection closed", _TIMEOUT: "send timeout"}
_WARN_EVERY = 10.0  # seconds between repeated warnings of one kind
_STORE_SLICE = 256  # a broadcast's copies per store request (see redis_batch.PIPELINE_ITEMS)


class HubClosedError(RuntimeError):
    """The hub is shutting down or stopped and accepts no new connections."""


class _Rejected(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Hub(HubInspection):
    """Delivers messages to clients by id, through disconnects, failures and restarts.

    Critical messages (`critical=True`) wait in a per-client outbox until delivered
    (written in plain mode, acknowledged in tether.v1), expired or dead-lettered;
    best-effort ones are sent now or dropped with a reason. See `docs/` for the model.
    """

    def __init__(
        self,
        config: HubConfig | None = None,
        *,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        backend: Backend | None = None,
    ) -> None:
        self.config = config if config is not None else HubConfig()
        self.clock: Clock = clock if clock is not None else SystemClock()
        cfg = self.config
        self.session_id = uuid.uuid4().hex
        self.metrics = HubMetrics(self.clock, enabled=cfg.metrics_enabled)
        self.metrics.bind(self._gauges, self._client_extras)
        self._counters: Counters = self.metrics.counters
        self._retry = RetryPolicy(
            cfg.retry_base_delay, cfg.retry_max_delay, cfg.max_retries, rng or random.Random()
        )
        self._breaker_policy = BreakerPolicy(
            cfg.failure_threshold,
            cfg.success_threshold,
            cfg.recovery_timeout,
            cfg.half_open_max_calls,
        )
        self._clients: dict[str, ClientSession] = {}
        self._groups: dict[str, set[str]] = {}
        self._handlers: list[MessageHandler] = []
        self._breaker_counts = dict.fromkeys(CircuitState, 0)
        self._not_closed: set[str] = set()  # clients whose breaker is OPEN or HALF_OPEN
        self._active = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._stray: set[asyncio.Task[Any]] = set()
        self._started = False
        self._closing = False
        self._stopped = False
        self._shutdown_stats: ShutdownStats | None = None
        self._id_prefix = self.session_id[:10]
        self._ids = itertools.count(1)
        self._send_timeout = cfg.send_timeout
        self._overflow_warned_at = -_WARN_EVERY
        self._overflow_unwarned = 0
        self._backend: Backend = backend if backend is not None else self._default_backend()
        self.metrics.add_section("channels", self._channel_metrics, Channels.COUNTERS)
        # A backend that can store without suspending lets critical fan-out skip tasks.
        self._append_now: Callable[[ClientSession, Envelope], Accepted | Refused] | None = getattr(
            self._backend, "append_now", None
        )

    def _default_backend(self) -> Backend:
        cfg = self.config
        if cfg.backend is BackendKind.MEMORY:
            return MemoryBackend()
        return create_backend(
            cfg.backend.value,
            url=cfg.redis_url,
            prefix=cfg.redis_prefix,
            node_id=cfg.node_id,
            config=cfg,
            clock=self.clock,  # to turn hub-clock deadlines into wall-clock ones and back
        )

    @property
    def backend(self) -> Backend:
        return self._backend

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start the retry and cleanup loops. Idempotent; `connect`/`send` call it too."""
        if self._started:
            return
        if self._closing:
            raise HubClosedError("a hub cannot be restarted after shutdown")
        self._started = True
        await self._backend.start(
            BackendEvents(
                new_messages=self._on_new_messages,
                forwarded=self._on_forwarded,
                broadcast=self._on_broadcast,
                kicked=self._on_kicked,
            )
        )
        self._tasks = [
            asyncio.create_task(
                self._loop(self.retry_now, self.config.retry_interval), name="tether-retry"
            ),
            asyncio.create_task(
                self._loop(self.cleanup_now, self.config.cleanup_interval), name="tether-cleanup"
            ),
        ]

    async def __aenter__(self) -> Hub:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: object = None) -> AsyncIterator[None]:
        """An ASGI lifespan: `FastAPI(lifespan=hub.lifespan)` starts the hub with the
        app and shuts it down gracefully with it."""
        async with self:
            yield

    @property
    def running(self) -> bool:
        return self._started and not self._closing

    @property
    def closing(self) -> bool:
        return self._closing

    async def _loop(self, cycle: Callable[[], Awaitable[int]], interval: float) -> None:
        while True:
            await self.clock.sleep(interval)
            try:
                await cycle()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bad cycle must never kill the loop
                log.exception("tether background cycle %s failed", cycle.__name__)

    # ------------------------------------------------------------------ connections

    async def connect(
        self, client_id: str, transport: Transport, *, hello: protocol.Hello | None = None
    ) -> protocol.Welcome | None:
        """Attach a connection to `client_id` and deliver its outbox at once, in order.

        A previous connection of the same id is replaced (and closed). With `hello`
        (a tether.v1 connection) the hub answers with a `welcome` frame that says what
        was resumed or lost, then re-sends every unacknowledged message after
        `hello.last_seq`. Returns that `Welcome`, or None in plain mode.
        """
        if self._closing:
            raise HubClosedError("hub is shutting down")
        try:
            self._check_client_id(client_id)
            client = self._clients.get(client_id) or self._track(client_id)
        except _Rejected as rejected:
            raise ValueError(rejected.reason) from None
        await self.start()
        async with client.lock:
            old = client.transport
            if old is not None:
                self._detach(client, old, failed=False)
                self._background(self._close_quietly(old, 1000, "replaced by a new connection"))
            client.transport = transport
            fast = getattr(transport, "try_send", None)
            client.try_send = fast if callable(fast) else None
            client.v1 = hello is not None
            client.connected_at = self.clock.wall()
            self._active += 1
            self._counters.connections_total += 1
            client.stats.counters.connections_total += 1
            if client.connections:
                self._counters.connections_reconnections += 1
                client.stats.counters.connections_reconnections += 1
            client.connections += 1
            self._touch(client)
            problem = await self._load_stored(client, hello)
            if problem is not None and hello is not None:
                # Without the stored stream a resume would be guessed (and reported as a
                # reset): send the client away to retry, here or on another node.
                self._detach(client, transport, failed=True)
                raise ValueError(f"backend unavailable: {problem}")
            welcome = None
            if hello is not None:
                welcome, delivered = resume(client, hello.last_seq, self.session_id, hello.epoch)
                for envelope in delivered:
                    self._delivered(client, envelope)
                if welcome.reset:
                    self._count(client, "streams_resets")
                    log.warning(
                        "tether: %s resumed from seq %d of a stream this hub cannot vouch "
                        "for; answered with a reset",
                        client_id,
                        hello.last_seq,
                    )
                if welcome.lost:
                    self._counters.streams_lost += welcome.lost
                    if self.metrics.enabled:
                        client.stats.counters.streams_lost += welcome.lost
                if self._backend.durable and hello.last_seq and not welcome.reset:
                    await self._ack_stored(client, client.acked)  # what the client already has
                if await self._transmit(client, protocol.encode(welcome)) != _OK:
                    return welcome
            await self._flush(client, force=True)
        return welcome

    async def _load_stored(self, client: ClientSession, hello: protocol.Hello | None) -> str | None:
        """With a shared backend the stored stream is the record: adopt it (lock held); a
        tether.v1 hello settles it against the client's position first. Returns why it
        could not be loaded, if it could not."""
        backend = self._backend
        if not backend.shared:
            return None
        try:
            await backend.claim(client.client_id)
            if hello is not None:
                stored = await backend.attach(client, hello.last_seq, hello.epoch)
            else:
                stored = await backend.load(client)
        except BackendError as exc:
            log.warning(
                "tether: backend unavailable while connecting %s: %s", client.client_id, exc
            )
            return str(exc)
        if stored is None:
            return None
        self._adopt(client, stored)
        if stored.reset:
            client.stream_known = False  # resume() answers with a reset, as the store did
        return None

    def _adopt(self, client: ClientSession, stored: StoredOutbox) -> None:
        """Make the session mirror the stored stream (lock held)."""
        client.outbox.drain()
        for envelope in stored.envelopes:
            self._mirror(client, envelope)
        if stored.epoch != client.epoch:  # another numbering: nothing of ours carries over
            client.next_seq = stored.next_seq
            client.acked = stored.acked
        else:
            client.next_seq = max(client.next_seq, stored.next_seq)
            client.acked = max(client.acked, stored.acked)
        client.epoch = stored.epoch
        client.stream_known = True
        for _ in stored.expired:
            self._count(client, "messages_expired")

    @staticmethod
    def _mirror(client: ClientSession, envelope: Envelope) -> None:
        """Put a stored message into the session's outbox. The store already applied the
        bound, so the local copy must not refuse it."""
        if not client.outbox.push(envelope).accepted:
            client.outbox.queue.append(envelope)

    def _stream_lost(self, client: ClientSession) -> None:
        """The stored stream was recreated under a connected client (its keys vanished):
        its numbering is no longer the one this connection speaks. Close the connection
        (1012, so the client comes back at once); its resume is answered with a reset and
        nothing is resumed over."""
        log.warning(
            "tether: the stored stream of %s was recreated under its connection; "
            "closing it so that its resume reports the reset",
            client.client_id,
        )
        transport = client.transport
        client.outbox.drain()
        client.epoch = None
        client.stream_known = False
        if transport is not None:
            self._detach(client, transport, failed=False)
            self._background(self._close_quietly(transport, 1012, "stream reset; reconnect"))

    async def disconnect(
        self,
        client_id: str,
        *,
        transport: Transport | None = None,
        code: int = 1000,
        reason: str = "",
        failed: bool = False,
    ) -> bool:
        """Detach the client's connection; its outbox stays and critical sends now queue.

        Called without `transport`, the hub closes the connection with `code`. A
        transport adapter passes its own `transport` when the socket has closed, so a
        late notice from a replaced connection cannot detach the new one. Returns
        whether a connection was detached.
        """
        client = self._clients.get(client_id)
        if client is None or client.transport is None:
            return False
        if transport is not None and client.transport is not transport:
            return False
        async with client.lock:
            current = client.transport
            if current is None or (transport is not None and current is not transport):
                return False
            self._detach(client, current, failed=failed)
        if transport is None:
            await self._close_quietly(current, code, reason)
        return True

    async def _release(self, client_id: str) -> None:
        if self.is_connected(client_id):  # reconnected meanwhile: presence is ours again
            return
        try:
            await self._backend.release(client_id)
        except BackendError as exc:
            log.debug("tether: presence release of %s failed: %s", client_id, exc)

    def is_connected(self, client_id: str) -> bool:
        client = self._clients.get(client_id)
        return client is not None and client.transport is not None

    def _detach(self, client: ClientSession, transport: Transport, *, failed: bool) -> None:
        """Forget the connection (lock held): unacked messages go back to the queue front."""
        if client.transport is not transport:
            return
        client.transport = None
        client.try_send = None
        client.v1 = False
        client.connected_at = None
        client.highest_written = client.acked
        self._active -= 1
        client.outbox.requeue_inflight()
        if self._backend.shared:
            self._background(self._release(client.client_id))
        if client.drained is not None:
            client.drained.set()
        if failed:
            self._counters.connections_failed += 1
            client.stats.counters.connections_failed += 1
        self._touch(client)

    # ------------------------------------------------------------------ sending

    async def send(
        self,
        client_id: str,
        payload: Any,
        *,
        critical: bool = False,
        message_id: str | None = None,
        ttl: float | None = None,
    ) -> SendResult:
        """Send `payload` (str, bytes or JSON-serialisable) to one client.

        Critical: SENT (written now) or QUEUED (in the outbox, delivered in order when
        possible). Best-effort: SENT or DROPPED. Also DUPLICATE (seen within the dedup
        window) and REJECTED (unencodable or oversized payload, invalid client id, full
        outbox under the `reject` policy, or the hub is shutting down), with a `reason`.
        """
        try:
            if self._closing:
                raise _Rejected("shutting down")
            # A tracked id was validated when it was first tracked.
            client = self._clients.get(client_id) if isinstance(client_id, str) else None
            if client is None:
                self._check_client_id(client_id)
            envelope = self._prepare(payload, critical, message_id, ttl)
            if not self._started:
                await self.start()
            if client is None:
                client = self._clients.get(client_id) or self._track(client_id)
        except _Rejected as rejected:
            self._counters.messages_rejected += 1
            return SendResult(
                SendStatus.REJECTED,
                client_id,
                self._explicit_id(payload, message_id) or f"{self._id_prefix}-{next(self._ids)}",
                rejected.reason,
            )
        return await self._deliver(client, envelope)

    async def broadcast(
        self,
        payload: Any,
        *,
        critical: bool = False,
        group: str | None = None,
        message_id: str | None = None,
        ttl: float | None = None,
        exclude: Iterable[str] = (),
    ) -> BroadcastResult:
        """Send one payload to every client (or every member of `group`), concurrently.

        Best-effort broadcasts go to connected clients; critical ones also queue for
        known clients that are offline. One slow client never delays the others beyond
        `send_timeout`.
        """
        if group is not None:
            ids: Iterable[str] = self._groups.get(group, ())
        else:
            ids = self._clients
        if critical and self._backend.shared and not self._closing:
            try:  # critical: every client the cluster knows, wherever it is connected
                cluster = await self._backend.members(group)
            except BackendError as exc:
                log.warning("tether: cluster membership unavailable: %s", exc)
                cluster = None
            if cluster:
                for cid in cluster:
                    if cid not in self._clients and CLIENT_ID_PATTERN.fullmatch(cid):
                        with contextlib.suppress(_Rejected):
                            self._track(cid)
                ids = set(ids) | cluster
        skip = set(exclude)
        targets = [
            c
            for cid in list(ids)
            if cid not in skip
            and (c := self._clients.get(cid)) is not None
            and (critical or c.transport is not None)
        ]
        try:
            if self._closing:
                raise _Rejected("shutting down")
            template = self._prepare(payload, critical, message_id, ttl)
        except _Rejected as rejected:
            self._counters.messages_rejected += len(targets)
            return BroadcastResult(
                self._explicit_id(payload, message_id) or f"{self._id_prefix}-{next(self._ids)}",
                rejected=len(targets),
                reasons={rejected.reason: len(targets)} if targets else {},
            )
        if not self._started:
            await self.start()
        deliver = self._deliver
        if critical and self._append_now is None:  # a store that must be awaited
            results = await self._broadcast_stored(targets, template)
        elif critical:  # each client's copy gets its own seq and attempts in its outbox
            copy = self._copy
            results = []
            awaited = []
            for client in targets:
                envelope = copy(template)
                result = self._accept_now(client, envelope)
                if result is None:
                    awaited.append(deliver(client, envelope))
                else:
                    results.append(result)
            if awaited:
                results += await asyncio.gather(*awaited)
        else:  # a best-effort envelope is never stored or changed per client: share it
            results = []
            awaited = []
            # Without a dedup key (checked through the backend) most deliveries finish
            # synchronously: no task per client for those.
            direct = self._deliver_now if template.dedup_key is None else None
            for client in targets:
                result = direct(client, template) if direct is not None else None
                if result is None:
                    awaited.append(deliver(client, template))
                else:
                    results.append(result)
            if awaited:
                results += await asyncio.gather(*awaited)
        if not critical and self._backend.shared:
            try:
                await self._backend.publish_broadcast(template, group)
            except BackendError as exc:
                log.warning("tether: broadcast not published to the cluster: %s", exc)
        counts = dict.fromkeys(SendStatus, 0)
        reasons: dict[str, int] = {}
        for result in results:
            counts[result.status] += 1
            if result.reason is not None:
                reasons[result.reason] = reasons.get(result.reason, 0) + 1
        return BroadcastResult(
            template.message_id,
            sent=counts[SendStatus.SENT],
            queued=counts[SendStatus.QUEUED],
            duplicate=counts[SendStatus.DUPLICATE],
            dropped=counts[SendStatus.DROPPED],
            rejected=counts[SendStatus.REJECTED],
            reasons=reasons,
            unknown=counts[SendStatus.UNKNOWN],
        )

    async def _broadcast_stored(
        self, targets: list[ClientSession], template: Envelope
    ) -> list[SendResult]:
        """A critical broadcast through a store that must be awaited: every client's copy
        is stored in one batch (one or a few round trips), then written without a task
        per client. Clients whose lock is taken (a send in progress) keep their order by
        going through the per-client path."""
        free: list[ClientSession] = []
        busy: list[ClientSession] = []
        unwritten: list[ClientSession] = []
        for client in targets:
            if client.lock.locked() or (client.transport is not None and client.try_send is None):
                busy.append(client)
            else:
                free.append(client)
        for client in free:
            await client.lock.acquire()  # free and nothing awaited since: never suspends
        results: list[SendResult] = []
        trims: list[tuple[ClientSession, int]] = []
        try:
            items = []
            for client in free:
                envelope = self._copy(template)
                envelope.direct = self._may_write_directly(client)
                items.append((client, envelope, client.transport is not None))
            # In slices, all sent at once: the store works on the next slice while this
            # process writes the copies of the first.
            slices = [items[i : i + _STORE_SLICE] for i in range(0, len(items), _STORE_SLICE)]
            stored = [asyncio.ensure_future(self._backend.append_many(part)) for part in slices]
            for part, pending in zip(slices, stored, strict=True):
                outcomes = await pending
                now = self.clock.now()
                for (client, envelope, local), outcome in zip(part, outcomes, strict=True):
                    client.last_seen = now
                    if isinstance(outcome, BackendError):
                        results.append(self._store_failed(client, envelope, outcome))
                        continue
                    if isinstance(outcome, Accepted) and outcome.direct:
                        if self._write_now(client, envelope.data) == _OK:
                            results.append(self._written_directly(client, envelope))
                        else:  # the socket did not take it: store it after all (below)
                            envelope.direct = False
                            envelope.dedup_key = None  # recorded by the direct answer
                            unwritten.append(client)
                        continue
                    settled = self._settle(client, envelope, outcome, local)
                    if settled is None:
                        settled = self._write_stored_now(client, envelope, trims)
                    results.append(settled)
        finally:
            for client in free:
                client.lock.release()
        if trims:
            self._background(self._trim_stored(trims))
        if busy or unwritten:
            results += await asyncio.gather(
                *(self._deliver(c, self._copy(template)) for c in busy),
                *(self._deliver(c, self._stored_copy(template)) for c in unwritten),
            )
        return results

    def _stored_copy(self, template: Envelope) -> Envelope:
        """A copy whose dedup key the store already recorded (a direct write that the
        socket did not take): stored without a second dedup check."""
        envelope = self._copy(template)
        envelope.dedup_key = None
        return envelope

    async def _trim_stored(self, trims: list[tuple[ClientSession, int]]) -> None:
        """Tell a durable store that plain-mode writes delivered these messages."""
        try:
            await self._backend.ack_many(trims)
        except BackendError as exc:  # re-sent after a reconnect; counted by the backend
            log.warning("tether: could not record %d deliveries: %s", len(trims), exc)

    def _prepare(
        self, payload: Any, critical: bool, message_id: str | None, ttl: float | None
    ) -> Envelope:
        """Encode once, check size, pick the message id and dedup key."""
        data_json: bytes | None = None
        enc = None
        if isinstance(payload, str):
            data: str | bytes = payload
            try:  # also refuses lone surrogates, which no WebSocket text frame can carry
                size = len(payload.encode("utf-8"))
            except UnicodeEncodeError as exc:
                raise _Rejected(f"payload is not valid Unicode text: {exc.reason}") from None
        elif isinstance(payload, bytes | bytearray | memoryview):
            data = bytes(payload)
            size = len(data)
            enc = "base64"
        else:
            try:
                data_json = orjson.dumps(payload)
            except (TypeError, orjson.JSONEncodeError) as exc:
                raise _Rejected(f"payload is not JSON-serialisable: {exc}") from None
            if critical:
                # orjson's bytes keep their growth buffer (~4 KB of RSS for a 500-byte
                # payload); a critical message may wait in an outbox for minutes, so it
                # keeps an exact-size copy (~200 ns) and outbox memory tracks payload size.
                data_json = bytes(memoryview(data_json))
            data = data_json.decode()
            size = len(data_json)
        cfg = self.config
        if size > cfg.max_message_size:
            raise _Rejected(
                f"payload is {size} bytes, over max_message_size ({cfg.max_message_size})"
            )
        if ttl is not None and not ttl > 0:
            raise _Rejected(f"ttl must be positive, got {ttl!r}")
        if message_id is not None:
            if not isinstance(message_id, str):
                raise _Rejected("message_id must be a string")
            explicit = message_id
        else:
            explicit = self._explicit_id(payload, None)
        mode = cfg.dedup_mode
        dedup_key: str | None = None
        if mode is DedupMode.ID and explicit:
            dedup_key = "i:" + explicit
        elif mode is DedupMode.CONTENT:
            dedup_key = content_key(data_json if data_json is not None else data)
        now = self.clock.now()
        return Envelope(  # positional: about half the cost of keywords on this hot path
            explicit or f"{self._id_prefix}-{next(self._ids)}",
            data,
            data_json,
            critical,
            now,  # created_at
            now + (ttl if ttl is not None else cfg.message_ttl),  # expires_at
            enc,
            None,  # seq
            0,  # attempts
            0.0,  # next_attempt_at
            dedup_key,
        )

    @staticmethod
    def _explicit_id(payload: Any, message_id: str | None) -> str:
        if message_id is not None:
            return str(message_id)
        if isinstance(payload, dict):
            value = payload.get("id")
            if isinstance(value, str | int) and not isinstance(value, bool):
                return str(value)
        return ""

    @staticmethod
    def _copy(template: Envelope) -> Envelope:
        return Envelope(
            template.message_id,
            template.data,
            template.data_json,
            template.critical,
            template.created_at,
            template.expires_at,
            template.enc,
            None,  # seq
            0,  # attempts
            0.0,  # next_attempt_at
            template.dedup_key,
        )

    async def _deliver(self, client: ClientSession, envelope: Envelope) -> SendResult:
        lock = client.lock  # acquire/release: `async with` adds two coroutine frames
        await lock.acquire()
        try:
            if envelope.critical:
                client.last_seen = self.clock.now()
                return await self._accept_critical(client, envelope)
            key = envelope.dedup_key
            if key is not None and await self._backend.seen(client, key):
                client.last_seen = self.clock.now()
                return self._duplicate(client, envelope)
            return await self._send_best_effort(client, envelope)  # it touches the client
        finally:
            lock.release()

    def _duplicate(self, client: ClientSession, envelope: Envelope) -> SendResult:
        self._count(client, "messages_deduplicated")
        return SendResult(
            SendStatus.DUPLICATE,
            client.client_id,
            envelope.message_id,
            "duplicate within the dedup window",
        )

    async def _accept_critical(
        self, client: ClientSession, envelope: Envelope, *, direct: bool = True
    ) -> SendResult:
        backend = self._backend
        local = client.transport is not None or not backend.shared
        if direct and backend.shared and self._may_write_directly(client):
            envelope.direct = True
        try:
            stored = await backend.append(client, envelope, local=local)
        except BackendError as exc:
            return self._store_failed(client, envelope, exc)
        if isinstance(stored, Accepted) and stored.direct:
            return await self._write_directly(client, envelope)
        settled = self._settle(client, envelope, stored, local)
        if settled is not None:
            return settled
        if (
            client.transport is not None
            and len(client.outbox.queue) == 1
            and envelope.attempts == 0  # else its retry is scheduled
            and client.breaker.allow()
            and await self._write_head(client)
        ):
            return SendResult(
                SendStatus.SENT, client.client_id, envelope.message_id, None, envelope.seq
            )
        return self._queued(client, envelope)

    @staticmethod
    def _may_write_directly(client: ClientSession) -> bool:
        """A plain-mode client connected here with nothing queued and a CLOSED breaker: a
        critical message for it may be written without being stored (written is
        delivered in plain mode), once the store confirmed that no other node holds
        anything for it (cross-node FIFO) and recorded its dedup key."""
        return (
            not client.v1
            and client.transport is not None
            and not client.outbox.queue
            and client.breaker.state is CircuitState.CLOSED
        )

    async def _write_directly(self, client: ClientSession, envelope: Envelope) -> SendResult:
        """Write a message the store cleared for direct delivery (lock held); if the socket
        does not take it, store it after all and deliver it in order later."""
        outcome = self._write_now(client, envelope.data)
        if outcome == _PENDING:
            outcome = await self._write_awaited(client, envelope.data)
        if outcome == _OK:
            return self._written_directly(client, envelope)
        envelope.direct = False
        envelope.dedup_key = None  # already recorded by the store's direct answer
        if outcome != _CLOSED:  # that was its first delivery attempt: retried with backoff
            envelope.attempts += 1
            envelope.next_attempt_at = self.clock.now() + self._retry.delay(envelope.attempts)
        return await self._accept_critical(client, envelope, direct=False)

    def _written_directly(self, client: ClientSession, envelope: Envelope) -> SendResult:
        envelope.written_once = True
        self._counters.messages_sent += 1
        if self.metrics.enabled:
            client.stats.counters.messages_sent += 1
        self._delivered(client, envelope)
        client.last_seen = self.clock.now()
        return SendResult(SendStatus.SENT, client.client_id, envelope.message_id)

    def _store_failed(
        self, client: ClientSession, envelope: Envelope, exc: BackendError
    ) -> SendResult:
        """A critical message the backend could not store, or may have stored."""
        if isinstance(exc, OutcomeUnknown):
            self._count(client, "streams_unknown")
            return SendResult(
                SendStatus.UNKNOWN,
                client.client_id,
                envelope.message_id,
                f"outcome unknown ({exc}); resend with message_id {envelope.message_id!r}: "
                "it is looked for before it is stored again (answered duplicate if found)",
            )
        self._count(client, "messages_rejected")
        return SendResult(
            SendStatus.REJECTED,
            client.client_id,
            envelope.message_id,
            f"backend unavailable: {exc}",
        )

    def _settle(
        self,
        client: ClientSession,
        envelope: Envelope,
        stored: Accepted | Refused,
        local: bool,
    ) -> SendResult | None:
        """After the backend answered an append (lock held): the result when there is
        nothing to write here, else None — then the message is in the session's outbox."""
        refused = self._refused(client, envelope, stored)
        if refused is not None or not self._backend.shared:
            return refused
        assert isinstance(stored, Accepted)
        if local and stored.changed:
            self._stream_lost(client)
            return self._queued(
                client, envelope, "stored; the client's stream was recreated, it is reconnecting"
            )
        if not local or client.transport is None or stored.unmirrored:
            if client.transport is not None:  # it connected here while we stored
                self._background(self._on_new_messages(client.client_id))
            reason = "client not connected"
            if stored.holder is not None and stored.holder != self._backend.node_id:
                reason = f"delivered by node {stored.holder}"
            return self._queued(client, envelope, reason)
        if client.epoch is None:
            client.epoch = stored.epoch
        for missing in stored.gap:
            self._mirror(client, missing)
        self._mirror(client, envelope)
        client.next_seq = max(client.next_seq, stored.seq + 1)
        return None

    def _refused(
        self, client: ClientSession, envelope: Envelope, stored: Accepted | Refused
    ) -> SendResult | None:
        """The result of a critical message the backend did not store, else None (after
        counting what a full outbox pushed out to make room)."""
        if stored is Refused.DUPLICATE:
            return self._duplicate(client, envelope)
        if stored is Refused.FULL:
            outbox = client.outbox
            self._count(client, "queue_overflows")
            limit = f"outbox full ({outbox.max_size} messages)"
            if outbox.policy is OverflowPolicy.REJECT:
                self._count(client, "messages_rejected")
                return SendResult(SendStatus.REJECTED, client.client_id, envelope.message_id, limit)
            self._count(client, "messages_dropped")
            return SendResult(SendStatus.DROPPED, client.client_id, envelope.message_id, limit)
        assert isinstance(stored, Accepted)
        for evicted in stored.evicted:
            self._count(client, "queue_overflows")
            self._count(client, "messages_dropped")
            self._warn_overflow(client, evicted)
        return None

    def _queued(
        self, client: ClientSession, envelope: Envelope, reason: str | None = None
    ) -> SendResult:
        self._counters.messages_queued += 1
        if self.metrics.enabled:
            client.stats.counters.messages_queued += 1
        return SendResult(
            SendStatus.QUEUED,
            client.client_id,
            envelope.message_id,
            reason or self._why_queued(client),
            seq=envelope.seq,
        )

    def _accept_now(self, client: ClientSession, envelope: Envelope) -> SendResult | None:
        """A critical delivery done without suspending (memory backend, lock free, empty
        queue, breaker CLOSED, socket ready), or None — then nothing was stored and the
        awaited path takes over. Once stored, a write the socket cannot take at once
        stays at the head of the queue and is flushed in the background."""
        append = self._append_now
        if (
            append is None
            or client.try_send is None
            or client.lock.locked()
            or client.transport is None
            or client.outbox.queue
            or client.breaker.state is not CircuitState.CLOSED
        ):
            return None
        client.last_seen = self.clock.now()
        refused = self._refused(client, envelope, append(client, envelope))
        if refused is not None:
            return refused
        return self._write_stored_now(client, envelope, None)

    def _write_stored_now(
        self,
        client: ClientSession,
        envelope: Envelope,
        trims: list[tuple[ClientSession, int]] | None,
    ) -> SendResult:
        """Write a just-stored message without suspending when it heads the queue and the
        socket takes it; else it stays queued (a write the socket cannot take at once is
        flushed in the background). Lock held, or free and nothing awaited since checked.
        Plain-mode deliveries that a durable store must trim go to `trims` (or are trimmed
        in the background when it is None)."""
        queue = client.outbox.queue
        if (
            client.try_send is None
            or client.transport is None
            or not queue
            or queue[0] is not envelope
            or client.breaker.state is not CircuitState.CLOSED
        ):
            return self._queued(client, envelope)
        frame = self._frame(client, envelope) if client.v1 else envelope.data
        outcome = self._write_now(client, frame)
        if outcome == _OK:
            self._head_written(client, envelope, is_retry=False)
            if not client.v1 and self._backend.durable:  # written = delivered: trim the store
                if trims is None:
                    self._background(self._ack_stored(client, envelope.seq or 0))
                else:
                    trims.append((client, envelope.seq or 0))
            return SendResult(
                SendStatus.SENT, client.client_id, envelope.message_id, None, envelope.seq
            )
        if outcome == _PENDING:
            self._background(self._flush_locked(client))
            return self._queued(client, envelope, "waiting for the connection to drain")
        if outcome != _CLOSED:
            doomed = self._head_failed(client, envelope)
            if doomed is not None:
                self._background(self._dead_letter(client, doomed, "retries exhausted"))
        return self._queued(client, envelope)

    async def _flush_locked(self, client: ClientSession) -> None:
        async with client.lock:
            await self._flush(client, force=True)

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

    def _why_queued(self, client: ClientSession) -> str:
        if client.transport is None:
            return "client not connected"
        if client.breaker.state is not CircuitState.CLOSED:
            return f"circuit {client.breaker.state.value}"
        if len(client.outbox.queue) > 1:
            return "behind earlier undelivered messages"
        return "send failed; will retry"

    async def _send_best_effort(self, client: ClientSession, envelope: Envelope) -> SendResult:
        """Write now or drop (lock held); touches the client with the clock read that also
        times the delivery."""
        if client.transport is None:
            if self._backend.shared:
                client.last_seen = self.clock.now()
                return await self._forward(client, envelope)
            reason = "client not connected"
        elif client.outbox.queue:
            reason = "behind undelivered critical messages"
        elif not client.breaker.allow():
            reason = f"circuit {client.breaker.state.value}"
        else:
            frame = self._frame(client, envelope) if client.v1 else envelope.data
            outcome = self._write_now(client, frame)
            if outcome == _PENDING:
                outcome = await self._write_awaited(client, frame)
            result = self._best_effort_written(client, envelope, outcome)
            if result.status is SendStatus.SENT and envelope.dedup_key is not None:
                await self._backend.remember(client, envelope.dedup_key)
            return result
        return self._best_effort_dropped(client, envelope, reason)

    def _deliver_now(self, client: ClientSession, envelope: Envelope) -> SendResult | None:
        """A best-effort delivery that completes without suspending — the common case of a
        broadcast, done without a task per client — or None when it needs the awaited
        path. Safe without the lock: nothing here awaits, and nothing is written unless
        the whole delivery completes (a CLOSED breaker's allow() has no side effect)."""
        if (
            client.try_send is None
            or client.lock.locked()
            or client.transport is None
            or client.outbox.queue
            or client.breaker.state is not CircuitState.CLOSED
        ):
            return None
        frame = self._frame(client, envelope) if client.v1 else envelope.data
        outcome = self._write_now(client, frame)
        if outcome == _PENDING:
            return None
        return self._best_effort_written(client, envelope, outcome)

    def _best_effort_written(
        self, client: ClientSession, envelope: Envelope, outcome: int
    ) -> SendResult:
        """Count a best-effort write's outcome; one clock read touches and times it."""
        if outcome != _OK:
            return self._best_effort_dropped(client, envelope, _WRITE_FAILURES[outcome])
        now = self.clock.now()
        client.last_seen = now
        counters = self._counters
        counters.messages_sent += 1
        counters.messages_delivered += 1
        if self.metrics.enabled:
            mine = client.stats.counters
            mine.messages_sent += 1
            mine.messages_delivered += 1
            self.metrics.latency.record(now - envelope.created_at)
        return SendResult(SendStatus.SENT, client.client_id, envelope.message_id)

    def _best_effort_dropped(
        self, client: ClientSession, envelope: Envelope, reason: str
    ) -> SendResult:
        client.last_seen = self.clock.now()
        self._counters.messages_dropped += 1
        if self.metrics.enabled:
            client.stats.counters.messages_dropped += 1
        return SendResult(SendStatus.DROPPED, client.client_id, envelope.message_id, reason)

    async def _forward(self, client: ClientSession, envelope: Envelope) -> SendResult:
        """Best-effort message for a client that may be connected to another node."""
        try:
            node = await self._backend.owner(client.client_id)
            if node is not None and node != self._backend.node_id:
                await self._backend.forward(node, client.client_id, envelope)
                self._count(client, "messages_sent")
                return SendResult(
                    SendStatus.SENT, client.client_id, envelope.message_id, f"forwarded to {node}"
                )
            reason = "client not connected"
        except BackendError as exc:
            reason = f"backend unavailable: {exc}"
        self._count(client, "messages_dropped")
        return SendResult(SendStatus.DROPPED, client.client_id, envelope.message_id, reason)

    def _frame(self, client: ClientSession, envelope: Envelope) -> str | bytes:
        if not client.v1:
            return envelope.data
        data_json = envelope.data_json
        if data_json is None:
            if envelope.enc == "base64":
                assert isinstance(envelope.data, bytes)
                data_json = orjson.dumps(base64.b64encode(envelope.data).decode("ascii"))
            else:
                data_json = orjson.dumps(envelope.data)
            envelope.data_json = data_json
        return protocol.encode_msg(
            envelope.seq if envelope.critical else None,
            envelope.message_id,
            data_json,
            enc=envelope.enc,
        )

    async def _transmit(self, client: ClientSession, frame: str | bytes) -> int:
        """Write one frame (lock held). Failures are charged to the breaker; a closed or
        stalled connection is detached."""
        outcome = self._write_now(client, frame)
        if outcome == _PENDING:
            outcome = await self._write_awaited(client, frame)
        return outcome

    def _write_now(self, client: ClientSession, frame: str | bytes) -> int:
        """The synchronous write path (lock held): `_OK` when the transport's `try_send`
        took the frame, `_PENDING` when the write must be awaited (no `try_send`, or the
        socket cannot take it now), or the failure. No coroutine, no timer."""
        fast = client.try_send
        if fast is None:
            return _PENDING
        transport = client.transport
        if transport is None:
            return _CLOSED
        try:
            if not fast(frame):
                return _PENDING
        except Exception as exc:
            return self._write_failed(client, transport, exc)
        client.breaker.record_success()
        return _OK

    async def _write_awaited(self, client: ClientSession, frame: str | bytes) -> int:
        """The awaited write path (lock held), bounded by `send_timeout`."""
        transport = client.transport
        if transport is None:
            return _CLOSED
        try:
            async with asyncio.timeout(self._send_timeout):
                await transport.send(frame)
        except Exception as exc:
            return self._write_failed(client, transport, exc)
        client.breaker.record_success()
        return _OK

    def _write_failed(self, client: ClientSession, transport: Transport, exc: Exception) -> int:
        """Account a failed write: charge the breaker; detach a closed or stalled connection."""
        if isinstance(exc, TimeoutError):
            client.breaker.record_failure()
            self._count(client, "connections_timeouts")
            self._count(client, "messages_failed")
            self._detach(client, transport, failed=True)
            self._background(self._close_quietly(transport, 1011, "send timeout"))
            return _TIMEOUT
        if isinstance(exc, TransportClosed):
            client.breaker.release()
            self._detach(client, transport, failed=False)
            return _CLOSED
        client.breaker.record_failure()
        self._count(client, "messages_failed")
        log.debug("tether: send to %s failed: %r", client.client_id, exc)
        return _FAILED

    async def _write_head(self, client: ClientSession) -> bool:
        """Write the first unwritten outbox message (lock held; breaker already allowed)."""
        envelope = client.outbox.queue[0]
        is_retry = envelope.attempts > 0
        if is_retry:
            self._count(client, "retry_attempts")
        frame = self._frame(client, envelope) if client.v1 else envelope.data
        outcome = self._write_now(client, frame)
        if outcome == _PENDING:
            outcome = await self._write_awaited(client, frame)
        queue = client.outbox.queue
        if outcome == _OK and not (queue and queue[0] is envelope):
            outcome = _CLOSED  # detached while writing: the message went back to the queue
        if outcome == _OK:
            self._head_written(client, envelope, is_retry=is_retry)
            if not client.v1 and self._backend.durable:  # written = delivered: trim the store
                await self._ack_stored(client, envelope.seq or 0)
            return True
        if is_retry:
            self._count(client, "retry_failures")
        if outcome == _CLOSED:
            return False
        doomed = self._head_failed(client, envelope)
        if doomed is not None:
            await self._dead_letter(client, doomed, "retries exhausted")
        return False

    def _head_written(self, client: ClientSession, envelope: Envelope, *, is_retry: bool) -> None:
        """The head of the queue was written: in flight (tether.v1) or delivered (plain)."""
        if is_retry:
            self._count(client, "retry_successes")
        client.outbox.mark_written(keep=client.v1)
        if client.v1:
            client.highest_written = max(client.highest_written, envelope.seq or 0)
        if not envelope.written_once:
            envelope.written_once = True
            self._counters.messages_sent += 1
            if self.metrics.enabled:
                client.stats.counters.messages_sent += 1
        if not client.v1:
            self._delivered(client, envelope)

    def _head_failed(self, client: ClientSession, envelope: Envelope) -> Envelope | None:
        """A write of the head failed: schedule its retry, or take it out of the queue
        to be dead-lettered (returned) when its retries are used up."""
        envelope.attempts += 1
        if self._retry.exhausted(envelope.attempts):
            return client.outbox.remove_head()
        envelope.next_attempt_at = self.clock.now() + self._retry.delay(envelope.attempts)
        return None

    async def _flush(self, client: ClientSession, *, force: bool) -> int:
        """Write queued messages in order while the connection and breaker allow (lock
        held). `force` ignores backoff (a fresh connection); order is never skipped."""
        written = 0
        queue = client.outbox.queue
        now = self.clock.now()
        while queue and client.transport is not None:
            if not force and queue[0].next_attempt_at > now:
                break
            if not client.breaker.allow():
                break
            if not await self._write_head(client):
                break
            written += 1
        return written

    async def _ack_stored(self, client: ClientSession, seq: int) -> None:
        """Tell a durable backend that everything up to `seq` was delivered."""
        try:
            current = await self._backend.ack(client, seq)
        except BackendError as exc:  # re-sent after a reconnect; counted by the backend
            log.warning(
                "tether: could not record delivery %d of %s: %s", seq, client.client_id, exc
            )
        else:
            if not current and client.transport is not None:
                self._stream_lost(client)

    def _delivered(
        self, client: ClientSession, envelope: Envelope, now: float | None = None
    ) -> None:
        self._counters.messages_delivered += 1
        if self.metrics.enabled:
            client.stats.counters.messages_delivered += 1
            if now is None:
                now = self.clock.now()
            self.metrics.latency.record(now - envelope.created_at)
        if client.drained is not None and not client.outbox:
            client.drained.set()

    async def _dead_letter(self, client: ClientSession, envelope: Envelope, reason: str) -> None:
        self._count(client, "messages_dead_lettered")
        if len(client.dead_letters) == client.dead_letters.maxlen:
            log.warning(
                "tether: dead-letter store of %s full; discarding its oldest entry",
                client.client_id,
            )
        letter = DeadLetter(
            client_id=client.client_id,
            message_id=envelope.message_id,
            seq=envelope.seq,
            attempts=envelope.attempts,
            reason=reason,
            failed_at=self.clock.wall(),
            data=envelope.data,
        )
        client.dead_letters.append(letter)
        try:
            await self._backend.dead_letter(client, letter)
            await self._backend.discard(client, [envelope])
        except BackendError as exc:
            log.warning("tether: could not record dead letter for %s: %s", client.client_id, exc)
        log.warning(
            "tether: message %s to %s dead-lettered after %d attempts (%s)",
            envelope.message_id,
            client.client_id,
            envelope.attempts,
            reason,
        )

    # ------------------------------------------------------------------ tether.v1

    async def ack(self, client_id: str, seq: int) -> int:
        """A tether.v1 client acknowledged every message up to `seq`. Returns how many
        messages that delivered. Raises `protocol.ProtocolError` for an ack beyond what
        was written to the client."""
        client = self._clients.get(client_id)
        if client is None:
            raise protocol.ProtocolError("invalid_ack", f"unknown client {client_id!r}")
        if seq > client.highest_written:
            raise protocol.ProtocolError(
                "invalid_ack",
                f"ack {seq} is beyond the highest seq sent ({client.highest_written})",
            )
        done = client.outbox.ack(seq)
        if seq > client.acked:
            client.acked = seq
        now = self.clock.now()  # one clock read times every message this ack delivers
        for envelope in done:
            self._delivered(client, envelope, now)
        client.last_seen = now
        if done:
            try:
                current = await self._backend.ack(client, seq)
            except BackendError as exc:  # re-sent on resume; the client drops the duplicate
                log.warning("tether: could not record ack %d of %s: %s", seq, client.client_id, exc)
            else:
                if not current:  # the stored stream is no longer the one this ack speaks of
                    self._stream_lost(client)
        return len(done)

    # ------------------------------------------------------------------ cluster events

    async def _on_new_messages(self, client_id: str) -> None:
        """Another node stored critical messages for a client connected here."""
        client = self._clients.get(client_id)
        if client is None or client.transport is None:
            return
        async with client.lock:
            known = client.next_seq - 1
            try:
                stored = await self._backend.load(client, after=known)
            except BackendError as exc:
                log.warning("tether: could not load new messages for %s: %s", client_id, exc)
                return
            if stored is None:
                return
            if client.epoch is not None and (
                stored.epoch != client.epoch or stored.next_seq < client.next_seq
            ):
                # recreated under this connection (keys vanished), or rolled back (a
                # failover lost the last writes, whose numbers may now be reused)
                self._stream_lost(client)
                return
            client.epoch = stored.epoch
            for envelope in stored.envelopes:
                if (envelope.seq or 0) > known:
                    self._mirror(client, envelope)
            client.next_seq = max(client.next_seq, stored.next_seq)
            await self._flush(client, force=False)

    async def _on_forwarded(self, client_id: str, envelope: Envelope) -> None:
        """Another node forwarded a best-effort message for a client connected here."""
        client = self._clients.get(client_id)
        if client is None or client.transport is None:
            return
        async with client.lock:
            await self._send_best_effort(client, envelope)

    async def _on_broadcast(self, envelope: Envelope, group: str | None, origin: str) -> None:
        """A best-effort broadcast published by another node: deliver to our clients."""
        if origin == self._backend.node_id:
            return
        members = await self._backend.members(group) if group is not None else None
        targets = [
            c
            for c in list(self._clients.values())
            if c.transport is not None and (members is None or c.client_id in members)
        ]
        await asyncio.gather(*(self._deliver(c, self._copy(envelope)) for c in targets))

    async def _on_kicked(self, client_id: str, node: str) -> None:
        """The client connected to another node: close our stale connection to it."""
        client = self._clients.get(client_id)
        if client is None:
            return
        if client.transport is not None:
            await self.disconnect(client_id, code=1000, reason=f"moved to node {node}")
        async with client.lock:
            if client.transport is None:  # our copy of its outbox is stale: Redis is the record
                client.outbox.drain()

    # ------------------------------------------------------------------ inbound and groups

    def on_message(self, handler: MessageHandler) -> MessageHandler:
        """Register `async def handler(client_id, data)` for data clients send."""
        self._handlers.append(handler)
        return handler

    async def receive(self, client_id: str, data: Any) -> None:
        """Hand inbound data to every `on_message` handler; a failing handler is logged
        and never breaks the connection or the other handlers."""
        client = self._clients.get(client_id)
        if client is not None:
            self._count(client, "messages_received")
            self._touch(client)
        else:
            self._counters.messages_received += 1
        for handler in self._handlers:
            try:
                await handler(client_id, data)
            except Exception:
                log.exception("tether: on_message handler %r failed for %s", handler, client_id)

    def join(self, client_id: str, group: str) -> None:
        """Add a client to a group (it is tracked from now on, connected or not)."""
        try:
            self._check_client_id(client_id)
            client = self._clients.get(client_id) or self._track(client_id)
        except _Rejected as rejected:
            raise ValueError(rejected.reason) from None
        client.groups.add(group)
        self._groups.setdefault(group, set()).add(client_id)
        if self._backend.shared:
            self._background(self._backend.join(client_id, group))

    def leave(self, client_id: str, group: str) -> None:
        client = self._clients.get(client_id)
        if client is not None:
            client.groups.discard(group)
        members = self._groups.get(group)
        if members is not None:
            members.discard(client_id)
            if not members:
                del self._groups[group]
        if self._backend.shared:
            self._background(self._backend.leave(client_id, group))

    def members(self, group: str) -> frozenset[str]:
        return frozenset(self._groups.get(group, ()))

    def groups(self, client_id: str) -> frozenset[str]:
        client = self._clients.get(client_id)
        return frozenset(client.groups) if client else frozenset()

    # ------------------------------------------------------------------ housekeeping

    async def retry_now(self) -> int:
        """Run one retry cycle now: expire old messages, then deliver due ones for
        connected clients whose breaker allows. Returns how many were written."""
        now = self.clock.now()
        written = 0
        for client in list(self._clients.values()):
            if not client.outbox:
                continue
            async with client.lock:
                await self._expire(client, now)
                if client.transport is not None and client.outbox.queue:
                    written += await self._flush(client, force=False)
        return written

    async def _expire(self, client: ClientSession, now: float) -> None:
        expired = client.outbox.expire(now)
        for envelope in expired:
            self._count(client, "messages_expired")
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
                await self._backend.discard(client, expired)
            except BackendError as exc:
                log.warning("tether: could not discard expired messages: %s", exc)

    async def cleanup_now(self) -> int:
        """Evict clients with no connection, nothing pending and no activity for
        `client_ttl`: their state and metrics. Returns how many were evicted."""
        deadline = self.clock.now() - self.config.client_ttl
        stale = [
            cid
            for cid, c in self._clients.items()
            if c.transport is None
            and not c.outbox
            and c.last_seen <= deadline
            and not c.lock.locked()
        ]
        for cid in stale:
            self._evict(cid)
        return len(stale)

    def _evict(self, client_id: str) -> None:
        client = self._clients.pop(client_id)
        self._breaker_counts[client.breaker.state] -= 1
        self._not_closed.discard(client_id)
        for group in client.groups:
            members = self._groups.get(group)
            if members is not None:
                members.discard(client_id)
                if not members:
                    del self._groups[group]
        self.metrics.forget(client_id)

    def _track(self, client_id: str) -> ClientSession:
        if len(self._clients) >= self.config.max_clients:
            raise _Rejected(f"too many clients tracked (max_clients={self.config.max_clients})")
        cfg = self.config
        breaker = CircuitBreaker(
            self._breaker_policy,
            self.clock,
            lambda old, new: self._on_transition(client_id, old, new),
        )
        dedup = None
        if cfg.dedup_mode is not DedupMode.OFF:
            dedup = DedupWindow(cfg.dedup_window, cfg.dedup_max_entries, self.clock)
        client = ClientSession(
            client_id,
            outbox=Outbox(cfg.max_queue_size, cfg.overflow_policy),
            breaker=breaker,
            dedup=dedup,
            stats=self.metrics.client(client_id),
            dead_letter_max=cfg.dead_letter_max_size,
            now=self.clock.now(),
        )
        if not self._backend.shared:  # the session is the record: it names its numbering
            client.epoch = secrets.token_hex(6)
        self._clients[client_id] = client
        self._breaker_counts[CircuitState.CLOSED] += 1
        return client

    def _on_transition(self, client_id: str, old: CircuitState, new: CircuitState) -> None:
        self._breaker_counts[old] -= 1
        self._breaker_counts[new] += 1
        if new is CircuitState.CLOSED:
            self._not_closed.discard(client_id)
        else:
            self._not_closed.add(client_id)
        name = {
            CircuitState.OPEN: "circuit_breaker_opens",
            CircuitState.HALF_OPEN: "circuit_breaker_half_opens",
            CircuitState.CLOSED: "circuit_breaker_closes",
        }[new]
        self._counters.__setattr__(name, getattr(self._counters, name) + 1)
        stats = self.metrics.clients.get(client_id)
        if stats is not None:
            setattr(stats.counters, name, getattr(stats.counters, name) + 1)
        log.info("tether: circuit of %s %s -> %s", client_id, old.value, new.value)

    def _count(self, client: ClientSession, name: str) -> None:
        setattr(self._counters, name, getattr(self._counters, name) + 1)
        if self.metrics.enabled:
            counters = client.stats.counters
            setattr(counters, name, getattr(counters, name) + 1)

    def _touch(self, client: ClientSession) -> None:
        client.last_seen = self.clock.now()  # wall-clock last_activity is derived on read

    @staticmethod
    def _check_client_id(client_id: str) -> None:
        # fullmatch: with `match`, the pattern's `$` also accepts a trailing newline
        if not isinstance(client_id, str) or not CLIENT_ID_PATTERN.fullmatch(client_id):
            raise _Rejected(
                f"invalid client id {client_id!r}: 1-128 characters of A-Z a-z 0-9 . _ : @ -"
            )

    # ------------------------------------------------------------------ shutdown

    async def shutdown(
        self,
        *,
        flush: bool = True,
        close_connections: bool = True,
        timeout: float | None = None,
    ) -> ShutdownStats:
        """Stop gracefully and account for every pending message.

        New sends are REJECTED ("shutting down") from the first moment. Connected
        clients' outboxes are flushed (in tether.v1: until acknowledged) within
        `timeout` (default `shutdown_timeout`); connections are closed with 1001;
        the background loops stop. Each message pending at the start is reported as
        flushed, persisted (durable backends) or dropped — never silently lost.
        """
        if self._shutdown_stats is not None:
            return self._shutdown_stats
        self._closing = True
        started = self.clock.now()
        budget = self.config.shutdown_timeout if timeout is None else timeout
        stored_at_start = await self._stored_pending_total()
        pending_at_start = (
            stored_at_start
            if stored_at_start is not None
            else sum(len(c.outbox) for c in self._clients.values())
        )
        delivered_before = self._counters.messages_delivered
        if flush and pending_at_start:
            connected = [c for c in self._clients.values() if c.transport is not None and c.outbox]
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(budget):
                    await asyncio.gather(*(self._drain(c) for c in connected))
        flushed = self._counters.messages_delivered - delivered_before
        stored_now = await self._stored_pending_total() if stored_at_start is not None else None
        if stored_now is not None:  # what stays in the shared store for this node's clients
            persisted = stored_now
        else:
            remaining = sum(len(c.outbox) for c in self._clients.values())
            persisted = remaining if self._backend.durable and self._backend.healthy else 0
        dropped = max(0, pending_at_start - flushed - persisted)
        if dropped:
            log.warning(
                "tether: shutdown leaves %d undelivered message(s) that the %s backend "
                "cannot keep; they are counted as pending_messages_dropped",
                dropped,
                self._backend.name,
            )
        closed = 0
        if close_connections:
            transports = []
            for client in self._clients.values():
                if client.transport is not None:
                    transport = client.transport
                    self._detach(client, transport, failed=False)
                    transports.append(transport)
            await asyncio.gather(
                *(self._close_quietly(t, 1001, "server shutting down") for t in transports)
            )
            closed = len(transports)
        stopped = 0
        for task in self._tasks:
            if not task.done():
                task.cancel()
                stopped += 1
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for task in list(self._stray):
            task.cancel()
        await asyncio.gather(*self._stray, return_exceptions=True)
        await self._close_channels()
        try:
            await self._backend.close()
        except Exception as exc:
            log.warning("tether: closing the %s backend failed: %r", self._backend.name, exc)
        cleaned = len(self.metrics.clients)
        if close_connections:
            for client in self._clients.values():
                client.outbox.drain()
            self._clients.clear()
            self._groups.clear()
            self.metrics.clients.clear()
        self._stopped = True
        self._shutdown_stats = ShutdownStats(
            pending_messages_flushed=flushed,
            pending_messages_dropped=dropped,
            pending_messages_persisted=persisted,
            connections_closed=closed,
            background_tasks_stopped=stopped,
            metrics_cleaned=cleaned,
            duration_seconds=round(self.clock.now() - started, 6),
        )
        log.info("tether: shutdown complete %s", self._shutdown_stats.to_dict())
        return self._shutdown_stats

    async def _stored_pending_total(self) -> int | None:
        """Messages a shared store holds for the clients this node tracks (None: the
        sessions are the record, or the store cannot say)."""
        if not self._backend.shared:
            return None
        try:
            return await self._backend.pending_counts(list(self._clients))
        except BackendError as exc:
            log.warning("tether: could not count stored messages: %s", exc)
            return None

    async def _drain(self, client: ClientSession) -> None:
        """Deliver everything the client has pending (in tether.v1: until acked)."""
        client.drained = asyncio.Event()
        async with client.lock:
            if client.transport is not None and client.outbox.queue:
                await self._flush(client, force=True)
        if client.v1 and client.outbox and client.transport is not None:
            await client.drained.wait()

    # ================================================================== channels
    # Everything the hub knows of channels is in this block: it delegates to
    # tether.channels.Channels (created on first use), which owns streams, subscribers,
    # fan-out and presence. The transport adapters hand it `subscribe`/`unsubscribe`
    # frames through `channel_frame` and report closed connections.

    @property
    def channels(self) -> Channels:
        """This hub's channels service (created on first use)."""
        service: Channels | None = getattr(self, "_channels_service", None)
        if service is None:
            node_id = self._backend.node_id or self.session_id[:12]
            store = None
            if self._backend.name == "redis":  # channels live where the outboxes do
                from .channels.redis_store import RedisChannelStore

                store = RedisChannelStore(self.config, self.clock, node_id)
            service = Channels(self.config, self.clock, store=store, node_id=node_id)
            self._channels_service = service
        return service

    def _channel_transport(self, client_id: str) -> Transport | None:
        client = self._clients.get(client_id)
        return client.transport if client is not None else None

    async def _channels_ready(self) -> Channels:
        service = self.channels
        await service.start()
        return service

    async def publish(
        self, channel: str, payload: Any, *, message_id: str | None = None
    ) -> PublishResult:
        """Append `payload` to `channel`'s stream once (dedup by id within its history) and
        write it to every subscriber. `PublishResult.status`: PUBLISHED (with `offset` and
        `epoch`), DUPLICATE, REJECTED (with a reason: bad name or payload, shutting down,
        store down) or UNKNOWN (resend with the same `message_id`)."""
        if self._closing:
            return PublishResult(
                str(channel), 0, "", PublishStatus.REJECTED, message_id or "", "shutting down"
            )
        return await (await self._channels_ready()).publish(
            channel, payload, message_id=message_id
        )

    async def history(
        self, channel: str, since: Position | int | None = None, limit: int = 100
    ) -> list[ChannelMessage]:
        """Up to `limit` messages `channel` still holds after `since` (an offset or a
        `Position`), oldest first. Raises ValueError for a bad name or limit."""
        return await (await self._channels_ready()).history(channel, since, limit)

    async def presence(self, channel: str) -> dict[str, dict[str, Any]]:
        """Who is subscribed to `channel`, across every node: {client_id: info}."""
        return await (await self._channels_ready()).presence(channel)

    async def subscribe(
        self, client_id: str, channel: str, *, since: Position | None = None, presence: bool = False
    ) -> bool:
        """Subscribe `client_id`'s connection on this node to `channel` (server-side: no
        `authorize_subscribe` check). The client gets a `subscribed` frame; returns False
        when it is not connected here. Raises ValueError for a bad channel name."""
        transport = self._channel_transport(client_id)
        if transport is None:
            return False
        service = await self._channels_ready()
        with contextlib.suppress(SubscribeRefused):
            await service.subscribe(
                client_id, transport, channel, since, presence=presence, authorize=False
            )
            return True
        return False

    async def unsubscribe(self, client_id: str, channel: str) -> bool:
        """End `client_id`'s subscription to `channel` (an `unsubscribed` frame with reason
        "unsubscribed by the server"). Returns whether it had one on this node."""
        return await self.channels.unsubscribe(
            client_id, channel, reason="unsubscribed by the server", code="server"
        )

    def authorize_subscribe(self, check: Authorizer) -> Authorizer:
        """Register `async def check(client_id, channel) -> bool`: may this client subscribe?
        Every registered check must say yes (none registered: allowed). A refusal is an
        `unsubscribed` frame with code `forbidden`; the connection stays open."""
        return self.channels.authorize_subscribe(check)

    async def channel_frame(
        self,
        client_id: str,
        transport: Transport,
        frame: protocol.Subscribe | protocol.Unsubscribe,
        grants: frozenset[str] | None = None,
    ) -> None:
        """A `subscribe` or `unsubscribe` frame from `client_id`'s connection `transport`;
        `grants`: the channels its credentials allow (None: no limit from them)."""
        service = await self._channels_ready()
        if isinstance(frame, protocol.Unsubscribe):
            await service.unsubscribe(client_id, frame.channel)
            return
        since = None if frame.since is None else Position(frame.since.epoch, frame.since.offset)
        with contextlib.suppress(SubscribeRefused):  # answered with `unsubscribed`
            await service.subscribe(
                client_id, transport, frame.channel, since, presence=frame.presence, grants=grants
            )

    def channel_connection_closed(self, client_id: str, transport: Transport) -> None:
        """The connection `transport` of `client_id` ended: its subscriptions end."""
        service: Channels | None = getattr(self, "_channels_service", None)
        if service is not None:
            service.connection_closed(client_id, transport)

    def _channel_metrics(self) -> dict[str, Any]:
        service: Channels | None = getattr(self, "_channels_service", None)
        if service is None:
            return Channels.idle_metrics()
        return service.to_dict()

    async def _close_channels(self) -> None:
        service: Channels | None = getattr(self, "_channels_service", None)
        if service is not None:
            await service.close()

    # ================================================================== end of channels

    # ------------------------------------------------------------------ helpers

    def _background(self, coroutine: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._stray.add(task)
        task.add_done_callback(self._stray.discard)

    @staticmethod
    async def _close_quietly(transport: Transport, code: int, reason: str) -> None:
        try:
            await transport.close(code, reason)
        except Exception as exc:  # the peer may already be gone
            log.debug("tether: close(%s) failed: %r", code, exc)
