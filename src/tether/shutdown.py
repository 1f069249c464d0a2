"""Graceful shutdown: flush what can be, close connections, stop tasks, account for the rest."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from .accounting import Accounting
from .backends import Backend, BackendError
from .clock import Clock
from .messages import ShutdownStats
from .pipeline import DeliveryPipeline
from .registry import ClientRegistry
from .tasks import BackgroundTasks, close_quietly

log = logging.getLogger("tether")


class Shutdown:
    """Runs a hub's shutdown once; every message pending at its start is reported as
    flushed, persisted (durable backends) or dropped."""

    __slots__ = ("_acct", "_backend", "_clock", "_pipeline", "_registry", "_tasks")

    def __init__(
        self,
        clock: Clock,
        backend: Backend,
        accounting: Accounting,
        registry: ClientRegistry,
        pipeline: DeliveryPipeline,
        tasks: BackgroundTasks,
    ) -> None:
        self._clock = clock
        self._backend = backend
        self._acct = accounting
        self._registry = registry
        self._pipeline = pipeline
        self._tasks = tasks

    async def run(self, *, flush: bool, close_connections: bool, budget: float) -> ShutdownStats:
        """Flush within `budget` seconds, then close connections (1001) and stop."""
        started = self._clock.now()
        flushed, persisted, dropped = await self._flush(flush, budget)
        closed = await self._close_all() if close_connections else 0
        stopped = await self._tasks.stop()
        try:
            await self._backend.close()
        except Exception as exc:
            log.warning("tether: closing the %s backend failed: %r", self._backend.name, exc)
        cleaned = len(self._registry.metrics.clients)
        if close_connections:
            self._registry.clear()
        stats = ShutdownStats(
            pending_messages_flushed=flushed,
            pending_messages_dropped=dropped,
            pending_messages_persisted=persisted,
            connections_closed=closed,
            background_tasks_stopped=stopped,
            metrics_cleaned=cleaned,
            duration_seconds=round(self._clock.now() - started, 6),
        )
        log.info("tether: shutdown complete %s", stats.to_dict())
        return stats

    async def _flush(self, flush: bool, budget: float) -> tuple[int, int, int]:
        """Deliver what connected clients have pending. Returns (flushed, persisted,
        dropped) of the messages pending at the start."""
        registry = self._registry
        acct = self._acct
        # Before the count, so that a delivery counted meanwhile is counted as flushed.
        delivered_before = acct.delivered_total()
        stored_at_start = await self._stored_pending_total()
        pending_at_start = (
            stored_at_start if stored_at_start is not None else registry.pending_total()
        )
        if flush and pending_at_start:
            connected = [c for c in registry.connected() if c.outbox]
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(budget):
                    await asyncio.gather(*(self._pipeline.drain(c) for c in connected))
        flushed = acct.delivered_total() - delivered_before
        stored_now = await self._stored_pending_total() if stored_at_start is not None else None
        if stored_now is not None:  # what stays in the shared store for this node's clients
            persisted = stored_now
        else:
            remaining = registry.pending_total()
            backend = self._backend
            persisted = remaining if backend.durable and backend.healthy else 0
        dropped = max(0, pending_at_start - flushed - persisted)
        if dropped:
            log.warning(
                "tether: shutdown leaves %d undelivered message(s) that the %s backend "
                "cannot keep; they are counted as pending_messages_dropped",
                dropped,
                self._backend.name,
            )
        return flushed, persisted, dropped

    async def _close_all(self) -> int:
        """Detach and close every connection with 1001. Returns how many."""
        transports = []
        for client in self._registry.connected():
            transport = client.transport
            assert transport is not None
            self._registry.detach(client, transport, failed=False)
            transports.append(transport)
        await asyncio.gather(*(close_quietly(t, 1001, "server shutting down") for t in transports))
        return len(transports)

    async def _stored_pending_total(self) -> int | None:
        """Messages a durable store holds for the clients this node tracks (None: the
        sessions are the record, or the store cannot say)."""
        if not self._backend.durable:
            return None
        try:
            return await self._backend.pending_counts(list(self._registry.sessions))
        except BackendError as exc:
            log.warning("tether: could not count stored messages: %s", exc)
            return None
