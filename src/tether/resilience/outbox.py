"""One client's outbox: bounded, FIFO, TTL'd; unacked in-flight messages stay until acked."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from ..config import OverflowPolicy
from ..messages import Envelope


class SeqRuns:
    """Seqs kept as runs of consecutive numbers, ascending: memory grows with the gaps
    between them, not with their count."""

    __slots__ = ("_count", "_runs")

    def __init__(self) -> None:
        self._runs: deque[list[int]] = deque()  # [first, last], ascending, disjoint
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, seq: int) -> None:
        """Record `seq`, which must be above every seq recorded so far.
        Raises ValueError otherwise."""
        runs = self._runs
        if runs and seq <= runs[-1][1]:
            raise ValueError(f"seq {seq} is not above {runs[-1][1]}")
        if runs and runs[-1][1] == seq - 1:
            runs[-1][1] = seq
        else:
            runs.append([seq, seq])
        self._count += 1

    def take_upto(self, seq: int) -> int:
        """Remove every seq <= `seq`; returns how many there were."""
        runs = self._runs
        taken = 0
        while runs and runs[0][0] <= seq:
            first, last = runs[0]
            if last <= seq:
                runs.popleft()
                taken += last - first + 1
            else:
                runs[0][0] = seq + 1
                taken += seq - first + 1
        self._count -= taken
        return taken

    def take_all(self) -> int:
        """Remove everything; returns how many there were."""
        taken = self._count
        self._runs.clear()
        self._count = 0
        return taken


@dataclass(frozen=True, slots=True)
class PushOutcome:
    """What a push did: whether the new message is in, and what it pushed out."""

    accepted: bool
    evicted: tuple[Envelope, ...] = ()


# The common outcomes, shared: a push (one per critical delivery) allocates nothing else.
_PUSHED = PushOutcome(True)
_REFUSED = PushOutcome(False)


class Outbox:
    """Critical messages for one client, in order.

    Two parts keep order cheap to maintain: `inflight` holds messages written on the
    current tether.v1 connection and awaiting an ack; `queue` holds the ones not yet
    written. Every in-flight message precedes every queued one. A message leaves only
    by `ack` or `mark_written(keep=False)` (delivery), `expire`, overflow eviction or
    `remove_head` (dead-lettering) — each returned to the caller so it can be counted.

    An in-flight message pushed out by overflow was written but not yet acknowledged:
    whether it reached the client is decided later. Its envelope keeps `in_flight` set
    so the caller can tell, and the caller records its seq in `evicted_unacked` until
    an ack (or a resuming hello) covers it — delivered — or the stream moves on without
    it — dropped. Every seq there is below every seq still in the outbox.
    """

    __slots__ = ("_next_expiry", "evicted_unacked", "inflight", "max_size", "policy", "queue")

    def __init__(self, max_size: int, policy: OverflowPolicy) -> None:
        self.max_size = max_size
        self.policy = policy
        self.inflight: deque[Envelope] = deque()
        self.queue: deque[Envelope] = deque()
        self.evicted_unacked = SeqRuns()
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
        inflight, queue = self.inflight, self.queue
        outcome = _PUSHED
        if len(inflight) + len(queue) >= self.max_size:
            if self.policy is not OverflowPolicy.DROP_OLDEST:
                return _REFUSED
            evicted: list[Envelope] = []
            while len(inflight) + len(queue) >= self.max_size:
                evicted.append(inflight.popleft() if inflight else queue.popleft())
            outcome = PushOutcome(True, tuple(evicted))
        queue.append(envelope)
        if envelope.expires_at < self._next_expiry:
            self._next_expiry = envelope.expires_at
        return outcome

    def mark_written(self, *, keep: bool) -> Envelope:
        """The head of `queue` was written: keep it in flight (awaiting an ack) or let it go."""
        envelope = self.queue.popleft()
        if keep:
            envelope.in_flight = True
            self.inflight.append(envelope)
        return envelope

    def ack(self, seq: int) -> list[Envelope]:
        """Remove every in-flight (or queued, after a resume) message with seq <= `seq`."""
        done: list[Envelope] = []
        for part in (self.inflight, self.queue):
            while part and (head_seq := part[0].seq) is not None and head_seq <= seq:
                envelope = part.popleft()
                envelope.in_flight = False
                done.append(envelope)
        return done

    def requeue_inflight(self) -> int:
        """The connection is gone: unacked messages go back to the front, in order."""
        count = len(self.inflight)
        for envelope in self.inflight:
            envelope.in_flight = False
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
