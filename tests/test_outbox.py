"""The outbox on its own: FIFO, bounds, overflow policies, TTL — and a hypothesis state machine."""

from __future__ import annotations

import math

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tether.config import OverflowPolicy
from tether.messages import Envelope
from tether.resilience import Outbox
from tether.resilience.outbox import SeqRuns


def env(seq: int, *, created: float = 0.0, ttl: float = 100.0) -> Envelope:
    return Envelope(
        message_id=f"m{seq}",
        data=f"p{seq}",
        data_json=None,
        critical=True,
        created_at=created,
        expires_at=created + ttl,
        seq=seq,
    )


def test_fifo_and_inflight_order() -> None:
    box = Outbox(10, OverflowPolicy.DROP_OLDEST)
    for i in range(1, 5):
        assert box.push(env(i)).accepted
    box.mark_written(keep=True)
    box.mark_written(keep=True)
    assert [e.seq for e in box] == [1, 2, 3, 4]
    assert [e.seq for e in box.ack(1)] == [1]
    assert box.requeue_inflight() == 1
    assert [e.seq for e in box.queue] == [2, 3, 4]
    assert not box.inflight  # nothing is awaiting an ack on the (gone) connection


def test_overflow_drop_oldest_evicts_from_the_front() -> None:
    box = Outbox(3, OverflowPolicy.DROP_OLDEST)
    for i in range(1, 4):
        box.push(env(i))
    outcome = box.push(env(4))
    assert outcome.accepted and [e.seq for e in outcome.evicted] == [1]
    assert [e.seq for e in box] == [2, 3, 4]


def test_overflow_drop_newest_and_reject_keep_the_queue() -> None:
    for policy in (OverflowPolicy.DROP_NEWEST, OverflowPolicy.REJECT):
        box = Outbox(2, policy)
        box.push(env(1))
        box.push(env(2))
        outcome = box.push(env(3))
        assert not outcome.accepted and not outcome.evicted
        assert [e.seq for e in box] == [1, 2]


def test_expire_removes_only_due_messages_anywhere_in_the_queue() -> None:
    box = Outbox(10, OverflowPolicy.DROP_OLDEST)
    box.push(env(1, ttl=50))
    box.push(env(2, ttl=10))  # a shorter TTL in the middle
    box.push(env(3, ttl=50))
    box.mark_written(keep=True)
    assert box.expire(9.9) == []
    assert [e.seq for e in box.expire(10)] == [2]
    assert [e.seq for e in box] == [1, 3]
    assert [e.seq for e in box.expire(math.inf)] == [1, 3]
    assert len(box) == 0


class OutboxMachine(RuleBasedStateMachine):
    """Random pushes, writes, acks, disconnects and expiries: the outbox stays FIFO and
    bounded, and every message pushed is delivered, pending, or reported with a reason."""

    def __init__(self) -> None:
        super().__init__()
        self.box = Outbox(5, OverflowPolicy.DROP_OLDEST)
        self.now = 0.0
        self.next_seq = 1
        self.pushed: list[int] = []
        self.delivered: list[int] = []
        self.evicted: list[int] = []
        self.expired: list[int] = []
        self.rejected: list[int] = []
        self.v1 = True  # the mode of the current connection
        self.written_here: set[int] = set()  # kept in flight on the current connection

    @rule(ttl=st.floats(min_value=0.5, max_value=20))
    def push(self, ttl: float) -> None:
        seq = self.next_seq
        self.next_seq += 1
        outcome = self.box.push(env(seq, created=self.now, ttl=ttl))
        self.pushed.append(seq)
        self.evicted += [e.seq for e in outcome.evicted if e.seq is not None]
        if not outcome.accepted:
            self.rejected.append(seq)

    @precondition(lambda self: bool(self.box.queue))
    @rule()
    def write(self) -> None:
        envelope = self.box.mark_written(keep=self.v1)
        if not self.v1 and envelope.seq is not None:
            self.delivered.append(envelope.seq)
        elif envelope.seq is not None:
            self.written_here.add(envelope.seq)

    @precondition(lambda self: bool(self.box.inflight))
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        seqs = [e.seq for e in self.box.inflight if e.seq is not None]
        upto = data.draw(st.sampled_from(seqs))
        self.delivered += [e.seq for e in self.box.ack(upto) if e.seq is not None]

    @rule(v1=st.booleans())
    def reconnect(self, v1: bool) -> None:
        self.box.requeue_inflight()
        self.written_here.clear()
        self.v1 = v1

    @rule(dt=st.floats(min_value=0, max_value=8))
    def tick(self, dt: float) -> None:
        self.now += dt
        self.expired += [e.seq for e in self.box.expire(self.now) if e.seq is not None]

    @invariant()
    def bounded(self) -> None:
        assert len(self.box) <= self.box.max_size

    @invariant()
    def fifo(self) -> None:
        seqs = [e.seq for e in self.box]
        assert seqs == sorted(seqs)
        assert all(e.seq in self.written_here for e in self.box.inflight)
        assert not any(e.seq in self.written_here for e in self.box.queue)

    @invariant()
    def every_message_accounted_for(self) -> None:
        pending = [e.seq for e in self.box]
        outcomes = self.delivered + self.evicted + self.expired + self.rejected + pending
        assert sorted(outcomes) == self.pushed  # each exactly once

    @invariant()
    def delivered_in_order(self) -> None:
        assert self.delivered == sorted(self.delivered)


TestOutboxMachine = OutboxMachine.TestCase
TestOutboxMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_seq_runs_count_and_settle_evicted_in_flight_seqs() -> None:
    runs = SeqRuns()
    for seq in (3, 4, 5, 8, 9, 12):
        runs.add(seq)
    assert len(runs) == 6
    with pytest.raises(ValueError):
        runs.add(12)
    assert runs.take_upto(4) == 2 and len(runs) == 4
    assert runs.take_upto(8) == 2 and len(runs) == 2
    assert runs.take_upto(8) == 0
    assert runs.take_all() == 2 and not runs
