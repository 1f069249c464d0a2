"""HubChannels: the hub's wiring to tether.channels (created on first use, closed at shutdown)."""

from __future__ import annotations

import contextlib
from typing import Any

from . import protocol
from .backends import Backend
from .channels import ChannelMessage, Channels, Position, PublishResult, PublishStatus
from .channels.service import Authorizer, SubscribeRefused
from .channels.store import ChannelStore
from .clock import Clock
from .config import HubConfig
from .metrics import HubMetrics
from .registry import ClientRegistry
from .transports.base import Transport


class HubChannels:
    """Owns the hub's `Channels` service: streams, subscribers, fan-out and presence live
    there; this class picks its store (where the outboxes are: Redis, the SQLite file), finds a
    client's connection for server-side subscribes and reports the metrics section."""

    def __init__(
        self,
        config: HubConfig,
        clock: Clock,
        backend: Backend,
        session_id: str,
        registry: ClientRegistry,
        metrics: HubMetrics,
    ) -> None:
        self._config = config
        self._clock = clock
        self._backend = backend
        self._session_id = session_id
        self._registry = registry
        self._service: Channels | None = None
        metrics.add_section("channels", self._metrics, Channels.COUNTERS)

    @property
    def service(self) -> Channels:
        """The channels service (created on first use)."""
        if self._service is None:
            node_id = self._backend.node_id or self._session_id[:12]
            store: ChannelStore | None = None
            if self._backend.name == "redis":  # channels live where the outboxes do
                from .channels.redis_store import RedisChannelStore

                store = RedisChannelStore(self._config, self._clock, node_id)
            elif self._backend.name == "sqlite":  # in the same file, same writer
                from .backends.sqlite import SqliteBackend
                from .channels.sqlite_store import SqliteChannelStore

                if isinstance(self._backend, SqliteBackend):
                    store = SqliteChannelStore(self._config, self._clock, self._backend)
            self._service = Channels(
                self._config, self._clock, store=store, node_id=node_id, current=self._transport
            )
        return self._service

    def _transport(self, client_id: str) -> Transport | None:
        """The client's current connection (None: not connected)."""
        client = self._registry.get(client_id)
        return client.transport if client is not None else None

    async def ready(self) -> Channels:
        service = self.service
        await service.start()
        return service

    async def publish(
        self, channel: str, payload: Any, message_id: str | None, *, closing: bool
    ) -> PublishResult:
        if closing:
            return PublishResult(
                str(channel), 0, "", PublishStatus.REJECTED, message_id or "", "shutting down"
            )
        return await (await self.ready()).publish(channel, payload, message_id=message_id)

    async def history(
        self, channel: str, since: Position | int | None, limit: int
    ) -> list[ChannelMessage]:
        return await (await self.ready()).history(channel, since, limit)

    async def presence(self, channel: str) -> dict[str, dict[str, Any]]:
        return await (await self.ready()).presence(channel)

    async def subscribe(
        self, client_id: str, channel: str, since: Position | None, presence: bool
    ) -> bool:
        client = self._registry.get(client_id)
        transport = client.transport if client is not None else None
        if transport is None:
            return False
        service = await self.ready()
        with contextlib.suppress(SubscribeRefused):
            await service.subscribe(
                client_id, transport, channel, since, presence=presence, authorize=False
            )
            return True
        return False

    async def unsubscribe(self, client_id: str, channel: str) -> bool:
        return await self.service.unsubscribe(
            client_id, channel, reason="unsubscribed by the server", code="server"
        )

    def authorize_subscribe(self, check: Authorizer) -> Authorizer:
        return self.service.authorize_subscribe(check)

    async def frame(
        self,
        client_id: str,
        transport: Transport,
        frame: protocol.Subscribe | protocol.Unsubscribe,
        grants: frozenset[str] | None,
    ) -> None:
        service = await self.ready()
        if service.replaced(client_id, transport):
            return  # a connection a takeover replaced: its late frames are ignored
        if isinstance(frame, protocol.Unsubscribe):
            await service.unsubscribe(client_id, frame.channel, transport=transport)
            return
        since = None if frame.since is None else Position(frame.since.epoch, frame.since.offset)
        with contextlib.suppress(SubscribeRefused):  # answered with `unsubscribed`
            await service.subscribe(
                client_id, transport, frame.channel, since, presence=frame.presence, grants=grants
            )

    async def grants_changed(
        self, client_id: str, transport: Transport, grants: frozenset[str] | None
    ) -> None:
        if self._service is not None:
            await self._service.regrant(client_id, transport, grants)

    def connection_closed(self, client_id: str, transport: Transport) -> None:
        if self._service is not None:
            self._service.connection_closed(client_id, transport)

    async def close(self) -> None:
        if self._service is not None:
            await self._service.close()

    def _metrics(self) -> dict[str, Any]:
        if self._service is None:
            return Channels.idle_metrics()
        return self._service.to_dict()
