"""The Backend protocol: the storage and cluster operations a hub delegates."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from ..messages import DeadLetter, Envelope
from ..resilience import DedupWindow, Outbox


class BackendError(RuntimeError):
    """The backend could not do what was asked (e.g. Redis is unreachable). For a write,
    it was certainly not done: the caller may report REJECTED."""


class OutcomeUnknown(BackendError):
    """A write was sent but its reply never came (a timeout, a connection lost mid-call):
    it may or may not have been stored. Report it as such, never as REJECTED."""


class NotReplicated(OutcomeUnknown):
    """A write is on the master, but not confirmed by the required replicas: a failover
    could still lose it. Not accepted: reported like an unknown outcome."""


class StreamState(Protocol):
    """The part of a client's session (`tether.session.StreamState`) a backend sees.

    The core owns the session: it applies what a backend returns (`Accepted`,
    `StoredOutbox`) and records accepted dedup keys in `dedup`. Backends read these
    fields and write none, with one documented exception: the memory backend's store
    *is* the session's outbox, so its `append_now` pushes into `outbox` and advances
    `next_seq` (the seq it hands out).
    """

    next_seq: int  # the seq the next stored message gets

    @property
    def client_id(self) -> str: ...

    @property
    def epoch(self) -> str | None: ...  # the identity of the numbering the session mirrors

    @property
    def dedup(self) -> DedupWindow | None: ...  # None: dedup is off

    @property
    def outbox(self) -> Outbox: ...


@dataclass(slots=True)
class Accepted:
    """A critical message is stored; `evicted` are the older messages a full outbox
    (policy drop_oldest) pushed out to make room. Read-only by convention (backends share
    instances such as their "direct write" answer); not `frozen` because a frozen
    dataclass costs ~1 us more per construction, once per stored message.

    From a shared backend also: `gap`, messages other nodes stored just before this one
    (to mirror first, keeping FIFO); `changed`, the stream is no longer the epoch the
    node's mirror belongs to (it vanished and was created anew under a connected
    client); `epoch`, the stream's identity now; `holder`, the node holding the
    client's connection per presence, if any (it was rung).
    """

    seq: int
    evicted: tuple[Envelope, ...] = ()
    gap: tuple[Envelope, ...] = ()
    changed: bool = False
    epoch: str | None = None
    holder: str | None = None
    unmirrored: bool = False  # stored by an attempt whose reply was lost: reload to mirror it
    direct: bool = False  # not stored: nothing is held for the client, write it directly
    expired: tuple[Envelope, ...] = ()  # found past their TTL in the store and removed
    # `changed` because the stream was rolled back (a failover lost its last writes): the
    # counter it was found at; its numbers above that may have been reused
    rolled_back_to: int | None = None


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
    epoch: str | None = None  # the stream's identity; None: no stream is stored
    reset: bool = False  # (attach) the stream could not vouch for last_seq: renumbered


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
    every method is trivial and `load` returns None. Backends see a session only as a
    `StreamState`. A shared backend (Redis) is the
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
    # broadcasts out without a task per client; backends without it are awaited. A backend
    # with `append_now` that is neither `durable` nor `shared` is taken to keep its streams
    # in the session's outbox (as memory does): acks are then settled in process and its
    # `ack` is not called.
    #
    # Optional: `record_attempts(session, envelope) -> None`, for a durable store: keep
    # the stored message's failed-delivery count (`envelope.attempts`), not awaited (the
    # store batches it), so that a restart does not start its retry budget again; `load`
    # and `attach` then return it in the envelopes' `attempts`.
    #
    # Optional: `store_slice: int | None`. A critical broadcast's copies go to
    # `append_many` in slices of this many, one event-loop turn apart, so a store a round
    # trip away works on the first slices while the hub builds the others; without it
    # (or None) they go in one call.

    async def start(self, events: BackendEvents) -> None: ...

    async def close(self) -> None: ...

    @property
    def healthy(self) -> bool: ...

    # -- critical messages

    async def append(
        self, session: StreamState, envelope: Envelope, *, local: bool
    ) -> Accepted | Refused:
        """Store a critical message (dedup check, seq, bound, TTL) atomically. With
        `local`, the session's outbox mirrors it too."""
        ...

    async def append_many(
        self, items: Sequence[tuple[StreamState, Envelope, bool]]
    ) -> list[Accepted | Refused | BackendError]:
        """`append` for many clients at once (a critical broadcast): (session, envelope,
        local) each, one outcome each, in order. Envelopes that share their data object
        share one stored payload in transit."""
        ...

    async def ack(self, session: StreamState, seq: int) -> bool:
        """Record delivery up to `seq`. False when the stored stream is no longer the
        epoch the session speaks of (then nothing was trimmed)."""
        ...

    async def ack_many(self, acks: Sequence[tuple[StreamState, int]]) -> list[bool]:
        """`ack` for many clients in one batch."""
        ...

    async def attach(
        self, session: StreamState, last_seq: int, epoch: str | None
    ) -> StoredOutbox | None:
        """A tether.v1 client resumes from `last_seq` (of `epoch`, when its hello named
        one): settle the stored stream against it and return it; a stream that cannot
        vouch for `last_seq` is renumbered after it (`reset`). None when the session
        itself is the record."""
        ...

    async def discard(self, session: StreamState, envelopes: list[Envelope]) -> None:
        """Forget messages that left other than by delivery (expired, dead-lettered)."""
        ...

    async def dead_letter(self, session: StreamState, letter: DeadLetter) -> None: ...

    async def load(self, session: StreamState, *, after: int = 0) -> StoredOutbox | None:
        """The client's stored stream, or None when the session itself is the record."""
        ...

    async def pending_count(self, client_id: str) -> int | None:
        """Messages stored for the client (cluster view); None when the session is the record."""
        ...

    async def pending_counts(self, client_ids: list[str]) -> int | None:
        """Sum of `pending_count` over many clients in one round trip."""
        ...

    # -- best-effort dedup

    async def seen(self, session: StreamState, key: str) -> bool: ...

    async def remember(self, session: StreamState, key: str) -> None: ...

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


class SingleNode:
    """The routing half of `Backend` for a backend that serves one hub process: nobody
    else holds connections, so presence, doorbells, forwarding and cluster membership
    are all empty (`members` None: the hub's own view is complete)."""

    async def claim(self, client_id: str) -> None:
        return None

    async def release(self, client_id: str) -> None:
        return None

    async def owner(self, client_id: str) -> str | None:
        return None

    async def notify(self, node: str, client_id: str) -> None:
        return None

    async def forward(self, node: str, client_id: str, envelope: Envelope) -> None:
        return None

    async def publish_broadcast(self, envelope: Envelope, group: str | None) -> None:
        return None

    async def join(self, client_id: str, group: str) -> None:
        return None

    async def leave(self, client_id: str, group: str) -> None:
        return None

    async def members(self, group: str | None) -> set[str] | None:
        return None
