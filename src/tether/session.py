"""Everything a hub keeps about one client id: connection, outbox, breaker, dedup, seq counters."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from .messages import DeadLetter
from .metrics import ClientStats
from .resilience import CircuitBreaker, DedupWindow, Outbox

if TYPE_CHECKING:
    from .transports.base import Transport


class DeliveryLock(asyncio.Lock):
    """The lock of one client's deliveries, which a fan-out can also take without a
    coroutine (`take_if_free`)."""

    def take_if_free(self) -> bool:
        """Take the lock now if nobody holds it and nobody waits for it — what `acquire`
        does without suspending, without its coroutine (a broadcast takes 1,000 of them
        per message) — and say whether it did. False leaves the lock as it was; `acquire`
        then waits in line. Relies on asyncio's `_waiters` (None or a deque), the state
        `acquire` itself checks; a test holds it to `acquire`'s behaviour. Stricter than
        `acquire` in one case: with only cancelled waiters left it refuses (the caller
        then takes the waiting path, which is always right)."""
        if self.locked() or self._waiters:
            return False
        self._locked = True
        return True


class ClientSession:
    """The per-client state of a hub. Internal, owned by the core: the client registry
    creates, attaches, detaches and evicts it; the delivery pipeline and the stream keeper
    change its outbox and seq counters. Backends see it only as a `backends.StreamState`
    and write none of it, except the memory backend, whose store *is* this outbox.

    `lock` serialises everything that writes to the connection or reorders the outbox,
    so concurrent sends to one client keep their order; different clients never share
    a lock, so a slow client never slows the others.
    """

    __slots__ = (
        "acked",
        "breaker",
        "client_id",
        "connected",
        "connected_at",
        "connections",
        "dead_letters",
        "dedup",
        "drained",
        "epoch",
        "groups",
        "highest_written",
        "last_seen",
        "lock",
        "next_seq",
        "outbox",
        "stats",
        "stream_known",
        "transport",
        "try_send",
        "v1",
    )

    def __init__(
        self,
        client_id: str,
        *,
        outbox: Outbox,
        breaker: CircuitBreaker,
        dedup: DedupWindow | None,
        stats: ClientStats,
        dead_letter_max: int,
        now: float,
    ) -> None:
        self.client_id = client_id
        self.outbox = outbox
        self.breaker = breaker
        self.dedup = dedup
        self.stats = stats
        self.dead_letters: deque[DeadLetter] = deque(maxlen=dead_letter_max)
        self.lock = DeliveryLock()
        self.transport: Transport | None = None
        # `transport is not None`, kept by the registry's attach/detach (the only writers of
        # `transport`); a plain attribute because the fan-out hot loops read it per client.
        self.connected = False
        self.try_send: Callable[[str | bytes], bool] | None = None
        self.v1 = False
        self.next_seq = 1
        self.acked = 0
        # Whether a tether.v1 client (or a durable backend) has seen this numbering: until
        # then, a hello with last_seq > 0 speaks of a stream from before our restart.
        self.stream_known = False
        # The identity of the numbering this session mirrors; a different one in the store
        # (or in a client's hello) means the stream was recreated: never resume over it.
        self.epoch: str | None = None
        self.highest_written = 0
        self.connections = 0
        self.connected_at: float | None = None
        self.last_seen = now
        self.groups: set[str] = set()
        self.drained: asyncio.Event | None = None
