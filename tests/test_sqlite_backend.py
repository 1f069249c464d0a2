"""The SQLite backend through real Hubs: restarts, lazy loading, resume, expiry, full disk, refusals, and `tether serve` processes killed with SIGKILL/SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from test_sqlite_store import fail_at, stop_signal, tmpfs
from tether import Hub, HubConfig, HubUnavailable, SendStatus
from tether.backends import sqlite_store
from tether.backends.sqlite import SqliteBackend
from tether.backends.sqlite_store import (
    MessageKind,
    NewMessage,
    SqliteStore,
    StoreCorruptError,
    StoreLockedError,
)
from tether.client import Client
from tether.clock import ManualClock
from tether.monitoring.health import HealthCheck, HealthThresholds
from tether.protocol import Hello
from tether.testing import MockWebSocket

Factory = Callable[..., Hub]


@pytest_asyncio.fixture
async def node(tmp_path: Path) -> AsyncIterator[Factory]:
    """`node(clock=..., **config)`: a Hub on tmp_path/tether.db (the same file each
    call: a restart is `await old.shutdown()` then `node()` again)."""
    hubs: list[Hub] = []

    def factory(clock: Any = None, backend: Any = None, **values: Any) -> Hub:
        values.setdefault("sqlite_path", str(tmp_path / "tether.db"))
        hub = Hub(HubConfig(backend="sqlite", **values), clock=clock, backend=backend)
        hubs.append(hub)
        return hub

    yield factory
    for hub in hubs:
        await hub.shutdown(timeout=1.0)


def lose_the_file(path: Path) -> None:
    """What an operator who deletes (or loses) the store does."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def grow(directory: Path, size: str) -> None:
    """Free space on a full tmpfs by making it bigger."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(directory)], check=True)


def store_of(hub: Hub) -> Any:
    backend = hub.backend
    assert isinstance(backend, SqliteBackend)
    return backend.store


# ---------------------------------------------------------------------------- in process


async def test_restart_continues_numbering_and_loads_lazily(node: Factory) -> None:
    clock = ManualClock()
    first = node(clock)
    for n in range(5):
        result = await first.send("alice", {"n": n}, critical=True)
        assert result.status is SendStatus.QUEUED and result.seq == n + 1
    for n in range(3):
        await first.send("bob", n, critical=True)
    stats = await first.shutdown()
    assert stats.pending_messages_persisted == 8
    assert stats.pending_messages_dropped == 0

    second = node(clock)
    await second.start()
    assert store_of(second).rows_loaded == 0  # nothing is read at start-up
    result = await second.send("alice", {"n": 5}, critical=True)
    assert result.status is SendStatus.QUEUED and result.seq == 6
    assert store_of(second).rows_loaded == 5  # alice's stream only, on her first send
    ws = MockWebSocket()
    welcome = await second.connect("alice", ws, hello=Hello("alice", 0))
    assert welcome is not None and welcome.lost == 0 and not welcome.reset
    assert ws.seqs() == [1, 2, 3, 4, 5, 6]
    assert ws.data() == [{"n": n} for n in range(6)]
    await second.ack("alice", 6)
    assert await second.backend.pending_count("alice") == 0
    assert await second.backend.pending_count("bob") == 3
    stats = await second.shutdown()
    assert stats.pending_messages_persisted == 3  # bob's, never loaded by this process


async def test_resume_after_restart_reports_exact_losses_and_no_reset(node: Factory) -> None:
    clock = ManualClock()
    first = node(clock)
    ws = MockWebSocket()
    welcome = await first.connect("carl", ws, hello=Hello("carl", 0))
    assert welcome is not None
    epoch = welcome.epoch
    await first.send("carl", "one", critical=True)
    await first.send("carl", "two", critical=True, ttl=5)
    await first.send("carl", "three", critical=True)
    assert ws.seqs() == [1, 2, 3]
    await first.ack("carl", 1)
    await first.shutdown(timeout=0.1)

    clock.advance(10)  # "two" expires while the server is down
    second = node(clock)
    ws2 = MockWebSocket()
    welcome = await second.connect("carl", ws2, hello=Hello("carl", 1, epoch=epoch))
    assert welcome is not None and not welcome.reset
    assert welcome.epoch == epoch
    assert welcome.lost == 1 and welcome.lost_ranges == ((2, 2),)
    assert ws2.seqs() == [3] and ws2.data() == ["three"]
    assert second.metrics.snapshot().to_dict()["messages"]["expired"] == 1
    assert (await second.send("carl", "four", critical=True)).seq == 4


async def test_payload_kinds_survive_a_restart_as_sent(node: Factory) -> None:
    """JSON whose encoding is a JSON string (a datetime, a UUID) stays JSON; text stays text."""
    clock = ManualClock()
    first = node(clock)
    when = datetime.datetime(2026, 12, 3, 7, 30, tzinfo=datetime.UTC)
    ident = uuid.UUID(int=7)
    await first.send("offline", when, critical=True)
    await first.send("offline", ident, critical=True)
    await first.send("offline", {"n": 1}, critical=True)
    await first.send("offline", '"quoted" text', critical=True)
    await first.shutdown(timeout=0.1)

    second = node(clock)
    ws = MockWebSocket()
    await second.connect("offline", ws, hello=Hello("offline", 0))
    assert ws.data() == ["2026-12-03T07:30:00+00:00", str(ident), {"n": 1}, '"quoted" text']


async def test_a_lost_file_is_answered_with_a_reset(node: Factory, tmp_path: Path) -> None:
    first = node()
    ws = MockWebSocket()
    welcome = await first.connect("dora", ws, hello=Hello("dora", 0))
    assert welcome is not None
    await first.send("dora", "a", critical=True)
    await first.send("dora", "b", critical=True)
    await first.shutdown(timeout=0.1)
    lose_the_file(tmp_path / "tether.db")

    second = node()
    await second.send("dora", "after the loss", critical=True)  # stored in a new stream
    ws2 = MockWebSocket()
    resumed = await second.connect("dora", ws2, hello=Hello("dora", 2, epoch=welcome.epoch))
    assert resumed is not None and resumed.reset and resumed.epoch != welcome.epoch
    assert ws2.seqs() == [3] and ws2.data() == ["after the loss"]  # numbered after its 2
    assert (await second.send("dora", "next", critical=True)).seq == 4


async def test_plain_connect_delivers_and_trims_the_file(node: Factory) -> None:
    hub = node()
    payloads: list[Any] = ["héllo \U0001f600", b"\x00\xffbinary", {"id": "x1", "v": [1, 2]}]
    for p in payloads:
        assert (await hub.send("eve", p, critical=True)).status is SendStatus.QUEUED
    ws = MockWebSocket()
    await hub.connect("eve", ws)
    assert ws.sent == ["héllo \U0001f600", b"\x00\xffbinary", '{"id":"x1","v":[1,2]}']
    assert await hub.backend.pending_count("eve") == 0


async def test_a_cancelled_senders_message_loaded_by_a_plain_connect_is_written_once(
    node: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sender cancelled while its commit runs, and its client connecting in plain mode:
    the connect's load (reader connection) sees the committed row before the writer's
    hand-off reaches the loop. The late outcome must not mirror the message again."""
    clock = ManualClock()
    hub = node(clock=clock)
    assert (await hub.send("bob", "one", critical=True)).status is SendStatus.QUEUED
    loop = asyncio.get_running_loop()
    committed, release = asyncio.Event(), asyncio.Event()
    held: list[asyncio.Task[None]] = []
    real = sqlite_store._settle

    def late_settle(outcomes: Any) -> None:  # on the loop, scheduled by the writer thread
        committed.set()

        async def later() -> None:
            await release.wait()
            real(outcomes)

        held.append(loop.create_task(later()))

    monkeypatch.setattr(sqlite_store, "_settle", late_settle)
    sending = asyncio.ensure_future(hub.send("bob", "two", critical=True))
    await committed.wait()  # the row of "two" is committed, its outcome not yet seen
    monkeypatch.setattr(sqlite_store, "_settle", real)
    sending.cancel()  # the producer gives up (a wait_for timeout)
    with contextlib.suppress(asyncio.CancelledError):
        await sending
    ws = MockWebSocket()
    await hub.connect("bob", ws)  # plain mode: loads the file, writes both
    assert ws.sent == ["one", "two"]
    release.set()
    await asyncio.gather(*held)  # now the commit's outcome is mirrored
    clock.advance(5)
    await hub.retry_now()
    assert ws.sent == ["one", "two"]
    assert hub.pending("bob") == 0
    assert hub.metrics.to_dict()["messages"]["delivered"] == 2


