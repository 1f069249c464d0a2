"""One client's outbox: bounded, FIFO, TTL'd; unacked in-flight messages stay until acked."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..config import OverflowPolicy
from ..messages import Envelope


@dataclass(slots=True)
class PushOutcome:
    """What a push did: whether the new message is in, and what it pushed out."""

    accepted: bool
    evicted: list[Envelope] = field(default_factory=list)


class Outbox:
    """Critical messages for one client, in order.

    Two parts keep order cheap to maintain: `inflight` holds messages written on the
    current tether.v1 connection and awaiting an ack; `queue` holds the ones not yet
    written. Every in-flight message precedes every queued one. A message leaves only
    by `ack` or `mark_written(keep=False)` (delivery), `expire`, overflow eviction or
    `remove_head` (dead-lettering) — each returned to the caller so it can be counted.
    """

    __slots__ = ("_next_expiry", "inflight", "max_size", "policy", "queue")

    def __init__(self, max_size: int, policy: OverflowPolicy) -> None:
        self.max_size = max_size
        self.policy = policy
        self.inflight: deque[Envelope] = deque()
        self.queue: deque[Envelope] = deque()
        self._next_expiry = math.inf

    def __len__(self) -> int:
        return len(self.inflight) + len(self.queue)

    def __iter__(self) -> Iterator[Envelope]:
        yield from self.inflight
        yield from self.queue

    def __bool__(self) -> bool:
        return bool(self.inflight) or bool(self.queue)

    @property
    def oldest(self) -> Envelope | None:
        if self.inflight:
            return self.inflight[0]
        return self.queue[0] if self.queue else None

    def push(self, envelope: Envelope) -> PushOutcome:
        evicted: list[Envelope] = []
        if len(self) >= self.max_size:
            if self.policy is not OverflowPolicy.DROP_OLDEST:
                return PushOutcome(False)
            while len(self) >= self.max_size:
                evicted.append(self.inflight.popleft() if self.inflight else self.queue.popleft())
        self.queue.append(envelope)
        if envelope.expires_at < self._next_expiry:
            self._next_expiry = envelope.expires_at
        return PushOutcome(True, evicted)

    def mark_written(self, *, keep: bool) -> Envelope:
        """The head of `queue` was written: keep it in flight (awaiting an ack) or let it go."""
        envelope = self.queue.popleft()
        if keep:
            self.inflight.append(envelope)
        return envelope

    def ack(self, seq: int) -> list[Envelope]:
        """Remove every in-flight (or queued, after a resume) message with seq <= `seq`."""
        done: list[Envelope] = []
        for part in (self.inflight, self.queue):
            while part and (head_seq := part[0].seq) is not None and head_seq <= seq:
                done.append(part.popleft())
        return done

    def requeue_inflight(self) -> int:
        """The connection is gone: unacked messages go back to the front, in order."""
        count = len(self.inflight)
        self.queue.extendleft(reversed(self.inflight))
        self.inflight.clear()
        return count

    def remove_head(self) -> Envelope:
        """Take the first queued message out (to dead-letter it)."""
        return self.queue.popleft()

    def expire(self, now: float) -> list[Envelope]:
        """Remove messages whose TTL has passed. Scans only when one is known to be due."""
        if now < self._next_expiry:
            return []
        expired: list[Envelope] = []
        next_expiry = math.inf
        for name in ("inflight", "queue"):
            part: deque[Envelope] = getattr(self, name)
            kept: deque[Envelope] = deque()
            for envelope in part:
                if envelope.expires_at <= now:
                    expired.append(envelope)
                else:
                    kept.append(envelope)
                    next_expiry = min(next_expiry, envelope.expires_at)
            setattr(self, name, kept)
        self._next_expiry = next_expiry
        return expired

    def drain(self) -> list[Envelope]:
        """Remove and return everything (shutdown accounting, eviction)."""
        everything = [*self.inflight, *self.queue]
        self.inflight.clear()
        self.queue.clear()
        self._next_expiry = math.inf
        return everything
