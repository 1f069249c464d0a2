"""The Backend protocol: the storage and cluster operations a hub delegates."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol

from ..messages import DeadLetter, Envelope

if TYPE_CHECKING:
    from ..session import ClientSession


class BackendError(RuntimeError):
    """The backend could not do what was asked (e.g. Redis is unreachable)."""


@dataclass(frozen=True, slots=True)
class Accepted:
    """A critical message is stored; `evicted` are the older messages a full outbox
    (policy drop_oldest) pushed out to make room."""

    seq: int
    evicted: tuple[Envelope, ...] = ()


class Refused(Enum):
    """Why a critical message was not stored."""

    DUPLICATE = "duplicate"  # its dedup key was already accepted for this client
    FULL = "full"  # outbox full under drop_newest / reject


@dataclass(slots=True)
class StoredOutbox:
    """A client's stream as the backend holds it, for a (re)connection."""

    next_seq: int
    acked: int
    envelopes: list[Envelope] = field(default_factory=list)  # unacked, in seq order
    expired: list[Envelope] = field(default_factory=list)  # found past their TTL and removed


@dataclass(slots=True)
class BackendEvents:
    """Callbacks a shared backend uses to hand cluster traffic to its hub."""

    new_messages: Callable[[str], Awaitable[None]]  # critical messages stored for a client here
    forwarded: Callable[[str, Envelope], Awaitable[None]]  # a best-effort message for a client here
    broadcast: Callable[
        [Envelope, str | None, str], Awaitable[None]
    ]  # envelope, group, origin node
    kicked: Callable[[str, str], Awaitable[None]]  # client id, the node that took it over


class Backend(Protocol):
    """What a hub needs from its storage.

    The memory backend keeps nothing of its own: the hub's sessions are the store, so
    every method is trivial and `load` returns None. A shared backend (Redis) is the
    record: `append` stores before `send` returns, `load` rebuilds a session on
    (re)connection, and presence/routing let a client connect to any node.
    """

    name: str
    durable: bool  # survives a restart of the hub process
    shared: bool  # several hub processes use it at once
    node_id: str
    errors: int  # operations that failed, for metrics and /health

    # Optional: `append_now(session, envelope) -> Accepted | Refused`, the same as `append`
    # without suspending, for a backend that stores in process. The hub then fans critical
    # broadcasts out without a task per client; backends without it are awaited.

    async def start(self, events: BackendEvents) -> None: ...

    async def close(self) -> None: ...

    @property
    def healthy(self) -> bool: ...

    # -- critical messages

    async def append(
        self, session: ClientSession, envelope: Envelope, *, local: bool
    ) -> Accepted | Refused:
        """Store a critical message (dedup check, seq, bound, TTL) atomically. With
        `local`, the session's outbox mirrors it too."""
        ...

    async def ack(self, session: ClientSession, seq: int) -> None: ...

    async def discard(self, session: ClientSession, envelopes: list[Envelope]) -> None:
        """Forget messages that left other than by delivery (expired, dead-lettered)."""
        ...

    async def dead_letter(self, session: ClientSession, letter: DeadLetter) -> None: ...

    async def load(self, session: ClientSession, *, after: int = 0) -> StoredOutbox | None:
        """The client's stored stream, or None when the session itself is the record."""
        ...

    async def pending_count(self, client_id: str) -> int | None: ...

    # -- best-effort dedup

    async def seen(self, session: ClientSession, key: str) -> bool: ...

    async def remember(self, session: ClientSession, key: str) -> None: ...

    # -- presence, routing, groups

    async def claim(self, client_id: str) -> None: ...

    async def release(self, client_id: str) -> None: ...

    async def owner(self, client_id: str) -> str | None: ...

    async def notify(self, node: str, client_id: str) -> None: ...

    async def forward(self, node: str, client_id: str, envelope: Envelope) -> None: ...

    async def publish_broadcast(self, envelope: Envelope, group: str | None) -> None: ...

    async def join(self, client_id: str, group: str) -> None: ...

    async def leave(self, client_id: str, group: str) -> None: ...

    async def members(self, group: str | None) -> set[str] | None:
        """Cluster-wide members of `group` (all known clients for None); None when the
        hub's own view is complete (memory)."""
        ...

    def describe(self) -> dict[str, Any]: ...