async def test_critical_dedup_survives_a_restart(node: Factory) -> None:
    first = node()
    assert (await first.send("fay", "x", critical=True, message_id="m1")).accepted
    await first.shutdown()
    second = node()
    again = await second.send("fay", "x", critical=True, message_id="m1")
    assert again.status is SendStatus.DUPLICATE
    assert await second.backend.pending_count("fay") == 1


async def test_overflow_policy_is_applied_by_the_file(node: Factory) -> None:
    hub = node(max_queue_size=3)
    for n in range(5):
        await hub.send("gus", n, critical=True)
    counters = hub.metrics.snapshot().to_dict()["messages"]
    assert counters["dropped"] == 2
    assert await hub.backend.pending_count("gus") == 3
    ws = MockWebSocket()
    await hub.connect("gus", ws, hello=Hello("gus", 0))
    assert ws.seqs() == [3, 4, 5] and ws.data() == [2, 3, 4]


async def test_cleanup_expires_rows_of_clients_not_loaded_and_counts_them(
    node: Factory,
) -> None:
    clock = ManualClock()
    first = node(clock)
    for n in range(4):
        await first.send("hal", n, critical=True, ttl=5)
    await first.send("hal", "stays", critical=True, ttl=500)
    await first.shutdown()

    clock.advance(6)
    second = node(clock)
    await second.start()
    await second.cleanup_now()  # within the grace period after their deadline: kept
    assert await second.backend.pending_count("hal") == 5
    clock.advance(60)
    await second.cleanup_now()
    assert await second.backend.pending_count("hal") == 1
    assert second.metrics.snapshot().to_dict()["messages"]["expired"] == 4
    ws = MockWebSocket()
    await second.connect("hal", ws)
    assert ws.sent == ["stays"]
    assert second.metrics.snapshot().to_dict()["messages"]["expired"] == 4  # not twice


