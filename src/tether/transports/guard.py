"""ConnectionGuard: bounds, per server, the TCP connections that have not finished their handshake.

Both adapters use it (`tether.monitoring.protocols` for uvicorn, `GuardedServerConnection`
for `websockets`): a connection must make its request within `handshake_timeout`, at most
`pending_limit` may be waiting for that at once, and all of them together stay within
`max_total`, a budget under the process's file-descriptor limit. When a limit is reached
the *oldest waiting* connection is dropped to make room, never one already being served,
so a flood of half-open connections cannot lock legitimate clients (or `/health`) out.
"""

from __future__ import annotations

import contextlib
import logging
import resource
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..config import HubConfig

log = logging.getLogger("tether.server")

__all__ = [
    "FD_RESERVE",
    "ConnectionGuard",
    "GuardStats",
    "Waiting",
    "connection_guard",
    "fd_limit",
]

# File descriptors kept out of the connection budget: the listening socket, the event
# loop, logs, a backend's connections, files the app opens.
FD_RESERVE = 64
# Of the connection budget, at most this share may wait for their first request.
PENDING_SHARE = 4


class Waiting(Protocol):
    """A connection the guard can drop while it waits for its request."""

    def drop(self) -> None: ...


@dataclass(slots=True)
class GuardStats:
    """What the guard refused, by reason (running totals)."""

    handshake_timeouts: int = 0  # no request within handshake_timeout
    handshakes_evicted: int = 0  # dropped to make room (pending_limit or the fd budget)
    refused: int = 0  # closed at accept: the fd budget was full of served connections
    accept_errors: int = 0  # accept() failed: out of file descriptors (EMFILE/ENFILE)
    flood_closes: int = 0  # pings/pongs over budget, or a write buffer over its bound

    def to_dict(self) -> dict[str, int]:
        return {
            "handshake_timeouts": self.handshake_timeouts,
            "handshakes_evicted": self.handshakes_evicted,
            "refused": self.refused,
            "accept_errors": self.accept_errors,
            "flood_closes": self.flood_closes,
        }


class ConnectionGuard:
    """Bounds one server's connections: how long and how many may wait for a request,
    and how many there may be at all (`max_total`, below the file-descriptor limit)."""

    def __init__(
        self,
        *,
        handshake_timeout: float = 10.0,
        max_total: int | None = None,
        pending_limit: int | None = None,
    ) -> None:
        if handshake_timeout <= 0:
            raise ValueError("handshake_timeout must be positive")
        self.handshake_timeout = handshake_timeout
        self.max_total = max_total
        self.pending_limit = pending_limit
        self.stats = GuardStats()
        self.open = 0  # connections counted by `opened` / `closed` (the websockets adapter)
        # Connections waiting for their request, oldest first (insertion order).
        self._pending: OrderedDict[Waiting, None] = OrderedDict()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def admit(self, conn: Waiting, open_connections: int) -> bool:
        """Register a new connection (already counted in `open_connections`); False when
        it must be closed at once because every slot holds a served connection."""
        full = self.max_total is not None and open_connections > self.max_total
        if full and not self._evict_oldest():
            self.stats.refused += 1
            return False
        self.wait(conn)
        if self.pending_limit is not None and len(self._pending) > self.pending_limit:
            self._evict_oldest()
        return True

    def wait(self, conn: Waiting) -> None:
        """`conn` waits for a request (again, on keep-alive): it goes to the back."""
        self._pending[conn] = None
        self._pending.move_to_end(conn)

    def done(self, conn: Waiting) -> None:
        """`conn` made its request, or is gone."""
        self._pending.pop(conn, None)

    def timed_out(self, conn: Waiting) -> None:
        """`conn` did not make its request in time: count it and drop it."""
        self._pending.pop(conn, None)
        self.stats.handshake_timeouts += 1
        conn.drop()

    def _evict_oldest(self) -> bool:
        if not self._pending:
            return False
        oldest, _ = self._pending.popitem(last=False)
        self.stats.handshakes_evicted += 1
        oldest.drop()
        return True


def fd_limit(wanted: int | None = None) -> int:
    """This process's file-descriptor limit (`RLIMIT_NOFILE`, soft), first raised towards
    `wanted` (never beyond the hard limit) when it is lower."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if wanted is not None and soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return int(soft) if soft != resource.RLIM_INFINITY else 1 << 20


def connection_guard(config: HubConfig) -> ConnectionGuard:
    """The limits for a server of `config`: `handshake_timeout`, and a connection budget
    under the file-descriptor limit (raised towards what `max_connections` needs). Warns
    when `max_connections` does not fit under it."""
    pending = max(16, config.max_connections // PENDING_SHARE)
    limit = fd_limit(config.max_connections + pending + FD_RESERVE)
    budget = max(16, limit - FD_RESERVE)
    if config.max_connections > budget:
        log.warning(
            "tether: TETHER_MAX_CONNECTIONS=%d does not fit under the file-descriptor limit "
            "(RLIMIT_NOFILE=%d, %d kept in reserve): at most %d connections can be open. "
            "Raise the limit (ulimit -n, LimitNOFILE=) or lower TETHER_MAX_CONNECTIONS.",
            config.max_connections,
            limit,
            FD_RESERVE,
            budget,
        )
    return ConnectionGuard(
        handshake_timeout=config.handshake_timeout,
        max_total=budget,
        pending_limit=max(16, min(pending, budget // PENDING_SHARE)),
    )
