"""Cluster events: what other hub nodes tell this one through a shared backend."""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from . import protocol
from .backends import Backend, BackendError, BackendEvents
from .envelopes import copy_for_client
from .messages import Envelope
from .pipeline import DeliveryPipeline
from .registry import ClientRegistry
from .session import ClientSession
from .streams import StreamKeeper
from .transports.base import Transport

log = logging.getLogger("tether")


class DisconnectFn(Protocol):
    """The hub's `disconnect`, as the cluster events call it."""

    async def __call__(
        self,
        client_id: str,
        *,
        transport: Transport | None = None,
        code: int = 1000,
        reason: str = "",
        failed: bool = False,
    ) -> bool: ...


class ClusterEvents:
    """Applies the events of a shared backend to this node's clients, and loads a
    client's stored stream when it connects."""

    __slots__ = ("_backend", "_disconnect", "_pipeline", "_registry", "_streams")

    def __init__(
        self,
        backend: Backend,
        registry: ClientRegistry,
        pipeline: DeliveryPipeline,
        streams: StreamKeeper,
        disconnect: DisconnectFn,
    ) -> None:
        self._backend = backend
        self._registry = registry
        self._pipeline = pipeline
        self._streams = streams
        self._disconnect = disconnect

    def events(self) -> BackendEvents:
        return BackendEvents(
            new_messages=self._pipeline.load_new,
            forwarded=self.on_forwarded,
            broadcast=self.on_broadcast,
            kicked=self.on_kicked,
        )

    async def load_stored(self, client: ClientSession, hello: protocol.Hello | None) -> str | None:
        """With a durable backend the stored stream is the record: adopt it (lock held); a
        tether.v1 hello settles it against the client's position first. Returns why it
        could not be loaded, if it could not."""
        backend = self._backend
        if not backend.durable:
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
        self._streams.adopt(client, stored)
        if stored.reset:
            client.stream_known = False  # resume() answers with a reset, as the store did
        return None

    async def on_forwarded(self, client_id: str, envelope: Envelope) -> None:
        """Another node forwarded a best-effort message for a client connected here."""
        client = self._registry.get(client_id)
        if client is None or not client.connected:
            return
        async with client.lock:
            await self._pipeline.best_effort.send(client, envelope)

    async def on_broadcast(self, envelope: Envelope, group: str | None, origin: str) -> None:
        """A best-effort broadcast published by another node: deliver to our clients."""
        if origin == self._backend.node_id:
            return
        members = await self._backend.members(group) if group is not None else None
        targets = [
            c
            for c in list(self._registry.sessions.values())
            if c.connected and (members is None or c.client_id in members)
        ]
        deliver = self._pipeline.deliver
        await asyncio.gather(*(deliver(c, copy_for_client(envelope)) for c in targets))

    async def on_kicked(self, client_id: str, node: str) -> None:
        """The client connected to another node: close our stale connection to it."""
        client = self._registry.get(client_id)
        if client is None:
            return
        if client.connected:
            await self._disconnect(client_id, code=1000, reason=f"moved to node {node}")
        async with client.lock:
            if not client.connected:  # our copy of its outbox is stale: Redis is the record
                client.outbox.drain()