async def test_an_expiry_pass_overlapping_a_first_send_counts_every_row_once(
    node: Factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file's expiry pass deletes in chunks (one row a transaction here); the first
    send to a client not seen since the restart loads its stream between two chunks.
    Rows deleted before that load are the pass's to count, those the load saw the
    session's: every expired message counted, none twice."""
    clock = ManualClock()
    config = {"sqlite_path": str(tmp_path / "tether.db")}
    first = node(clock)
    for n in range(6):
        await first.send("ivy", n, critical=True, ttl=5)
    await first.shutdown()

    clock.advance(100)  # past their deadline and the file's grace period
    backend = SqliteBackend(
        tmp_path / "tether.db", HubConfig(backend="sqlite", **config), clock=clock, chunk_rows=1
    )
    second = node(clock, backend=backend)
    await second.start()
    store = backend.store
    loop = asyncio.get_running_loop()
    between, loaded = asyncio.Event(), asyncio.Event()
    go = threading.Event()
    steps = 0
    real_touch, real_load = store._touch, store.load

    def touch(conn: Any, *more: Any) -> None:  # the writer thread, at each chunk
        nonlocal steps
        steps += 1
        if steps == 3:  # two chunks committed: hold the third
            loop.call_soon_threadsafe(between.set)
            go.wait(30)
        real_touch(conn, *more)

    async def load(*args: Any, **kwargs: Any) -> Any:
        result = await real_load(*args, **kwargs)
        loaded.set()
        return result

    monkeypatch.setattr(store, "_touch", touch)
    monkeypatch.setattr(store, "load", load)
    cleanup = asyncio.ensure_future(second.cleanup_now())
    try:
        await between.wait()
        sending = asyncio.ensure_future(second.send("ivy", "new", critical=True))
        await loaded.wait()  # its load saw the four rows left
    finally:
        go.set()
    await cleanup
    assert (await sending).status is SendStatus.QUEUED
    await second.retry_now()  # the session expires and counts what it loaded
    await second.cleanup_now()
    assert second.metrics.snapshot().to_dict()["messages"]["expired"] == 6
    assert await second.backend.pending_count("ivy") == 1


async def test_an_expiry_pass_failing_midway_counts_the_rows_its_committed_chunks_deleted(
    node: Factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Six expired rows of a client not seen since the restart, deleted one a
    transaction; the third transaction fails (disk I/O error). The two rows deleted
    before are gone from the file: counted by that pass; the next pass counts the
    others. Six expired, none twice."""
    clock = ManualClock()
    config = {"sqlite_path": str(tmp_path / "tether.db")}
    first = node(clock)
    for n in range(6):
        await first.send("ivy", n, critical=True, ttl=5)
    await first.shutdown()

    clock.advance(100)  # past their deadline and the file's grace period
    backend = SqliteBackend(
        tmp_path / "tether.db", HubConfig(backend="sqlite", **config), clock=clock, chunk_rows=1
    )
    second = node(clock, backend=backend)
    await second.start()
    fail_at(monkeypatch, backend.store, "_touch", 3)  # each chunk of the pass touches first
    await second.cleanup_now()
    assert second.metrics.snapshot().to_dict()["messages"]["expired"] == 2
    assert await backend.pending_count("ivy") == 4
    assert backend.errors == 1  # the failure is still logged and counted
    await second.cleanup_now()
    assert second.metrics.snapshot().to_dict()["messages"]["expired"] == 6
    assert await backend.pending_count("ivy") == 0


async def test_an_expiry_pass_cut_short_by_close_counts_the_rows_it_deleted(
    node: Factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backend closes while its expiry pass is between chunks: the pass returns the
    rows it deleted, to be counted; the rows it did not reach are still in the file and
    counted by the next start's pass. Six expired, none twice."""
    clock = ManualClock()
    config = {"sqlite_path": str(tmp_path / "tether.db")}
    first = node(clock)
    for n in range(6):
        await first.send("ivy", n, critical=True, ttl=5)
    await first.shutdown()

    clock.advance(100)
    backend = SqliteBackend(
        tmp_path / "tether.db", HubConfig(backend="sqlite", **config), clock=clock, chunk_rows=1
    )
    store = await backend.open_store()
    entered, stop_queued = threading.Event(), stop_signal(monkeypatch, store)
    real_touch = store._touch
    calls = 0

    def touch(conn: Any, *more: Any) -> None:  # the writer thread, at each chunk
        nonlocal calls
        calls += 1
        if calls == 3:  # two chunks committed: hold the third until close() has asked
            entered.set()
            stop_queued.wait(30)
        real_touch(conn, *more)

    monkeypatch.setattr(store, "_touch", touch)
    expiring = asyncio.ensure_future(backend.expire_stored({}))
    await asyncio.to_thread(entered.wait, 30)
    await backend.close()
    counted = (await expiring).get("ivy", 0)
    assert 2 < counted < 6
    assert backend.expired == counted

    third = node(clock)
    await third.start()
    assert await third.backend.pending_count("ivy") == 6 - counted
    await third.cleanup_now()
    assert third.metrics.snapshot().to_dict()["messages"]["expired"] == 6 - counted
    assert await third.backend.pending_count("ivy") == 0


def hold_answers(
    monkeypatch: pytest.MonkeyPatch, store: Any, name: str
) -> tuple[asyncio.Event, asyncio.Event]:
    """Hold the answers of `store.<name>` (read or committed at once) until `release` is
    set; `read` is set when one is read."""
    real = getattr(store, name)
    read, release = asyncio.Event(), asyncio.Event()

    async def held(*args: Any, **kwargs: Any) -> Any:
        result = await real(*args, **kwargs)  # the snapshot is taken here
        read.set()
        await release.wait()  # its answer reaches the loop later
        return result

    monkeypatch.setattr(store, name, held)
    return read, release


async def test_a_first_send_whose_load_is_answered_after_an_expiry_pass_counts_once(
    node: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first send to a client not seen since the restart reads its stream; an expiry
    pass then deletes and counts those rows, and only after it ended does the load's
    answer (read before the deletion) reach the loop. The session must not take over
    the rows the pass counted: its retry cycle would count them again."""
    clock = ManualClock()
    first = node(clock)
    for n in range(6):
        await first.send("ivy", n, critical=True, ttl=5)
    await first.send("ivy", "stays", critical=True, ttl=500)
    await first.shutdown()

    clock.advance(100)  # past their deadline and the file's grace period
    second = node(clock)
    await second.start()
    read, release = hold_answers(monkeypatch, store_of(second), "load")
    sending = asyncio.ensure_future(second.send("ivy", "new", critical=True))
    await read.wait()  # the load saw all seven rows
    await second.cleanup_now()  # the pass deletes and counts six
    assert second.metrics.snapshot().to_dict()["messages"]["expired"] == 6
    release.set()
    assert (await sending).status is SendStatus.QUEUED
    await second.retry_now()
    await second.cleanup_now()
    assert second.metrics.snapshot().to_dict()["messages"]["expired"] == 6
    assert await second.backend.pending_count("ivy") == 2
    ws = MockWebSocket()
    await second.connect("ivy", ws)
    assert ws.sent == ["stays", "new"]
    assert second.metrics.snapshot().to_dict()["messages"]["expired"] == 6


async def test_a_resume_answered_after_an_expiry_pass_counts_each_row_once(
    node: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same ordering for a tether.v1 client resuming: its stream is read (on the
    writer) before the pass deletes the expired rows and the answer reaches the loop
    after the pass ended. Rows the pass counted are not counted by the resume."""
    clock = ManualClock()
    first = node(clock)
    for n in range(4):
        await first.send("jon", n, critical=True, ttl=5)
    await first.send("jon", "stays", critical=True, ttl=500)
    await first.shutdown()

    clock.advance(100)
    second = node(clock)
    await second.start()
    read, release = hold_answers(monkeypatch, store_of(second), "resume")
    ws = MockWebSocket()
    connecting = asyncio.ensure_future(second.connect("jon", ws, hello=Hello("jon", 0)))
    await read.wait()
    await second.cleanup_now()
    assert second.metrics.snapshot().to_dict()["messages"]["expired"] == 4
    release.set()
    await connecting
    assert ws.data() == ["stays"]
    await second.retry_now()
    await second.cleanup_now()
    assert second.metrics.snapshot().to_dict()["messages"]["expired"] == 4


async def test_expiry_counts_each_message_once_when_a_session_holds_it(node: Factory) -> None:
    clock = ManualClock()
    hub = node(clock)
    await hub.send("kim", "held by the session", critical=True, ttl=5)
    clock.advance(100)  # past its deadline and the file's grace period
    await hub.cleanup_now()  # the file's expiry pass
    await hub.retry_now()  # the hub's: it expires and counts the session's copy
    await hub.cleanup_now()
    assert await hub.backend.pending_count("kim") == 0
    assert hub.metrics.snapshot().to_dict()["messages"]["expired"] == 1


class HeldWriter:
    """Keeps the hub's SQLite writer busy in a transaction until `release`, and sets
    `submitted` once the hub hands the writer its next appends: their senders then wait
    for a commit that cannot happen before the release (no counting of sleep(0)s)."""

    def __init__(self, hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
        self.store = store_of(hub)
        self.monkeypatch = monkeypatch
        self.submitted = asyncio.Event()
        self._gate = threading.Event()
        self._blocker: asyncio.Future[None] | None = None

    async def __aenter__(self) -> HeldWriter:
        loop = asyncio.get_running_loop()
        running = asyncio.Event()

        def block(conn: Any) -> None:
            loop.call_soon_threadsafe(running.set)
            self._gate.wait(30)  # a hang guard only: release() sets it

        self._blocker = self.store.transact(block)
        await running.wait()
        append_batch = self.store.append_batch

        def submit(*args: Any, **kwargs: Any) -> Any:
            future = append_batch(*args, **kwargs)
            self.submitted.set()
            return future

        self.monkeypatch.setattr(self.store, "append_batch", submit)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._gate.set()
        if self._blocker is not None:
            await self._blocker


async def test_a_send_cancelled_while_its_commit_runs_is_still_delivered(
    node: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = node(ManualClock())
    ws = MockWebSocket()
    await hub.connect("lea", ws, hello=Hello("lea", 0))
    assert (await hub.send("lea", "one", critical=True)).seq == 1
    async with HeldWriter(hub, monkeypatch) as writer:
        sending = asyncio.ensure_future(hub.send("lea", "two", critical=True))
        await writer.submitted.wait()  # the send waits for its commit
        sending.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sending
    assert sending.cancelled()
    third = await hub.send("lea", "three", critical=True)
    assert third.seq == 3
    await hub.retry_now()
    assert ws.seqs() == [1, 2, 3] and ws.data() == ["one", "two", "three"]


async def test_a_cancelled_send_does_not_cancel_the_sends_sharing_its_commit(
    node: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sends of one event-loop turn share one store operation: cancelling one of them
    leaves the others to complete (and the cancelled one is stored all the same)."""
    hub = node(ManualClock())
    for i in range(3):  # streams known: the next sends go straight to their commit
        assert (await hub.send(f"c{i}", "first", critical=True)).seq == 1
    async with HeldWriter(hub, monkeypatch) as writer:
        sends = [asyncio.ensure_future(hub.send(f"c{i}", f"m{i}", critical=True)) for i in range(3)]
        await writer.submitted.wait()  # every send waits for the shared commit
        sends[1].cancel()
    results = await asyncio.gather(*sends, return_exceptions=True)
    assert isinstance(results[1], asyncio.CancelledError)
    for result in (results[0], results[2]):
        assert not isinstance(result, BaseException)
        assert (result.status, result.seq) == (SendStatus.QUEUED, 2)
    assert [await hub.stored_pending(f"c{i}") for i in range(3)] == [2, 2, 2]


class BrokenWallClock(ManualClock):
    """A clock whose wall time turns into NaN: no message can be converted to a row."""

    broken = False

    def wall(self) -> float:
        return float("nan") if self.broken else super().wall()


async def test_a_send_whose_row_cannot_be_made_is_told_and_does_not_hang(node: Factory) -> None:
    clock = BrokenWallClock()
    hub = node(clock)
    assert (await hub.send("ann", "first", critical=True)).seq == 1  # stream known
    clock.broken = True
    # A hang guard only (pytest-timeout would also end it): the sender must be answered.
    outcome = await asyncio.wait_for(
        asyncio.gather(hub.send("ann", "second", critical=True), return_exceptions=True), 10
    )
    clock.broken = False
    result = outcome[0]
    assert isinstance(result, BaseException) or result.status is SendStatus.REJECTED
    assert await hub.stored_pending("ann") == 1  # nothing of the failed turn was stored


async def test_dead_letters_are_kept_in_the_file(node: Factory) -> None:
    clock = ManualClock()
    hub = node(clock, max_retries=1, failure_threshold=100, retry_base_delay=0.1)
    ws = MockWebSocket(failure_rate=1.0)
    await hub.connect("ivy", ws)
    await hub.send("ivy", "poison", critical=True)
    for _ in range(20):
        clock.advance(1)
        await hub.retry_now()
    assert [d.data for d in hub.dead_letters("ivy")] == ["poison"]
    backend = hub.backend
    assert isinstance(backend, SqliteBackend)
    stored = await backend.dead_letters("ivy")
    assert stored[0].data == b"poison" and stored[0].reason == "retries exhausted"
    assert await backend.pending_count("ivy") == 0


async def test_failed_attempts_survive_a_restart_so_the_retry_budget_does_not_start_again(
    node: Factory,
) -> None:
    """A poison message that failed 3 times of a budget of 4 (max_retries=3) before a
    restart is dead-lettered after its one remaining attempt, not after 4 more."""
    clock = ManualClock()
    config: dict[str, Any] = {
        "max_retries": 3,
        "failure_threshold": 100,
        "retry_base_delay": 0.1,
        "retry_max_delay": 0.1,
    }
    first = node(clock, **config)
    ws = MockWebSocket(failure_rate=1.0)
    await first.connect("ivy", ws)
    await first.send("ivy", "poison", critical=True)
    for _ in range(20):
        if ws.failures >= 3:
            break
        clock.advance(1)
        await first.retry_now()
    assert ws.failures == 3 and not first.dead_letters("ivy")
    await first.disconnect("ivy")  # else the shutdown's drain makes one more attempt
    await first.shutdown()

    second = node(clock, **config)
    await second.start()
    ws = MockWebSocket(failure_rate=1.0)
    await second.connect("ivy", ws)
    for _ in range(20):
        if second.dead_letters("ivy"):
            break
        clock.advance(1)
        await second.retry_now()
    assert ws.failures == 1  # the one attempt left of its budget
    assert [d.attempts for d in second.dead_letters("ivy")] == [4]
    assert await second.backend.pending_count("ivy") == 0


@pytest.mark.parametrize("max_retries", [0, 1])  # 0: dead-lettered by the send's own write
async def test_a_dead_letter_that_cannot_be_recorded_is_not_counted_and_stays_queued(
    node: Factory, monkeypatch: pytest.MonkeyPatch, max_retries: int
) -> None:
    """The store refuses the dead letter once (a full disk): the message is not counted
    dead-lettered, stays in the file and the outbox, and its next failed attempt
    dead-letters it (counted once); nothing is delivered again after a reconnect."""
    clock = ManualClock()
    hub = node(clock, max_retries=max_retries, failure_threshold=100, retry_base_delay=0.1)
    ws = MockWebSocket(failure_rate=1.0)
    await hub.connect("ivy", ws)
    store = store_of(hub)
    real = store.dead_letter
    refusals = 0

    async def refuse_once(*args: Any) -> Any:
        nonlocal refusals
        if refusals == 0:
            refusals += 1
            raise sqlite_store.StoreError("database or disk is full")
        return await real(*args)

    monkeypatch.setattr(store, "dead_letter", refuse_once)
    await hub.send("ivy", "poison", critical=True)
    for _ in range(20):
        if refusals:
            break
        clock.advance(1)
        await hub.retry_now()
    assert refusals == 1
    messages = hub.metrics.snapshot().to_dict()["messages"]
    assert messages["dead_lettered"] == 0 and not hub.dead_letters("ivy")
    assert await hub.backend.pending_count("ivy") == 1  # still stored
    for _ in range(20):
        if hub.dead_letters("ivy"):
            break
        clock.advance(1)
        await hub.retry_now()
    assert [d.data for d in hub.dead_letters("ivy")] == ["poison"]
    assert hub.metrics.snapshot().to_dict()["messages"]["dead_lettered"] == 1
    assert await hub.backend.pending_count("ivy") == 0
    await hub.disconnect("ivy")
    again = MockWebSocket()
    await hub.connect("ivy", again)
    assert again.sent == []  # not delivered after being dead-lettered


async def test_a_full_disk_rejects_with_the_reason_and_acknowledges_only_what_is_stored(
    tmp_path: Path,
) -> None:
    with tmpfs(tmp_path / "small", "size=512k") as directory:
        config = HubConfig(backend="sqlite", sqlite_path=str(directory / "tether.db"))
        hub = Hub(config)
        accepted: list[int] = []
        rejected: list[str] = []
        try:
            for n in range(400):
                result = await hub.send("jon", {"n": n, "pad": "x" * 4000}, critical=True)
                if result.status is SendStatus.REJECTED:
                    assert result.reason is not None
                    rejected.append(result.reason)
                    break
                assert result.status is SendStatus.QUEUED
                accepted.append(n)
            assert rejected, "the 512 KiB file system never filled up"
            assert "disk is full" in rejected[0]
            assert hub.metrics.snapshot().to_dict()["messages"]["rejected"] == 1
        finally:
            await hub.shutdown()
        grow(directory, "8m")
        again = Hub(config)
        try:
            ws = MockWebSocket()
            await again.connect("jon", ws, hello=Hello("jon", 0))
            assert [d["n"] for d in ws.data()] == accepted  # every QUEUED one, nothing else
            assert ws.seqs() == list(range(1, len(accepted) + 1))
        finally:
            await again.shutdown(timeout=0.1)


async def test_a_second_hub_on_the_same_file_is_refused(node: Factory, tmp_path: Path) -> None:
    first = node()
    await first.start()
    second = Hub(HubConfig(backend="sqlite", sqlite_path=str(tmp_path / "tether.db")))
    with pytest.raises(StoreLockedError, match="single-node"):
        await second.start()


async def test_a_hub_whose_store_is_locked_at_first_use_rejects_and_starts_later(
    node: Factory, tmp_path: Path
) -> None:
    """The lazy start in send/broadcast/connect: a store that cannot be opened is a
    REJECTED result (HubUnavailable for connect), not an exception, and once the file
    is free the hub starts for real (healthy, loops running, sends queued)."""
    other = await SqliteStore.open(tmp_path / "tether.db")  # another process's hold
    hub = node(clock=ManualClock())
    try:
        result = await hub.send("a", "one", critical=True)
        assert result.status is SendStatus.REJECTED
        assert "in use by another process" in (result.reason or "")
        fanned = await hub.broadcast("all", critical=True)
        assert fanned.rejected == 0 and fanned.queued == 0  # nobody is known yet
        with pytest.raises(HubUnavailable, match="in use by another process"):
            await hub.connect("a", MockWebSocket())
        with pytest.raises(StoreLockedError):
            await hub.start()
        assert not hub.running and not hub.backend.healthy
    finally:
        await other.close()
    result = await hub.send("a", "two", critical=True)
    assert result.status is SendStatus.QUEUED
    assert hub.running and hub.backend.healthy
    assert await hub.stored_pending("a") == 1
    ws = MockWebSocket()
    await hub.connect("a", ws)
    assert ws.sent == ["two"]


async def test_a_shutdown_while_the_first_send_opens_the_store_rejects_that_send(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lazy start of a first send still opening the file when shutdown begins: the
    send is REJECTED ("shutting down"), and no retry/cleanup loop outlives the hub."""
    real_open = SqliteStore.open
    entered, release = asyncio.Event(), asyncio.Event()

    async def gated_open(*args: Any, **kwargs: Any) -> SqliteStore:
        entered.set()
        await release.wait()
        return await real_open(*args, **kwargs)

    monkeypatch.setattr(SqliteStore, "open", gated_open)
    hub = Hub(HubConfig(backend="sqlite", sqlite_path=str(tmp_path / "tether.db")))
    sending = asyncio.ensure_future(hub.send("a", "one", critical=True))
    await entered.wait()  # the first send is opening the store
    stopping = asyncio.ensure_future(hub.shutdown(timeout=1.0))
    await asyncio.sleep(0)  # one turn: the shutdown has begun
    assert hub.closing
    release.set()
    result = await sending
    assert result.status is SendStatus.REJECTED and result.reason == "shutting down"
    await stopping
    assert not hub.running and not hub.backend.healthy
    again = await real_open(tmp_path / "tether.db")  # the store was closed behind it
    await again.close()


async def test_a_close_during_an_open_closes_the_store_so_the_file_can_be_reopened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A channel used before the hub started opens the file; a shutdown meanwhile must
    not leave that store (writer thread, file lock) open behind it."""
    real_open = SqliteStore.open
    entered, release = asyncio.Event(), asyncio.Event()
    opened: list[SqliteStore] = []

    async def gated_open(*args: Any, **kwargs: Any) -> SqliteStore:
        entered.set()
        await release.wait()
        store = await real_open(*args, **kwargs)
        opened.append(store)
        return store

    monkeypatch.setattr(SqliteStore, "open", gated_open)
    path = tmp_path / "tether.db"
    backend = SqliteBackend(path)
    opening = asyncio.ensure_future(backend.open_store())
    await entered.wait()  # the open is under way
    closing = asyncio.ensure_future(backend.close())
    release.set()
    try:
        await closing
        await asyncio.gather(opening, return_exceptions=True)
        monkeypatch.setattr(SqliteStore, "open", real_open)
        again = SqliteBackend(path)
        await again.open_store()  # StoreLockedError if the first store were still open
        await again.close()
    finally:
        for store in opened:
            await store.close()


def test_importing_tether_loads_no_sqlite_module() -> None:
    """Only a hub on the sqlite backend pays for sqlite3 and the store modules."""
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, tether; print(sorted(m for m in sys.modules if 'sqlite' in m))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert loaded == "[]"


# ---------------------------------------------------------------------------- tether serve


class Server:
    """One `tether serve` process on the sqlite backend, on an ephemeral port."""

    def __init__(self, db: Path, logs: Path) -> None:
        self.db = db
        self.logs = logs
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.out = logs / "none.out"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
        env.update(
            TETHER_BACKEND="sqlite",
            TETHER_SQLITE_PATH=str(self.db),
            TETHER_HOST="127.0.0.1",
            TETHER_PORT="0",
            TETHER_RETRY_INTERVAL="0.2",
            TETHER_RETRY_BASE_DELAY="0.1",
            TETHER_RETRY_MAX_DELAY="1",
        )
        return env

    def _spawn(self) -> subprocess.Popen[bytes]:
        self.out = self.logs / f"serve-{time.monotonic_ns()}.out"
        with self.out.open("wb") as sink:
            return subprocess.Popen(
                [sys.executable, "-m", "tether", "serve", "--log-level", "warning"],
                stdout=sink,
                stderr=subprocess.STDOUT,
                env=self.env(),
            )

    def start(self) -> Server:
        self.proc = self._spawn()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = self.output()
            for line in text.splitlines():
                if "listening on" in line:
                    self.port = int(line.split("listening on ", 1)[1].split()[0].rsplit(":", 1)[1])
                    return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"tether serve exited:\n{text}")
            time.sleep(0.05)
        raise RuntimeError(f"tether serve did not start:\n{self.output()}")

    def refused(self) -> tuple[int, str]:
        """Run a server that must refuse to start: its exit code and output."""
        proc = self._spawn()
        return proc.wait(timeout=30), self.output()

    def kill(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def make(db: Path | None = None) -> Server:
        made = Server(db or tmp_path / "tether.db", tmp_path)
        started.append(made)
        return made

    yield make
    for each in started:
        each.kill(signal.SIGKILL)


def client_for(url: str, client_id: str, last_seq: int = 0) -> Client:
    return Client(url, client_id=client_id, last_seq=last_seq, backoff_base=0.05, backoff_max=0.3)


async def receive(client: Client, count: int) -> list[tuple[int | None, Any]]:
    got: list[tuple[int | None, Any]] = []
    async with asyncio.timeout(30):
        async for message in client:
            got.append((message.seq, message.data))
            if len(got) == count:
                break
    return got


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
async def test_300_queued_messages_survive_the_server_process(
    server: Callable[..., Server], sig: int
) -> None:
    first = server().start()
    assert "storage    sqlite file" in first.output()
    async with httpx.AsyncClient(timeout=10) as http:
        for n in range(1, 301):
            body = {"client_id": "olga", "data": n, "critical": True, "message_id": f"m{n}"}
            result = (await http.post(first.http + "/api/send", json=body)).json()
            assert result["status"] == "queued" and result["seq"] == n, result
    first.kill(sig)
    if sig == signal.SIGTERM:
        assert "300 persisted, 0 dropped" in first.output()

    second = server().start()
    losses: list[Any] = []
    client = client_for(second.ws, "olga")
    client.on_lost(losses.append)
    await client.connect()
    try:
        got = await receive(client, 300)
        assert got == [(n, n) for n in range(1, 301)]  # exactly once, in order
        assert client.lost == 0 and losses == [] and client.duplicates == 0
        last = client.last_seq
    finally:
        await client.close()
    assert last == 300
    # The client acks in batches: what it had not acked yet stays in the file, and its
    # resume from last_seq (which it keeps) acknowledges it.
    second.kill(signal.SIGTERM)
    assert " persisted, 0 dropped" in second.output()

    third = server().start()  # resuming where it was: nothing new, nothing lost, no reset
    again = client_for(third.ws, "olga", last_seq=last)
    again.on_lost(losses.append)
    await again.connect()
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            body = {"client_id": "olga", "data": 301, "critical": True}
            result = (await http.post(third.http + "/api/send", json=body)).json()
            assert result["seq"] == 301, result
        assert await receive(again, 1) == [(301, 301)]
        assert losses == [] and again.lost == 0
    finally:
        await again.close()


@pytest.mark.slow
async def test_serve_refuses_unusable_files_clearly(
    server: Callable[..., Server], tmp_path: Path
) -> None:
    code, out = server(tmp_path / "nowhere" / "tether.db").refused()
    assert code == 1 and "does not exist" in out and "Traceback" not in out

    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database, " * 400)
    code, out = server(garbage).refused()
    assert code == 1 and "not a valid database" in out and "Traceback" not in out

    with tmpfs(tmp_path / "ro", "ro,size=64k") as directory:
        code, out = server(directory / "tether.db").refused()
    assert code == 1 and "not writable" in out and "Traceback" not in out

    holder = server().start()
    code, out = server().refused()
    assert code == 1 and "Traceback" not in out
    assert f"in use by another process (pid {holder.proc.pid if holder.proc else '?'})" in out
    assert "TETHER_BACKEND=redis" in out
    # The first server is unaffected.
    async with httpx.AsyncClient(timeout=10) as http:
        body = {"client_id": "pat", "data": 1, "critical": True}
        assert (await http.post(holder.http + "/api/send", json=body)).json()["status"] == "queued"


@pytest.mark.slow
async def test_serve_on_a_full_disk_rejects_sends_with_the_reason(
    server: Callable[..., Server], tmp_path: Path
) -> None:
    with tmpfs(tmp_path / "small", "size=512k") as directory:
        node = server(directory / "tether.db").start()
        accepted: list[int] = []
        async with httpx.AsyncClient(timeout=10) as http:
            for n in range(400):
                body = {"client_id": "quinn", "data": {"n": n, "pad": "x" * 4000}, "critical": True}
                result = (await http.post(node.http + "/api/send", json=body)).json()
                if result["status"] == "rejected":
                    assert "disk is full" in result["reason"], result
                    break
                assert result["status"] == "queued", result
                accepted.append(n)
            else:
                raise AssertionError("the 512 KiB file system never filled up")
        node.kill(signal.SIGKILL)
        grow(directory, "8m")
        again = server(directory / "tether.db").start()
        client = client_for(again.ws, "quinn")
        await client.connect()
        try:
            got = await receive(client, len(accepted))
            assert [data["n"] for _, data in got] == accepted
            assert client.lost == 0
        finally:
            await client.close()
        again.kill(signal.SIGKILL)


async def test_a_store_damaged_deep_inside_is_found_after_open_and_refuses_appends(
    node: Factory, tmp_path: Path
) -> None:
    """8 KiB zeroed in the middle of the file: the header and schema are intact, so the
    open succeeds, and the integrity check run after it finds the damage: the backend is
    unhealthy (/health says why) and critical sends are REJECTED with the reason."""
    path = tmp_path / "tether.db"
    store = await SqliteStore.open(path)
    rows = [
        store.append(
            f"c{n % 7}", NewMessage(f"m{n}", b"x" * 200, MessageKind.TEXT, 0, 2**62), max_size=10**6
        )
        for n in range(3000)
    ]
    await asyncio.gather(*rows)
    assert await store.integrity_checked() is None
    assert store.describe()["integrity"] == "ok"
    await store.close()
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.seek(size // 2)
        f.write(b"\0" * 8192)

    hub = node(clock=ManualClock())
    await hub.start()
    damaged = store_of(hub)
    problem = await damaged.integrity_checked()
    assert problem is not None
    assert damaged.corrupt is not None and "damaged" in damaged.corrupt
    assert damaged.describe()["integrity"] == "damaged"
    assert not hub.backend.healthy
    result = await hub.send("c1", "after", critical=True)
    assert result.status is SendStatus.REJECTED
    assert "damaged" in (result.reason or "")
    reasons = HealthCheck(hub, HealthThresholds()).evaluate()["reasons"]
    assert any("sqlite store damaged" in r for r in reasons)
    with pytest.raises(StoreCorruptError, match="damaged"):
        await damaged.append("c2", NewMessage("z", b"x", MessageKind.TEXT, 0, 2**62), max_size=9)
