"""The in-memory backend: the hub's own sessions are the store; nothing survives a restart."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..messages import DeadLetter, Envelope
from .base import (
    Accepted,
    BackendError,
    BackendEvents,
    Refused,
    SingleNode,
    StoredOutbox,
    StreamState,
)


class MemoryBackend(SingleNode):
    """The default backend for one process: fast, simple, not durable."""

    name = "memory"
    durable = False
    shared = False
    node_id = "local"

    def __init__(self) -> None:
        self.errors = 0

    async def start(self, events: BackendEvents) -> None:
        return None

    async def close(self) -> None:
        return None

    @property
    def healthy(self) -> bool:
        return True

    async def append(
        self, session: StreamState, envelope: Envelope, *, local: bool
    ) -> Accepted | Refused:
        return self.append_now(session, envelope)

    def append_now(self, session: StreamState, envelope: Envelope) -> Accepted | Refused:
        """`append` without suspending: the hub's direct (task-free) fan-out uses it.

        This store *is* the session's outbox: the message is pushed into it and takes
        the session's next seq. The core records the dedup key once it is accepted."""
        key = envelope.dedup_key
        if key is not None and session.dedup is not None and session.dedup.seen(key):
            return Refused.DUPLICATE
        envelope.seq = session.next_seq
        outcome = session.outbox.push(envelope)
        if not outcome.accepted:
            envelope.seq = None
            return Refused.FULL
        session.next_seq += 1
        return Accepted(envelope.seq, tuple(outcome.evicted))

    async def append_many(
        self, items: Sequence[tuple[StreamState, Envelope, bool]]
    ) -> list[Accepted | Refused | BackendError]:
        return [self.append_now(session, envelope) for session, envelope, _ in items]

    async def ack(self, session: StreamState, seq: int) -> bool:
        return True

    async def ack_many(self, acks: Sequence[tuple[StreamState, int]]) -> list[bool]:
        return [True] * len(acks)

    async def attach(
        self, session: StreamState, last_seq: int, epoch: str | None
    ) -> StoredOutbox | None:
        return None

    async def discard(self, session: StreamState, envelopes: list[Envelope]) -> None:
        return None

    async def dead_letter(self, session: StreamState, letter: DeadLetter) -> None:
        return None

    async def load(self, session: StreamState, *, after: int = 0) -> StoredOutbox | None:
        return None

    async def pending_count(self, client_id: str) -> int | None:
        return None

    async def pending_counts(self, client_ids: list[str]) -> int | None:
        return None

    async def seen(self, session: StreamState, key: str) -> bool:
        return session.dedup is not None and session.dedup.seen(key)

    async def remember(self, session: StreamState, key: str) -> None:
        return None  # the core records it in the session's window, which is this store

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "durable": False, "shared": False}
