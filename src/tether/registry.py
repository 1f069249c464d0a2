"""The client registry: every tracked session, its groups and breakers, and read-only views."""

from __future__ import annotations

import itertools
import logging
import secrets
from typing import Any

from .accounting import Accounting
from .backends import Backend, BackendError
from .clock import Clock
from .config import DedupMode, HubConfig
from .envelopes import Rejected
from .messages import DeadLetter
from .metrics import Gauges, HubMetrics
from .resilience import BreakerPolicy, CircuitBreaker, CircuitState, DedupWindow, Outbox
from .session import ClientSession
from .tasks import BackgroundTasks
from .transports.base import Transport

log = logging.getLogger("tether")


class ClientRegistry:
    """Owns the sessions: tracks and evicts them, attaches and detaches connections, keeps
    the group index and the per-state breaker counts, and answers read-only questions.

    Nothing here writes to a connection or changes an outbox's order (the delivery
    pipeline does, under the client's lock).
    """

    def __init__(
        self,
        config: HubConfig,
        clock: Clock,
        metrics: HubMetrics,
        accounting: Accounting,
        backend: Backend,
        tasks: BackgroundTasks,
    ) -> None:
        self.config = config
        self.clock = clock
        self.metrics = metrics
        self._acct = accounting
        self._backend = backend
        self._tasks = tasks
        self._breaker_policy = BreakerPolicy(
            config.failure_threshold,
            config.success_threshold,
            config.recovery_timeout,
            config.half_open_max_calls,
        )
        self.sessions: dict[str, ClientSession] = {}
        self.groups: dict[str, set[str]] = {}
        self.active = 0  # attached connections
        self._breaker_counts = dict.fromkeys(CircuitState, 0)
        self._not_closed: set[str] = set()  # clients whose breaker is OPEN or HALF_OPEN
        metrics.bind(self.gauges, self.client_extras)

    # ------------------------------------------------------------------ tracking

    def get(self, client_id: str) -> ClientSession | None:
        return self.sessions.get(client_id)

    def get_or_track(self, client_id: str) -> ClientSession:
        """The client's session, tracked from now on if it was not. Raises `Rejected`
        when `max_clients` are already tracked."""
        return self.sessions.get(client_id) or self.track(client_id)

    def track(self, client_id: str) -> ClientSession:
        """A new session for a (valid) client id. Raises `Rejected` at `max_clients`."""
        cfg = self.config
        if len(self.sessions) >= cfg.max_clients:
            raise Rejected(f"too many clients tracked (max_clients={cfg.max_clients})")
        breaker = CircuitBreaker(
            self._breaker_policy,
            self.clock,
            lambda old, new: self._breaker_moved(client_id, old, new),
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
        self.sessions[client_id] = client
        self._breaker_counts[CircuitState.CLOSED] += 1
        return client

    def _breaker_moved(self, client_id: str, old: CircuitState, new: CircuitState) -> None:
        self._breaker_counts[old] -= 1
        self._breaker_counts[new] += 1
        if new is CircuitState.CLOSED:
            self._not_closed.discard(client_id)
        else:
            self._not_closed.add(client_id)
        self._acct.breaker_moved(client_id, new)
        log.info("tether: circuit of %s %s -> %s", client_id, old.value, new.value)

    def stale(self) -> list[str]:
        """Clients with no connection, nothing pending and no activity for `client_ttl`."""
        deadline = self.clock.now() - self.config.client_ttl
        return [
            cid
            for cid, c in self.sessions.items()
            if not c.connected and not c.outbox and c.last_seen <= deadline and not c.lock.locked()
        ]

    def evict(self, client_id: str) -> None:
        """Forget a client: its session, group memberships and metrics."""
        client = self.sessions.pop(client_id)
        self._forget_evicted(client)
        self._breaker_counts[client.breaker.state] -= 1
        self._not_closed.discard(client_id)
        for group in client.groups:
            self._drop_member(group, client_id)
        self.metrics.forget(client_id)

    def clear(self) -> None:
        """Forget every client (shutdown)."""
        for client in self.sessions.values():
            self._forget_evicted(client)
            client.outbox.drain()
        self.sessions.clear()
        self.groups.clear()
        self.metrics.forget_all()

    def _forget_evicted(self, client: ClientSession) -> None:
        """In-flight messages pushed out of the outbox and never acknowledged: dropped."""
        never = client.outbox.evicted_unacked.take_all()
        if never:
            self._acct.dropped(client, never)

    def touch(self, client: ClientSession) -> None:
        client.last_seen = self.clock.now()  # wall-clock last_activity is derived on read

    # ------------------------------------------------------------------ connections

    def attach(self, client: ClientSession, transport: Transport, *, v1: bool) -> None:
        """Make `transport` the client's connection (lock held; none attached)."""
        client.transport = transport
        client.connected = True
        fast = getattr(transport, "try_send", None)
        # Invariant: try_send is set only while a transport is attached.
        client.try_send = fast if callable(fast) else None
        client.v1 = v1
        client.connected_at = self.clock.wall()
        self.active += 1
        self._acct.connected(client, reconnection=client.connections > 0)
        client.connections += 1
        self.touch(client)

    def detach(self, client: ClientSession, transport: Transport, *, failed: bool) -> None:
        """Forget the connection (lock held): unacked messages go back to the queue front."""
        if client.transport is not transport:
            return
        client.transport = None
        client.connected = False
        client.try_send = None
        client.v1 = False
        client.connected_at = None
        client.highest_written = client.acked
        self.active -= 1
        client.outbox.requeue_inflight()
        if self._backend.shared:
            self._tasks.spawn(self._release(client.client_id))
        if client.drained is not None:
            client.drained.set()
        if failed:
            self._acct.connection_failed(client)
        self.touch(client)

    async def _release(self, client_id: str) -> None:
        if self.is_connected(client_id):  # reconnected meanwhile: presence is ours again
            return
        try:
            await self._backend.release(client_id)
        except BackendError as exc:
            log.debug("tether: presence release of %s failed: %s", client_id, exc)

    def is_connected(self, client_id: str) -> bool:
        client = self.sessions.get(client_id)
        return client is not None and client.connected

    def connected(self) -> list[ClientSession]:
        return [c for c in self.sessions.values() if c.connected]

    # ------------------------------------------------------------------ groups

    def join(self, client: ClientSession, group: str) -> None:
        client.groups.add(group)
        self.groups.setdefault(group, set()).add(client.client_id)

    def leave(self, client_id: str, group: str) -> None:
        client = self.sessions.get(client_id)
        if client is not None:
            client.groups.discard(group)
        self._drop_member(group, client_id)

    def _drop_member(self, group: str, client_id: str) -> None:
        members = self.groups.get(group)
        if members is not None:
            members.discard(client_id)
            if not members:
                del self.groups[group]

    def members(self, group: str) -> frozenset[str]:
        return frozenset(self.groups.get(group, ()))

    def groups_of(self, client_id: str) -> frozenset[str]:
        client = self.sessions.get(client_id)
        return frozenset(client.groups) if client else frozenset()

    # ------------------------------------------------------------------ read-only views

    def circuit_state(self, client_id: str) -> CircuitState:
        client = self.sessions.get(client_id)
        return client.breaker.state if client is not None else CircuitState.CLOSED

    def pending(self, client_id: str) -> int:
        client = self.sessions.get(client_id)
        return len(client.outbox) if client is not None else 0

    def dead_letters(self, client_id: str) -> list[DeadLetter]:
        client = self.sessions.get(client_id)
        return list(client.dead_letters) if client is not None else []

    def last_activity(self, client_id: str) -> float | None:
        client = self.sessions.get(client_id)
        if client is None:
            return None
        return self.clock.wall() - (self.clock.now() - client.last_seen)

    def highest_sent(self, client_id: str) -> int:
        client = self.sessions.get(client_id)
        return client.highest_written if client is not None else 0

    def in_state(self, state: CircuitState) -> list[str]:
        """Client ids whose breaker is in `state`; O(not-closed clients) for OPEN/HALF_OPEN."""
        if state is CircuitState.CLOSED:
            return [cid for cid, c in self.sessions.items() if c.breaker.state is state]
        return [
            cid
            for cid in list(self._not_closed)
            if (c := self.sessions.get(cid)) is not None and c.breaker.state is state
        ]

    def client_info(self, client_id: str) -> dict[str, Any] | None:
        """A JSON-safe view of one client: connection, breaker, outbox, counters."""
        client = self.sessions.get(client_id)
        if client is None:
            return None
        now = self.clock.now()
        info = self.metrics.client_dict(client_id)
        outbox = client.outbox
        oldest = outbox.oldest
        info.update(
            client_id=client_id,
            connected=client.connected,
            mode=("tether.v1" if client.v1 else "plain") if client.connected else None,
            connected_at=client.connected_at,
            consecutive_failures=client.breaker.consecutive_failures,
            next_seq=client.next_seq,
            acked=client.acked,
            groups=sorted(client.groups),
            outbox={
                "pending": len(outbox),
                "in_flight": len(outbox.inflight),
                "queued": len(outbox.queue),
                "oldest_age_seconds": round(now - oldest.created_at, 3) if oldest else None,
                "head": [e.to_dict(now) for e in itertools.islice(outbox, 20)],
            },
            dead_letters=[d.to_dict() for d in client.dead_letters],
        )
        return info

    def client_extras(self, client_id: str) -> dict[str, Any]:
        """The live part of a client's metrics entry."""
        client = self.sessions.get(client_id)
        if client is None:
            return {"state": None, "pending": 0, "connected": False, "last_activity": None}
        return {
            "state": client.breaker.state.value,
            "pending": len(client.outbox),
            "connected": client.connected,
            "dead_letters": len(client.dead_letters),
            "last_activity": self.last_activity(client_id),
        }

    def gauges(self) -> Gauges:
        """The values a metrics snapshot reads rather than counts."""
        for cid in list(self._not_closed):  # let lazily-due OPEN → HALF_OPEN moves happen
            client = self.sessions.get(cid)
            if client is not None:
                _ = client.breaker.state
        pending, oldest_created, dead = self._outbox_totals()
        counts = self._breaker_counts
        return Gauges(
            connections_active=self.active,
            queue_current_size=pending,
            queue_max_size=self.config.max_queue_size,
            circuit_closed=counts[CircuitState.CLOSED],
            circuit_open=counts[CircuitState.OPEN],
            circuit_half_open=counts[CircuitState.HALF_OPEN],
            tracked_clients=len(self.sessions),
            dead_letters=dead,
            oldest_pending_age=(
                self.clock.now() - oldest_created if oldest_created is not None else 0.0
            ),
            backend_errors=self._backend.errors,
        )

    def _outbox_totals(self) -> tuple[int, float | None, int]:
        """(messages pending, creation time of the oldest, dead letters) over all clients."""
        pending = 0
        oldest_created: float | None = None
        dead = 0
        for client in list(self.sessions.values()):
            size = len(client.outbox)
            if size:
                pending += size
                head = client.outbox.oldest
                if head is not None and (
                    oldest_created is None or head.created_at < oldest_created
                ):
                    oldest_created = head.created_at
            dead += len(client.dead_letters)
        return pending, oldest_created, dead

    def pending_total(self) -> int:
        return sum(len(c.outbox) for c in self.sessions.values())
