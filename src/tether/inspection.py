"""Read-only views of a hub's clients, for applications, the monitoring API and metrics."""

from __future__ import annotations

import itertools
from typing import Any

from .backends import Backend
from .clock import Clock
from .config import HubConfig
from .messages import DeadLetter
from .metrics import Gauges, HubMetrics
from .resilience import CircuitState
from .session import ClientSession


class HubInspection:
    """The inspection half of `Hub`: nothing here changes delivery state."""

    config: HubConfig
    clock: Clock
    metrics: HubMetrics
    _backend: Backend
    _clients: dict[str, ClientSession]
    _not_closed: set[str]
    _breaker_counts: dict[CircuitState, int]
    _active: int

    def circuit_state(self, client_id: str) -> CircuitState:
        """The client's breaker state; CLOSED for a client the hub does not track."""
        client = self._clients.get(client_id)
        return client.breaker.state if client is not None else CircuitState.CLOSED

    def pending(self, client_id: str) -> int:
        """Messages in the client's outbox: queued, and in tether.v1 also unacked."""
        client = self._clients.get(client_id)
        return len(client.outbox) if client is not None else 0

    def dead_letters(self, client_id: str) -> list[DeadLetter]:
        client = self._clients.get(client_id)
        return list(client.dead_letters) if client is not None else []

    def clients(self) -> list[str]:
        return list(self._clients)

    def last_activity(self, client_id: str) -> float | None:
        """Wall-clock time of the client's last send, ack, message or (dis)connection."""
        client = self._clients.get(client_id)
        if client is None:
            return None
        return self.clock.wall() - (self.clock.now() - client.last_seen)

    def highest_sent(self, client_id: str) -> int:
        """The highest seq a tether.v1 client may acknowledge on its current connection."""
        client = self._clients.get(client_id)
        return client.highest_written if client is not None else 0

    def clients_in_state(self, state: CircuitState) -> list[str]:
        """Client ids whose breaker is in `state`; O(not-closed clients) for OPEN/HALF_OPEN."""
        if state is CircuitState.CLOSED:
            return [cid for cid, c in self._clients.items() if c.breaker.state is state]
        return [
            cid
            for cid in list(self._not_closed)
            if (c := self._clients.get(cid)) is not None and c.breaker.state is state
        ]

    def client_info(self, client_id: str) -> dict[str, Any] | None:
        """A JSON-safe view of one client: connection, breaker, outbox, counters."""
        client = self._clients.get(client_id)
        if client is None:
            return None
        now = self.clock.now()
        info = self.metrics.client_dict(client_id)
        oldest = client.outbox.oldest
        info.update(
            client_id=client_id,
            connected=client.transport is not None,
            mode=("tether.v1" if client.v1 else "plain") if client.transport else None,
            connected_at=client.connected_at,
            consecutive_failures=client.breaker.consecutive_failures,
            next_seq=client.next_seq,
            acked=client.acked,
            groups=sorted(client.groups),
            outbox={
                "pending": len(client.outbox),
                "in_flight": len(client.outbox.inflight),
                "queued": len(client.outbox.queue),
                "oldest_age_seconds": round(now - oldest.created_at, 3) if oldest else None,
                "head": [e.to_dict(now) for e in itertools.islice(client.outbox, 20)],
            },
            dead_letters=[d.to_dict() for d in client.dead_letters],
        )
        return info

    def _client_extras(self, client_id: str) -> dict[str, Any]:
        client = self._clients.get(client_id)
        if client is None:
            return {"state": None, "pending": 0, "connected": False, "last_activity": None}
        return {
            "state": client.breaker.state.value,
            "pending": len(client.outbox),
            "connected": client.transport is not None,
            "dead_letters": len(client.dead_letters),
            "last_activity": self.last_activity(client_id),
        }

    def _gauges(self) -> Gauges:
        for cid in list(self._not_closed):  # let lazily-due OPEN → HALF_OPEN moves happen
            client = self._clients.get(cid)
            if client is not None:
                _ = client.breaker.state
        now = self.clock.now()
        pending = 0
        oldest_created: float | None = None
        dead = 0
        for client in self._clients.values():
            size = len(client.outbox)
            if size:
                pending += size
                head = client.outbox.oldest
                if head is not None and (
                    oldest_created is None or head.created_at < oldest_created
                ):
                    oldest_created = head.created_at
            dead += len(client.dead_letters)
        counts = self._breaker_counts
        return Gauges(
            connections_active=self._active,
            queue_current_size=pending,
            queue_max_size=self.config.max_queue_size,
            circuit_closed=counts[CircuitState.CLOSED],
            circuit_open=counts[CircuitState.OPEN],
            circuit_half_open=counts[CircuitState.HALF_OPEN],
            tracked_clients=len(self._clients),
            dead_letters=dead,
            oldest_pending_age=now - oldest_created if oldest_created is not None else 0.0,
            backend_errors=self._backend.errors,
        )
