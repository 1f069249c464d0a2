"""Opening and closing a client's connection: replace, load the stored stream, resume, flush."""

from __future__ import annotations

import logging

from . import protocol
from .accounting import Accounting
from .backends import Backend
from .cluster import ClusterEvents
from .errors import HubUnavailable
from .pipeline import DeliveryPipeline
from .registry import ClientRegistry
from .resume import resume
from .session import ClientSession
from .tasks import BackgroundTasks, close_quietly
from .transports.base import Transport
from .writes import OK

log = logging.getLogger("tether")


class Connections:
    """Attaches connections to sessions and detaches them."""

    __slots__ = ("_acct", "_backend", "_cluster", "_pipeline", "_registry", "_session_id", "_tasks")

    def __init__(
        self,
        session_id: str,
        backend: Backend,
        accounting: Accounting,
        registry: ClientRegistry,
        pipeline: DeliveryPipeline,
        cluster: ClusterEvents,
        tasks: BackgroundTasks,
    ) -> None:
        self._session_id = session_id
        self._backend = backend
        self._acct = accounting
        self._registry = registry
        self._pipeline = pipeline
        self._cluster = cluster
        self._tasks = tasks

    async def open(
        self, client: ClientSession, transport: Transport, hello: protocol.Hello | None
    ) -> protocol.Welcome | None:
        """Make `transport` the client's connection (replacing and closing an older one),
        settle a tether.v1 resume and send its welcome, then flush the outbox. Raises
        `HubUnavailable` when a shared store cannot load a tether.v1 client's stream."""
        registry = self._registry
        async with client.lock:
            old = client.transport
            if old is not None:
                registry.detach(client, old, failed=False)
                self._tasks.close_later(old, 1000, "replaced by a new connection")
            registry.attach(client, transport, v1=hello is not None)
            if hello is None:  # nothing acknowledges what the last tether.v1 connection left
                self._pipeline.settle_evicted(client, 0)
            problem = await self._cluster.load_stored(client, hello)
            if problem is not None and hello is not None:
                # Without the stored stream a resume would be guessed (and reported as a
                # reset): send the client away to retry, here or on another node.
                registry.detach(client, transport, failed=True)
                raise HubUnavailable(f"backend unavailable: {problem}")
            welcome = None
            if hello is not None:
                welcome = await self._resume(client, hello)
                frame = protocol.encode(welcome)
                if await self._pipeline.writer.write(client, frame) is not OK:
                    return welcome
            await self._pipeline.flush(client, force=True)
        return welcome

    async def _resume(self, client: ClientSession, hello: protocol.Hello) -> protocol.Welcome:
        """Settle a tether.v1 client's stream against its hello (lock held): what it
        acknowledged is delivered, what is gone is reported lost."""
        welcome, delivered = resume(client, hello.last_seq, self._session_id, hello.epoch)
        for envelope in delivered:
            self._pipeline.delivered(client, envelope)
        self._pipeline.settle_evicted(client, 0 if welcome.reset else client.acked)
        if welcome.reset:
            self._acct.stream_reset(client)
            log.warning(
                "tether: %s resumed from seq %d of a stream this hub cannot vouch for; "
                "answered with a reset",
                client.client_id,
                hello.last_seq,
            )
        if welcome.lost:
            self._acct.stream_lost(client, welcome.lost)
        if self._backend.durable and hello.last_seq and not welcome.reset:
            await self._pipeline.ack_stored(client, client.acked)  # what the client already has
        return welcome

    async def close(
        self,
        client: ClientSession,
        transport: Transport | None,
        *,
        code: int,
        reason: str,
        failed: bool,
    ) -> bool:
        """Detach the client's connection (only `transport`, when given); closes it with
        `code` when the caller did not name it. Returns whether one was detached."""
        if not client.connected or (transport is not None and client.transport is not transport):
            return False
        async with client.lock:
            current = client.transport
            if current is None or (transport is not None and current is not transport):
                return False
            self._registry.detach(client, current, failed=failed)
        if transport is None:
            await close_quietly(current, code, reason)
        return True
