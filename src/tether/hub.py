"""Hub: accepts sends for client ids and gets critical messages delivered, once and in order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

from . import protocol
from .accounting import Accounting
from .backends import Backend, BackendError, backend_for
from .channels import ChannelMessage, Channels, Position, PublishResult
from .channels.service import Authorizer
from .clock import Clock, SystemClock
from .cluster import ClusterEvents
from .config import HubConfig
from .connections import Connections
from .envelopes import EnvelopeFactory, Rejected, explicit_id
from .errors import HubClosedError, HubUnavailable
from .fanout import FanOut, tally
from .hub_channels import HubChannels
from .messages import BroadcastResult, DeadLetter, SendResult, SendStatus, ShutdownStats
from .metrics import HubMetrics
from .pipeline import DeliveryPipeline
from .registry import ClientRegistry
from .resilience import CircuitState, RetryPolicy
from .session import ClientSession
from .shutdown import Shutdown
from .streams import StreamKeeper
from .tasks import BackgroundTasks
from .transports.base import Transport
from .writes import Writer

log = logging.getLogger("tether")

MessageHandler = Callable[[str, Any], Awaitable[None]]


class Hub:
    """Delivers messages to clients by id, through disconnects, failures and restarts.

    Critical messages (`critical=True`) wait in a per-client outbox until delivered
    (written in plain mode, acknowledged in tether.v1), expired or dead-lettered;
    best-effort ones are sent now or dropped with a reason. See `docs/architecture.md`
    for the parts this class wires together.
    """

    def __init__(
        self,
        config: HubConfig | None = None,
        *,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        backend: Backend | None = None,
    ) -> None:
        self.config = cfg = config if config is not None else HubConfig()
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.session_id = uuid.uuid4().hex
        self.metrics = HubMetrics(self.clock, enabled=cfg.metrics_enabled)
        self._backend = backend if backend is not None else backend_for(cfg, self.clock)
        self._retry = RetryPolicy(
            cfg.retry_base_delay, cfg.retry_max_delay, cfg.max_retries, rng or random.Random()
        )
        acct = Accounting(self.metrics)
        self._tasks = tasks = BackgroundTasks(self.clock)
        self._registry = registry = ClientRegistry(
            cfg, self.clock, self.metrics, acct, self._backend, tasks
        )
        self._sessions = registry.sessions  # the hot path of `send` reads it directly
        self._envelopes = EnvelopeFactory(cfg, self.clock, self.session_id[:10])
        writer = Writer(cfg.send_timeout, acct, registry, tasks)
        streams = StreamKeeper(acct, registry, tasks)
        self._pipeline = pipeline = DeliveryPipeline(
            self.clock, self._backend, acct, registry, writer, streams, tasks, self._retry
        )
        self._fanout = FanOut(self._backend, registry, pipeline, tasks)
        self._cluster = cluster = ClusterEvents(
            self._backend, registry, pipeline, streams, self.disconnect
        )
        self._connections = Connections(
            self.session_id, self._backend, acct, registry, pipeline, cluster, tasks
        )
        self._channels = HubChannels(
            cfg, self.clock, self._backend, self.session_id, registry, self.metrics
        )
        self._acct = acct
        self._handlers: list[MessageHandler] = []
        self._started = False
        self._start_lock = asyncio.Lock()
        self._closing = False
        self._shutdown_stats: ShutdownStats | None = None

    @property
    def backend(self) -> Backend:
        return self._backend

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Open the backend and start the retry and cleanup loops. Idempotent;
        `connect`/`send`/`broadcast` call it too. Raises `HubClosedError` after shutdown,
        and the backend's `BackendError` (e.g. `StoreLockedError`) when it cannot be
        opened: the hub then stays not started, and a later call tries again."""
        if self._started:
            return
        async with self._start_lock:  # concurrent first sends open the backend once
            if self._started:
                return
            if self._closing:
                raise HubClosedError("a hub cannot be restarted after shutdown")
            await self._backend.start(self._cluster.events())
            if self._closing:  # shut down meanwhile: no loops that would outlive it
                raise HubClosedError("hub is shutting down")
            self._tasks.every(self.config.retry_interval, self.retry_now, "tether-retry")
            self._tasks.every(self.config.cleanup_interval, self.cleanup_now, "tether-cleanup")
            self._started = True

    async def _started_or_rejected(self) -> None:
        """`start` for a first send: a backend that cannot be opened is `Rejected`."""
        try:
            await self.start()
        except BackendError as exc:
            raise Rejected(f"backend unavailable: {exc}") from None
        except HubClosedError:
            raise Rejected("shutting down") from None

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

    # ------------------------------------------------------------------ connections

    async def connect(
        self, client_id: str, transport: Transport, *, hello: protocol.Hello | None = None
    ) -> protocol.Welcome | None:
        """Attach a connection to `client_id` and deliver its outbox at once, in order.

        A previous connection of the same id is replaced (and closed). With `hello`
        (a tether.v1 connection) the hub answers with a `welcome` frame that says what
        was resumed or lost, then re-sends every unacknowledged message after
        `hello.last_seq`. Returns that `Welcome`, or None in plain mode. Raises
        `HubClosedError` when shutting down, `ValueError` for an invalid id, and
        `HubUnavailable` when the hub cannot take the client now (try again later).
        """
        if self._closing:
            raise HubClosedError("hub is shutting down")
        client = self._tracked(client_id)
        try:
            await self.start()
        except BackendError as exc:
            raise HubUnavailable(f"backend unavailable: {exc}") from None
        return await self._connections.open(client, transport, hello)

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
        client = self._registry.get(client_id)
        if client is None:
            return False
        return await self._connections.close(
            client, transport, code=code, reason=reason, failed=failed
        )

    def is_connected(self, client_id: str) -> bool:
        return self._registry.is_connected(client_id)

    def _tracked(self, client_id: str) -> ClientSession:
        """The session of a client a caller names (tracked from now on). Raises
        `ValueError` for an invalid id, `HubUnavailable` at `max_clients`."""
        try:
            _checked(client_id)
        except Rejected as rejected:
            raise ValueError(rejected.reason) from None
        try:
            return self._registry.get_or_track(client_id)
        except Rejected as rejected:
            raise HubUnavailable(rejected.reason) from None

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
        window), REJECTED (certainly not accepted: unencodable or oversized payload,
        invalid client id, full outbox under the `reject` policy, the store unreachable, or
        the hub is shutting down) and, on a shared store, UNKNOWN (the store's reply never
        came: resend with the result's `message_id`), each with a `reason`.
        """
        try:
            if self._closing:
                raise Rejected("shutting down")
            # A tracked id was validated when it was first tracked.
            client = self._sessions.get(client_id) if isinstance(client_id, str) else None
            if client is None:
                _checked(client_id)
            envelope = self._envelopes.prepare(payload, critical, message_id, ttl)
            if not self._started:
                await self._started_or_rejected()
            if client is None:
                client = self._registry.get_or_track(client_id)
        except Rejected as rejected:
            self._acct.rejected_untracked()
            return SendResult(
                SendStatus.REJECTED,
                client_id,
                explicit_id(payload, message_id) or self._envelopes.new_id(),
                rejected.reason,
            )
        pipeline = self._pipeline
        result = pipeline.deliver_now(client, envelope)  # best-effort: no lock, task or await
        return result if result is not None else await pipeline.deliver(client, envelope)

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
        fanout = self._fanout
        try:
            if self._closing:
                raise Rejected("shutting down")
            template = self._envelopes.prepare(payload, critical, message_id, ttl)
            if not self._started:
                await self._started_or_rejected()
        except Rejected as rejected:
            targets, more = fanout.targets(
                group, critical=critical, exclude=exclude, closing=self._closing
            )
            if more is not None:
                targets = targets + await more
            self._acct.rejected_untracked(len(targets))
            return BroadcastResult(
                explicit_id(payload, message_id) or self._envelopes.new_id(),
                rejected=len(targets),
                reasons={rejected.reason: len(targets)} if targets else {},
            )
        # `more` (the clients only other nodes know) is a task already asking the store:
        # from here on nothing is awaited before `deliver` awaits it.
        targets, more = fanout.targets(
            group, critical=critical, exclude=exclude, closing=self._closing
        )
        results = await fanout.deliver(targets, template, more)
        await fanout.publish(template, group)
        return tally(template.message_id, results)

    # ------------------------------------------------------------------ tether.v1

    async def ack(self, client_id: str, seq: int) -> int:
        """A tether.v1 client acknowledged every message up to `seq`. Returns how many
        messages that delivered. Raises `protocol.ProtocolError` for an unknown client
        or an ack beyond what was written to the client."""
        client = self._acked_client(client_id, seq)
        done = self._pipeline.acknowledge_now(client, seq)
        return done if done is not None else await self._pipeline.acknowledge(client, seq)

    @property
    def acks_in_process(self) -> bool:
        """Whether `ack_now` settles acks (the backend needs no word of them)."""
        return self._pipeline.acks_in_process

    def ack_now(self, client_id: str, seq: int) -> int | None:
        """`ack` without suspending, for adapters that handle acks as they arrive: how
        many messages it delivered, or None when the backend must be awaited (then
        nothing was done: call `ack`). Raises like `ack`."""
        return self._pipeline.acknowledge_now(self._acked_client(client_id, seq), seq)

    def _acked_client(self, client_id: str, seq: int) -> ClientSession:
        client = self._registry.get(client_id)
        if client is None:
            raise protocol.ProtocolError("invalid_ack", f"unknown client {client_id!r}")
        protocol.check_ack(seq, client.highest_written)
        return client

    # ------------------------------------------------------------------ inbound and groups

    def on_message(self, handler: MessageHandler) -> MessageHandler:
        """Register `async def handler(client_id, data)` for data clients send."""
        self._handlers.append(handler)
        return handler

    async def receive(self, client_id: str, data: Any) -> None:
        """Hand inbound data to every `on_message` handler; a failing handler is logged
        and never breaks the connection or the other handlers."""
        client = self._registry.get(client_id)
        self._acct.received(client)
        if client is not None:
            self._registry.touch(client)
        for handler in self._handlers:
            try:
                await handler(client_id, data)
            except Exception:
                log.exception("tether: on_message handler %r failed for %s", handler, client_id)

    def join(self, client_id: str, group: str) -> None:
        """Add a client to a group (it is tracked from now on, connected or not). Raises
        `ValueError` for an invalid id, `HubUnavailable` at `max_clients`."""
        self._registry.join(self._tracked(client_id), group)
        if self._backend.shared:
            self._tasks.spawn(self._backend.join(client_id, group))

    def leave(self, client_id: str, group: str) -> None:
        self._registry.leave(client_id, group)
        if self._backend.shared:
            self._tasks.spawn(self._backend.leave(client_id, group))

    def members(self, group: str) -> frozenset[str]:
        return self._registry.members(group)

    def groups(self, client_id: str) -> frozenset[str]:
        return self._registry.groups_of(client_id)

    # ------------------------------------------------------------------ housekeeping

    async def retry_now(self) -> int:
        """Run one retry cycle now: expire old messages, then deliver due ones for
        connected clients whose breaker allows. Returns how many were written."""
        return await self._pipeline.retry(list(self._registry.sessions.values()))

    async def cleanup_now(self) -> int:
        """Evict clients with no connection, nothing pending and no activity for
        `client_ttl`: their state and metrics. Returns how many were evicted."""
        stale = self._registry.stale()
        for cid in stale:
            self._registry.evict(cid)
        await self._expire_stored()
        return len(stale)

    async def _expire_stored(self) -> None:
        """A store that keeps streams no session mirrors (sqlite: clients not seen since a
        restart) deletes their expired rows here and names them, to be counted."""
        expire = getattr(self._backend, "expire_stored", None)
        if expire is None:
            return
        try:
            expired: dict[str, int] = await expire(self._registry.sessions)
        except BackendError as exc:
            log.warning("tether: could not expire stored messages: %s", exc)
            return
        for cid, count in expired.items():
            self._acct.expired_stored(self._registry.get(cid), count)

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
        budget = self.config.shutdown_timeout if timeout is None else timeout
        shutdown = Shutdown(
            self.clock, self._backend, self._acct, self._registry, self._pipeline, self._tasks
        )
        stats = await shutdown.run(flush=flush, close_connections=close_connections, budget=budget)
        await self._channels.close()
        self._shutdown_stats = stats
        return stats

    # ------------------------------------------------------------------ channels
    # Delegates to HubChannels (hub_channels.py), which owns the tether.channels service.

    @property
    def channels(self) -> Channels:
        """This hub's channels service (created on first use)."""
        return self._channels.service

    async def publish(
        self, channel: str, payload: Any, *, message_id: str | None = None
    ) -> PublishResult:
        """Append `payload` to `channel`'s stream once (dedup by id within its history) and
        write it to every subscriber. `PublishResult.status`: PUBLISHED (with `offset` and
        `epoch`), DUPLICATE, REJECTED (with a reason: bad name or payload, shutting down,
        store down) or UNKNOWN (resend with the same `message_id`)."""
        return await self._channels.publish(channel, payload, message_id, closing=self._closing)

    async def history(
        self, channel: str, since: Position | int | None = None, limit: int = 100
    ) -> list[ChannelMessage]:
        """Up to `limit` messages `channel` still holds after `since` (an offset or a
        `Position`), oldest first. Raises ValueError for a bad name or limit."""
        return await self._channels.history(channel, since, limit)

    async def presence(self, channel: str) -> dict[str, dict[str, Any]]:
        """Who is subscribed to `channel`, across every node: {client_id: info}."""
        return await self._channels.presence(channel)

    async def subscribe(
        self, client_id: str, channel: str, *, since: Position | None = None, presence: bool = False
    ) -> bool:
        """Subscribe `client_id`'s connection on this node to `channel` (server-side: no
        `authorize_subscribe` check). The client gets a `subscribed` frame; returns False
        when it is not connected here. Raises ValueError for a bad channel name."""
        return await self._channels.subscribe(client_id, channel, since, presence)

    async def unsubscribe(self, client_id: str, channel: str) -> bool:
        """End `client_id`'s subscription to `channel` (an `unsubscribed` frame with reason
        "unsubscribed by the server"). Returns whether it had one on this node."""
        return await self._channels.unsubscribe(client_id, channel)

    def authorize_subscribe(self, check: Authorizer) -> Authorizer:
        """Register `async def check(client_id, channel) -> bool`: may this client subscribe?
        Every registered check must say yes (none registered: allowed). A refusal is an
        `unsubscribed` frame with code `forbidden`; the connection stays open."""
        return self._channels.authorize_subscribe(check)

    async def channel_frame(
        self,
        client_id: str,
        transport: Transport,
        frame: protocol.Subscribe | protocol.Unsubscribe,
        grants: frozenset[str] | None = None,
    ) -> None:
        """A `subscribe` or `unsubscribe` frame from `client_id`'s connection `transport`;
        `grants`: the channels its credentials allow (None: no limit from them)."""
        await self._channels.frame(client_id, transport, frame, grants)

    async def channel_grants_changed(
        self, client_id: str, transport: Transport, grants: frozenset[str] | None
    ) -> None:
        """The credentials of `client_id`'s connection `transport` were refreshed and
        grant `grants` now: its subscriptions to channels no longer granted end
        (`unsubscribed` code `forbidden`)."""
        await self._channels.grants_changed(client_id, transport, grants)

    def channel_connection_closed(self, client_id: str, transport: Transport) -> None:
        """The connection `transport` of `client_id` ended: its subscriptions end."""
        self._channels.connection_closed(client_id, transport)

    # ------------------------------------------------------------------ read-only views

    def circuit_state(self, client_id: str) -> CircuitState:
        """The client's breaker state; CLOSED for a client the hub does not track."""
        return self._registry.circuit_state(client_id)

    def pending(self, client_id: str) -> int:
        """Messages in the client's outbox: queued, and in tether.v1 also unacked."""
        return self._registry.pending(client_id)

    def dead_letters(self, client_id: str) -> list[DeadLetter]:
        """This hub's dead letters for the client (what this process dead-lettered)."""
        return self._registry.dead_letters(client_id)

    async def stored_pending(self, client_id: str) -> int:
        """The cluster view of `pending`: messages the store holds for the client, whichever
        node accepted them and wherever it is connected (Redis, SQLite). On the memory
        backend, `pending`. Raises `BackendError` when the store cannot be asked."""
        count = await self._backend.pending_count(client_id)
        return count if count is not None else self.pending(client_id)

    async def stored_dead_letters(self, client_id: str) -> list[DeadLetter]:
        """The cluster view of `dead_letters`: every node's dead letters for the client, as
        the store keeps them (newest first). On the memory backend, `dead_letters`.
        Raises `BackendError` when the store cannot be asked."""
        read = getattr(self._backend, "dead_letters", None)
        if read is None:
            return self.dead_letters(client_id)
        return [DeadLetter.from_record(record) for record in await read(client_id)]

    def clients(self) -> list[str]:
        return list(self._registry.sessions)

    def last_activity(self, client_id: str) -> float | None:
        """Wall-clock time of the client's last send, ack, message or (dis)connection."""
        return self._registry.last_activity(client_id)

    def highest_sent(self, client_id: str) -> int:
        """The highest seq a tether.v1 client may acknowledge on its current connection."""
        return self._registry.highest_sent(client_id)

    def clients_in_state(self, state: CircuitState) -> list[str]:
        """Client ids whose breaker is in `state`; O(not-closed clients) for OPEN/HALF_OPEN."""
        return self._registry.in_state(state)

    def client_info(self, client_id: str) -> dict[str, Any] | None:
        """A JSON-safe view of one client: connection, breaker, outbox, counters."""
        return self._registry.client_info(client_id)


def _checked(client_id: str) -> str:
    """`client_id` if it follows the client-id rule; raises `Rejected` otherwise."""
    if not protocol.valid_client_id(client_id):
        raise Rejected(f"invalid client id {client_id!r}: {protocol.CLIENT_ID_RULE}")
    return client_id
