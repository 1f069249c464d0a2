"""The embedded SQLite store: restart continuity, SIGKILL durability, refusals, full disk, expiry, lazy load, group commit."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tether.backends import sqlite_store
from tether.backends.base import BackendError
from tether.backends.sqlite_store import (
    Appended,
    DeadLetterRecord,
    ExpiryReport,
    MessageKind,
    NewMessage,
    Refusal,
    SqliteStore,
    StoreClosedError,
    StoreCorruptError,
    StoreError,
    StoreFullError,
    StoreLockedError,
    StoreOpenError,
)
from tether.clock import ManualClock

FAR = 2**62  # an expiry that never comes


def msg(
    message_id: str,
    data: bytes | None = None,
    *,
    kind: MessageKind = MessageKind.TEXT,
    expires_ms: int = FAR,
) -> NewMessage:
    return NewMessage(
        message_id, data if data is not None else message_id.encode(), kind, 1, expires_ms
    )


def appended(result: Appended | Refusal) -> Appended:
    assert isinstance(result, Appended), result
    return result


@contextlib.contextmanager
def tmpfs(where: Path, options: str) -> Iterator[Path]:
    """A real small (or read-only) file system: the tests run as root, as this project's CI does."""
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


# --------------------------------------------------------------------------- restart


@pytest.mark.parametrize("reads_on_writer", [False, True])
async def test_restart_keeps_numbering_pending_messages_and_dedup_keys(
    tmp_path: Path, reads_on_writer: bool
) -> None:
    path = tmp_path / "tether.db"
    store = await SqliteStore.open(path, reads_on_writer=reads_on_writer)
    kinds = [MessageKind.TEXT, MessageKind.JSON, MessageKind.BYTES]
    for n in range(1, 11):
        result = await store.append(
            "alice",
            msg(f"m{n}", f"payload {n}".encode(), kind=kinds[n % 3]),
            max_size=100,
            dedup_key=f"k{n}",
        )
        assert appended(result).seq == n
    assert await store.ack("alice", 3) == 3
    assert await store.record_attempts("alice", {4: 2}) == 1
    before = await store.stream("alice")
    await store.close()

    store = await SqliteStore.open(path, reads_on_writer=reads_on_writer)
    try:
        loaded = await store.load("alice")
        assert loaded is not None
        assert loaded.stream == before
        assert (loaded.stream.next_seq, loaded.stream.acked, loaded.stream.pending) == (11, 3, 7)
        assert [m.seq for m in loaded.messages] == list(range(4, 11))
        assert [m.data for m in loaded.messages] == [f"payload {n}".encode() for n in range(4, 11)]
        assert [m.kind for m in loaded.messages] == [kinds[n % 3] for n in range(4, 11)]
        assert loaded.messages[0].attempts == 2
        # The numbering continues; the dedup keys survived.
        assert appended(await store.append("alice", msg("m11"), max_size=100)).seq == 11
        assert await store.append("alice", msg("again"), max_size=100, dedup_key="k5") is (
            Refusal.DUPLICATE
        )
        assert await store.seen("alice", "k5")
        assert not await store.seen("bob", "k5")
        assert await store.pending_count("alice") == 8
    finally:
        await store.close()


async def test_a_stream_created_anew_gets_a_new_epoch(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "tether.db")
    try:
        first = appended(await store.append("alice", msg("a"), max_size=10))
        assert await store.attach("alice", first.epoch)
        assert (await store.stream("alice")).attached  # type: ignore[union-attr]
        assert appended(await store.append("alice", msg("b"), max_size=10)).epoch == first.epoch

        assert await store.drop_stream("alice") == 2
        assert await store.stream("alice") is None
        assert await store.load("alice") is None
        again = appended(await store.append("alice", msg("c"), max_size=10))
        assert again.seq == 1 and again.epoch != first.epoch
        assert not await store.attach("alice", first.epoch)  # the old identity is gone
        state = await store.stream("alice")
        assert state is not None and not state.attached and state.pending == 1

        opened = await store.open_stream("bob")
        assert (opened.next_seq, opened.acked, opened.pending) == (1, 0, 0)
        assert (await store.open_stream("bob")).epoch == opened.epoch
    finally:
        await store.close()


# --------------------------------------------------------------------------- crash

_PRODUCER = textwrap.dedent(
    """
    import asyncio, sys
    from tether.backends.sqlite_store import MessageKind, NewMessage, SqliteStore

    async def main(path, synchronous):
        store = await SqliteStore.open(path, synchronous=synchronous)
        print("ready", flush=True)

        async def produce(p):
            i = 0
            while True:
                mid = f"p{p}-{i}"
                message = NewMessage(mid, mid.encode(), MessageKind.TEXT, 1, 2**62)
                result = await store.append(f"c{p}", message, max_size=10**9)
                # Printed only once the future resolved, i.e. after its commit.
                sys.stdout.write(f"c{p} {result.seq} {mid}\\n")
                sys.stdout.flush()
                i += 1

        await asyncio.gather(*(produce(p) for p in range(8)))

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


@pytest.mark.parametrize("synchronous", ["NORMAL", "FULL"])
async def test_sigkill_mid_stream_loses_nothing_that_was_confirmed(
    tmp_path: Path, synchronous: str
) -> None:
    path = tmp_path / "tether.db"
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _PRODUCER,
        str(path),
        synchronous,
        stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdout is not None
    confirmed: list[tuple[str, int, str]] = []
    try:
        assert await child.stdout.readline() == b"ready\n"
        while len(confirmed) < 3000:
            line = await child.stdout.readline()
            assert line.endswith(b"\n"), "the producer died on its own"
            cid, seq, mid = line.decode().split()
            confirmed.append((cid, int(seq), mid))
        child.send_signal(signal.SIGKILL)  # mid-stream: appends are in flight
        rest = await child.stdout.read()
        await child.wait()
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    assert child.returncode == -signal.SIGKILL
    *complete, _cut_by_the_kill = rest.split(b"\n")
    for line in complete:
        cid, seq, mid = line.decode().split()
        confirmed.append((cid, int(seq), mid))

    store = await SqliteStore.open(path)
    try:
        stored: dict[str, dict[int, str]] = {}
        for p in range(8):
            loaded = await store.load(f"c{p}")
            assert loaded is not None
            seqs = [m.seq for m in loaded.messages]
            assert seqs == list(range(1, len(seqs) + 1))  # gap-free
            assert loaded.stream.next_seq == len(seqs) + 1
            stored[f"c{p}"] = {m.seq: m.message_id for m in loaded.messages}
        for cid, seq, mid in confirmed:
            assert stored[cid].get(seq) == mid, (cid, seq, mid)
        # Numbering continues after the crash.
        assert appended(await store.append("c0", msg("after"), max_size=10**9)).seq == (
            len(stored["c0"]) + 1
        )
    finally:
        await store.close()


# --------------------------------------------------------------------------- refusals

_HOLDER = textwrap.dedent(
    """
    import asyncio, sys
    from tether.backends.sqlite_store import SqliteStore

    async def main(path):
        store = await SqliteStore.open(path)
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        await store.close()

    asyncio.run(main(sys.argv[1]))
    """
)


async def test_a_second_process_is_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "tether.db"
    holder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _HOLDER,
        str(path),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert holder.stdin is not None and holder.stdout is not None
    try:
        assert await holder.stdout.readline() == b"ready\n"
        with pytest.raises(StoreLockedError) as refused:
            await SqliteStore.open(path)
        text = str(refused.value)
        assert f"pid {holder.pid}" in text and "single-node" in text
        assert "TETHER_BACKEND=redis" in text
        assert isinstance(refused.value, BackendError)
    finally:
        holder.stdin.write(b"done\n")
        holder.stdin.close()
        assert await asyncio.wait_for(holder.wait(), 30) == 0
    store = await SqliteStore.open(path)  # free again once the holder closed it
    try:
        with pytest.raises(StoreLockedError):  # a second open in the same process, too
            await SqliteStore.open(path)
    finally:
        await store.close()


async def test_a_second_process_through_a_symlink_or_hard_link_is_refused(
    tmp_path: Path,
) -> None:
    """The lock belongs to the file, not to its name: two processes on one file through
    two names would reuse seqs and hide confirmed messages below `acked`."""
    path = tmp_path / "tether.db"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    holder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _HOLDER,
        str(path),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert holder.stdin is not None and holder.stdout is not None
    try:
        assert await holder.stdout.readline() == b"ready\n"
        symlink = elsewhere / "link.db"
        symlink.symlink_to(path)
        with pytest.raises(StoreLockedError, match=f"pid {holder.pid}"):
            await SqliteStore.open(symlink)
        hard = elsewhere / "hard.db"
        os.link(path, hard)
        with pytest.raises(StoreLockedError, match="hard link"):
            await SqliteStore.open(hard)
    finally:
        holder.stdin.write(b"done\n")
        holder.stdin.close()
        assert await asyncio.wait_for(holder.wait(), 30) == 0
    store = await SqliteStore.open(hard)  # free again once the holder closed it
    try:
        with pytest.raises(StoreLockedError):  # the same process, through the other name
            await SqliteStore.open(path)
    finally:
        await store.close()


_LEAVE_WAL = textwrap.dedent(
    """
    import sqlite3, sys
    conn = sqlite3.connect(sys.argv[1], timeout=0, isolation_level=None)
    try:
        print(conn.execute("PRAGMA journal_mode = DELETE").fetchone()[0])
    except sqlite3.OperationalError as exc:
        print(exc)
    """
)


def leave_wal_from_another_process(path: Path) -> str:
    """What an sqlite3 shell run by the operator on the live file could do: it needs the
    exclusive lock, refused while a store holds the file."""
    done = subprocess.run(
        [sys.executable, "-c", _LEAVE_WAL, str(path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return done.stdout.strip()


async def test_a_refused_open_of_a_hard_link_in_the_same_process_keeps_the_files_locks(
    tmp_path: Path,
) -> None:
    """Closing any descriptor of a file drops every fcntl() lock the process holds on it,
    SQLite's included: an open of another name for a file this process holds must be
    refused without opening (and closing) a descriptor of it."""
    path = tmp_path / "tether.db"
    store = await SqliteStore.open(path)
    try:
        await store.append("a", msg("m1"), max_size=10)
        assert leave_wal_from_another_process(path) == "database is locked"
        hard = tmp_path / "hard.db"
        os.link(path, hard)
        for _ in range(2):
            with pytest.raises(StoreLockedError, match="already open in this process"):
                await SqliteStore.open(hard)
        assert leave_wal_from_another_process(path) == "database is locked"
        await store.append("a", msg("m2"), max_size=10)
    finally:
        await store.close()
    again = await SqliteStore.open(hard)  # the holder closed it: free again
    try:
        loaded = await again.load("a")
        assert loaded is not None and [m.message_id for m in loaded.messages] == ["m1", "m2"]
    finally:
        await again.close()


def descriptors_of(path: Path) -> int:
    target = path.stat()
    count = 0
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            st = os.stat(f"/proc/self/fd/{name}")
            count += (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino)
    return count


async def test_a_name_replaced_by_a_hard_link_after_the_check_is_refused_keeping_the_locks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The name is looked up before a descriptor is opened; if it turns out to be a file
    this process holds all the same (the name replaced in between), the descriptor is
    kept open until the holder closes, so that its locks stay."""
    path = tmp_path / "tether.db"
    hard = tmp_path / "hard.db"
    store = await SqliteStore.open(path)
    await store.integrity_checked()  # its connection closed: the count below is stable
    os.link(path, hard)
    real_stat = os.stat

    def stat(target: Any, *args: Any, **kwargs: Any) -> Any:
        if os.fspath(target) == str(hard):
            raise FileNotFoundError(target)  # not there yet when looked up
        return real_stat(target, *args, **kwargs)

    try:
        before = descriptors_of(path)
        monkeypatch.setattr(os, "stat", stat)
        with pytest.raises(StoreLockedError, match="already open in this process"):
            await SqliteStore.open(hard)
        monkeypatch.setattr(os, "stat", real_stat)
        assert descriptors_of(path) == before + 1  # kept for the holder
        assert leave_wal_from_another_process(path) == "database is locked"
    finally:
        monkeypatch.setattr(os, "stat", real_stat)
        await store.close()
    assert descriptors_of(path) == 0


async def test_a_close_just_before_the_integrity_check_starts_stops_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`close` interrupts the check run after open; SQLite drops an interrupt that lands
    between the check's connect and its statement, so the check stops itself too."""
    path = tmp_path / "tether.db"
    store = await SqliteStore.open(path)
    for n in range(1000):  # enough rows for the check to take many VM steps
        await store.append("a", msg(f"m{n}"), max_size=10_000)
    await store.close()

    connected, interrupted = threading.Event(), threading.Event()
    real_connect = SqliteStore._connect

    class Held:  # the checker's connection: its statement starts after the interrupt
        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn = conn

        def interrupt(self) -> None:
            self.conn.interrupt()
            interrupted.set()

        def execute(self, sql: str) -> sqlite3.Cursor:
            interrupted.wait(30)
            return self.conn.execute(sql)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.conn, name)

    def connect(self: SqliteStore, *, readonly: bool) -> Any:
        conn = real_connect(self, readonly=readonly)
        if not threading.current_thread().name.startswith("tether-sqlite-check"):
            return conn
        connected.set()
        return Held(conn)

    monkeypatch.setattr(SqliteStore, "_connect", connect)
    store = await SqliteStore.open(path)
    assert await asyncio.to_thread(connected.wait, 30)
    await store.close()
    assert interrupted.is_set()
    assert await store.integrity_checked() is None
    assert store.describe()["integrity"] == "not checked: closed"


async def test_a_chunked_ack_stops_when_a_resume_renumbers_the_stream_between_chunks(
    tmp_path: Path,
) -> None:
    """An ack of 35 (four chunks of 10) and, queued behind it, a resume with another
    epoch that renumbers the stream after the ack's first chunk: the rest of the ack
    names the old numbering, so it must not delete the renumbered (undelivered) rows."""
    store = await SqliteStore.open(tmp_path / "tether.db", chunk_rows=10)
    try:
        for n in range(1, 41):
            await store.append("alice", msg(f"m{n}"), max_size=1000)
        await store.resume("alice", 0, None)
        held, entered = threading.Event(), threading.Event()

        def hold(conn: sqlite3.Connection) -> None:
            entered.set()
            held.wait(30)

        holding = store.transact(hold)  # the writer is busy: both below queue behind it
        await asyncio.to_thread(entered.wait, 30)
        acking = asyncio.ensure_future(store.ack("alice", 35))
        resuming = asyncio.ensure_future(store.resume("alice", 5, "some-other-epoch"))
        await asyncio.sleep(0)  # both tasks have queued their operation
        held.set()
        await holding
        resumed = await resuming
        assert resumed.reset
        deleted = await acking
        assert deleted == 10  # the first chunk only, of the old numbering
        left = await store.load("alice")
        assert left is not None
        assert left.stream.epoch == resumed.stream.epoch
        assert len(left.messages) == len(resumed.messages) == 30
        assert [m.message_id for m in left.messages] == [f"m{n}" for n in range(11, 41)]
    finally:
        await store.close()


async def test_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreOpenError, match="does not exist"):
        await SqliteStore.open(tmp_path / "nowhere" / "tether.db")


async def test_read_only_directory_is_refused(tmp_path: Path) -> None:
    with (
        tmpfs(tmp_path / "ro", "ro,size=64k") as directory,
        pytest.raises(StoreOpenError, match="not writable"),
    ):
        await SqliteStore.open(directory / "tether.db")


async def test_corrupt_file_is_refused(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database, " * 400)
    with pytest.raises(StoreCorruptError, match="not a valid database"):
        await SqliteStore.open(garbage)

    foreign = tmp_path / "foreign.db"
    with contextlib.closing(sqlite3.connect(foreign)) as conn:
        conn.execute("CREATE TABLE accounts (id INTEGER)")
        conn.commit()
    with pytest.raises(StoreCorruptError, match="not a tether store"):
        await SqliteStore.open(foreign)
    # The lock is released after a failed open.
    with pytest.raises(StoreCorruptError):
        await SqliteStore.open(garbage)


async def test_closed_store_refuses_operations(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "tether.db")
    await store.close()
    await store.close()  # idempotent
    with pytest.raises(StoreClosedError):
        await store.append("alice", msg("a"), max_size=10)
    with pytest.raises(StoreClosedError):
        await store.load("alice")


# --------------------------------------------------------------------------- full disk


async def test_full_disk_fails_the_transaction_and_acknowledges_only_what_is_stored(
    tmp_path: Path,
) -> None:
    with tmpfs(tmp_path / "small", "size=512k") as directory:
        path = directory / "tether.db"
        store = await SqliteStore.open(path)
        stored: list[Appended] = []
        failures: list[BaseException] = []
        try:
            for burst in range(200):
                results = await asyncio.gather(
                    *(
                        store.append(
                            "alice",
                            msg(f"m{burst}-{i}", os.urandom(2000), kind=MessageKind.BYTES),
                            max_size=10**6,
                        )
                        for i in range(10)
                    ),
                    return_exceptions=True,
                )
                for result in results:
                    if isinstance(result, BaseException):
                        failures.append(result)
                    else:
                        stored.append(appended(result))
                if failures:
                    break
            assert failures, "the 512 KiB file system never filled up"
            assert all(isinstance(f, StoreFullError) for f in failures)
            assert "disk is full" in str(failures[0])
            # Nothing that failed took a seq: the confirmed ones are exactly 1..n.
            assert [a.seq for a in stored] == list(range(1, len(stored) + 1))
            assert await store.pending_count("alice") == len(stored)

            # Room again (the operator freed space): acks and appends work again.
            grow = await asyncio.create_subprocess_exec(
                "mount", "-o", "remount,size=4m", str(directory)
            )
            assert await grow.wait() == 0
            assert await store.ack("alice", 10) == 10
            later = appended(await store.append("alice", msg("later"), max_size=10**6))
            assert later.seq == len(stored) + 1
        finally:
            await store.close()

        store = await SqliteStore.open(path)
        try:
            loaded = await store.load("alice")
            assert loaded is not None
            assert [m.seq for m in loaded.messages] == list(range(11, len(stored) + 2))
            assert loaded.messages[-1].message_id == "later"
        finally:
            await store.close()


async def test_max_bytes_cap_behaves_like_a_full_disk(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "tether.db", max_bytes=256 * 1024)
    try:
        count = 0
        with pytest.raises(StoreFullError):
            for count in range(1, 1000):
                await store.append("alice", msg(f"m{count}", b"x" * 1000), max_size=10**6)
        assert 50 < count < 1000
        assert await store.pending_count("alice") == count - 1
        # A broadcast that does not fit is all-or-nothing.
        with pytest.raises(StoreFullError):
            await store.append_many(
                [f"c{i}" for i in range(300)], msg("all", b"y" * 1000), max_size=10
            )
        assert await store.total_pending() == count - 1
        await store.ack("alice", count - 1)  # deleting frees pages for new rows
        assert appended(await store.append("alice", msg("fits"), max_size=10**6)).seq == count
    finally:
        await store.close()


# --------------------------------------------------------------------------- expiry


async def test_expire_removes_expired_messages_and_dedup_keys_in_chunks(tmp_path: Path) -> None:
    clock = ManualClock()
    store = await SqliteStore.open(tmp_path / "tether.db", clock=clock, chunk_rows=3)
    try:
        now_ms = int(clock.wall() * 1000)
        for n in range(1, 11):  # alice: 10 messages expiring at +10 s
            await store.append(
                "alice",
                msg(f"a{n}", expires_ms=now_ms + 10_000),
                max_size=100,
                dedup_key=f"a{n}",
                dedup_ttl_ms=5_000,
            )
        for n in range(1, 4):  # bob: 3 messages expiring much later
            await store.append("bob", msg(f"b{n}", expires_ms=now_ms + 60_000), max_size=100)

        report = await store.expire()
        assert report.messages == [] and report.dedup_keys == 0

        clock.advance(5)  # the dedup window has passed, the messages are still valid
        assert not await store.seen("alice", "a1")
        report = await store.expire()
        assert (len(report.messages), report.dedup_keys) == (0, 10)
        assert (
            appended(await store.append("alice", msg("a1 again"), max_size=100, dedup_key="a1")).seq
            == 11
        )

        clock.advance(6)
        before = store.transactions
        report = await store.expire()
        assert [(m.client_id, m.seq, m.message_id) for m in report.messages] == [
            ("alice", n, f"a{n}") for n in range(1, 11)
        ]
        assert store.transactions - before >= 4  # 10 rows, 3 per transaction
        assert await store.pending_count("alice") == 1  # "a1 again" has no near expiry
        assert await store.pending_count("bob") == 3
        loaded = await store.load("alice")
        assert loaded is not None and [m.message_id for m in loaded.messages] == ["a1 again"]
    finally:
        await store.close()


def fail_at(monkeypatch: pytest.MonkeyPatch, store: Any, name: str, call: int) -> None:
    """`store.<name>` (run on the writer thread) raises a disk I/O error at its `call`th
    call: that transaction rolls back."""
    real = getattr(store, name)
    calls = 0

    def failing(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == call:
            raise sqlite3.OperationalError("disk I/O error")
        return real(*args)

    monkeypatch.setattr(store, name, failing)


def stop_signal(monkeypatch: pytest.MonkeyPatch, store: Any) -> threading.Event:
    """An event set once close() has queued its stop for the writer thread."""
    real_queue = store._queue
    queued = threading.Event()

    class Queue:
        def __getattr__(self, name: str) -> Any:
            return getattr(real_queue, name)

        def put(self, item: Any) -> None:
            real_queue.put(item)
            if item is sqlite_store._STOP:
                queued.set()

    monkeypatch.setattr(store, "_queue", Queue())
    return queued


async def test_an_expiry_failing_midway_reports_what_its_committed_chunks_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Six expired rows, one a transaction; the third transaction fails. The two rows
    the committed ones deleted are gone: the error names them (`partial`), and the next
    pass reports the four others, the failed chunk's among them: each row once."""
    store = await SqliteStore.open(tmp_path / "tether.db", chunk_rows=1)
    try:
        for n in range(1, 7):
            await store.append("alice", msg(f"m{n}", expires_ms=1000), max_size=100)
        fail_at(monkeypatch, store, "_touch", 3)  # each chunk of the pass touches first
        with pytest.raises(StoreError) as failed:
            await store.expire(10_000)
        partial = failed.value.partial
        assert isinstance(partial, ExpiryReport)
        assert [m.message_id for m in partial.messages] == ["m1", "m2"]
        assert await store.pending_count("alice") == 4
        rest = await store.expire(10_000)
        assert [m.message_id for m in rest.messages] == ["m3", "m4", "m5", "m6"]
        assert await store.pending_count("alice") == 0
    finally:
        await store.close()


async def test_an_expiry_cut_short_by_close_reports_what_it_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() while an expiry pass is between chunks: the pass ends with the chunk that
    runs beside the close, and its StoreClosedError names every row it deleted, no more
    (the others are still in the file)."""
    path = tmp_path / "tether.db"
    store = await SqliteStore.open(path, chunk_rows=1)
    for n in range(1, 7):
        await store.append("alice", msg(f"m{n}", expires_ms=1000), max_size=100)
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
    expiring = asyncio.ensure_future(store.expire(10_000))
    await asyncio.to_thread(entered.wait, 30)
    await store.close()
    with pytest.raises(StoreClosedError) as cut:
        await expiring
    partial = cut.value.partial
    assert isinstance(partial, ExpiryReport)
    reported = [m.message_id for m in partial.messages]
    assert 2 < len(reported) < 6
    store = await SqliteStore.open(path)
    try:
        left = await store.load("alice")
        assert left is not None
        assert reported + [m.message_id for m in left.messages] == [f"m{n}" for n in range(1, 7)]
    finally:
        await store.close()


async def test_a_drop_stream_failing_after_its_first_chunk_reports_the_dropped_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stream goes with drop_stream's first chunk: if a later one fails, the messages
    are dropped all the same (an expiry pass finishes deleting their rows, uncounted),
    so the error says how many (`partial`)."""
    store = await SqliteStore.open(tmp_path / "tether.db", chunk_rows=2)
    try:
        for n in range(1, 6):
            await store.append("alice", msg(f"m{n}"), max_size=100)
        fail_at(monkeypatch, store, "_purge_chunk", 2)
        with pytest.raises(StoreError) as failed:
            await store.drop_stream("alice")
        assert failed.value.partial == 5
        assert await store.load("alice") is None
        monkeypatch.undo()
        report = await store.expire(0)
        assert (report.messages, report.purged_rows) == ([], 3)
    finally:
        await store.close()


# --------------------------------------------------------------------------- lazy load


async def test_open_loads_nothing_even_with_a_million_pending(tmp_path: Path) -> None:
    path = tmp_path / "tether.db"
    store = await SqliteStore.open(path, synchronous="NORMAL")
    await store.append("big", msg("m1", b"x" * 100), max_size=10**7)
    await store.append("small", msg("s1"), max_size=10)
    await store.close()
    # A million more rows behind the store's back (the API would take minutes to add them).
    with contextlib.closing(sqlite3.connect(path)) as conn:
        sid = conn.execute("SELECT sid FROM streams WHERE client_id = 'big'").fetchone()[0]
        conn.execute(
            "WITH RECURSIVE n(i) AS (SELECT 2 UNION ALL SELECT i + 1 FROM n WHERE i < 1000001) "
            "INSERT INTO pending (sid, seq, message_id, kind, data, created_ms, expires_ms) "
            "SELECT ?, i, 'm' || i, 0, zeroblob(100), 1, ? FROM n",
            (sid, FAR),
        )
        conn.execute(
            "UPDATE streams SET next_seq = 1000002, pending = 1000001 WHERE sid = ?", (sid,)
        )
        conn.commit()

    store = await SqliteStore.open(path, chunk_rows=50_000)
    try:
        assert store.rows_loaded == 0
        assert await store.total_pending() == 1_000_002
        assert await store.pending_count("big") == 1_000_001
        assert store.rows_loaded == 0
        tail = await store.load("big", after=999_995)
        assert tail is not None and [m.seq for m in tail.messages] == list(
            range(999_996, 1_000_002)
        )
        page = await store.load("big", limit=5)
        assert page is not None and [m.seq for m in page.messages] == [1, 2, 3, 4, 5]
        assert store.rows_loaded == 6 + 5  # exactly what was asked for, nothing at open
        # The drain of the backlog is chunked: many transactions, appends continue.
        before = store.transactions
        drained = await store.ack("big", 1_000_001)
        assert drained == 1_000_001
        assert store.transactions - before >= 20
        assert await store.total_pending() == 1
        assert appended(await store.append("big", msg("next"), max_size=10)).seq == 1_000_002
    finally:
        await store.close()


# --------------------------------------------------------------------------- group commit


async def test_concurrent_appends_share_few_transactions_and_keep_order(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "tether.db")
    try:
        before = store.transactions
        results = await asyncio.gather(
            *(store.append(f"c{n % 10}", msg(f"m{n}"), max_size=1000) for n in range(1000))
        )
        used = store.transactions - before
        assert used <= 100, f"1000 concurrent appends took {used} transactions"
        # Per client, seqs follow the order the appends were made.
        for client in range(10):
            seqs = [appended(results[n]).seq for n in range(client, 1000, 10)]
            assert seqs == list(range(1, 101))
        assert await store.total_pending() == 1000
    finally:
        await store.close()


async def test_broadcast_is_one_transaction_with_a_row_per_client(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "tether.db")
    clients = [f"c{i}" for i in range(1000)]
    try:
        before = store.transactions
        results = await store.append_many(clients, msg("hello"), max_size=10, dedup_key="hello")
        assert store.transactions - before == 1
        assert [appended(r).seq for r in results] == [1] * 1000
        assert len({appended(r).epoch for r in results}) == 1000  # each client its own stream
        again = await store.append_many(clients, msg("hello"), max_size=10, dedup_key="hello")
        assert again == [Refusal.DUPLICATE] * 1000
        assert await store.total_pending() == 1000
        loaded = await store.load("c999")
        assert loaded is not None and [m.message_id for m in loaded.messages] == ["hello"]
    finally:
        await store.close()


# --------------------------------------------------------------------------- bounds


async def test_overflow_policies(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "tether.db")
    try:
        for n in range(1, 4):
            await store.append("alice", msg(f"m{n}"), max_size=3)
        result = appended(await store.append("alice", msg("m4"), max_size=3, policy="drop_oldest"))
        assert result.seq == 4 and [m.message_id for m in result.evicted] == ["m1"]
        assert await store.pending_count("alice") == 3
        for policy in ("drop_newest", "reject"):
            assert await store.append("alice", msg("m5"), max_size=3, policy=policy) is (
                Refusal.FULL
            )
        # A refused message takes no seq and no dedup key.
        assert appended(await store.append("alice", msg("m5"), max_size=4)).seq == 5
        with pytest.raises(ValueError, match="max_size"):
            await store.append("alice", msg("m6"), max_size=0)

        # Concurrent appends to a full outbox (one transaction): each evicts the oldest,
        # including rows appended earlier in the same transaction.
        results = await asyncio.gather(
            *(store.append("bob", msg(f"b{n}"), max_size=3) for n in range(1, 11))
        )
        evicted = [m.message_id for r in results for m in appended(r).evicted]
        assert evicted == [f"b{n}" for n in range(1, 8)]
        loaded = await store.load("bob")
        assert loaded is not None
        assert [(m.seq, m.message_id) for m in loaded.messages] == [
            (8, "b8"),
            (9, "b9"),
            (10, "b10"),
        ]
        assert loaded.stream.pending == 3
    finally:
        await store.close()


async def test_append_batch_checks_every_bound_and_answers_appended(tmp_path: Path) -> None:
    """append_batch checks each distinct bound once: one bad bound among many good ones
    still refuses the whole batch at once (nothing stored); the inline common case
    answers the same `Appended` records as `append`."""
    store = await SqliteStore.open(tmp_path / "tether.db")
    try:
        await store.append("alice", msg("a0"), max_size=10)  # a known stream: the inline path
        items = [("alice", msg(f"a{n}"), None, 10, True) for n in range(1, 4)]
        with pytest.raises(ValueError, match="max_size"):
            store.append_batch([*items, ("bob", msg("b1"), None, 0, True)], dedup_ttl_ms=1000)
        with pytest.raises(ValueError, match="dedup_ttl_ms"):
            store.append_batch(items, dedup_ttl_ms=0)
        assert await store.pending_count("alice") == 1
        assert await store.stream("bob") is None
        results = await store.append_batch(
            [*items, ("bob", msg("b1"), None, 5, True)], dedup_ttl_ms=1000
        )
        epoch = (await store.stream("alice")).epoch  # type: ignore[union-attr]
        assert results[:3] == [Appended(2, epoch), Appended(3, epoch), Appended(4, epoch)]
        assert all(type(r) is Appended and r.evicted == () for r in results)
        assert appended(results[3]).seq == 1
        assert await store.pending_count("alice") == 4
    finally:
        await store.close()


async def test_one_transaction_of_any_size_stores_every_row_and_stream(tmp_path: Path) -> None:
    """A transaction's rows and streams are written 32 per statement and the rest in one:
    every count stores each row once, in order, with its stream's counters."""
    store = await SqliteStore.open(tmp_path / "tether.db")
    try:
        for count in (1, 2, 3, 31, 32, 33, 63, 90, 100):
            clients = [f"c{count}-{n}" for n in range(count)]
            for cid in clients:  # known streams: the batch takes the inline path
                await store.append(cid, msg("first"), max_size=10)
            before = store.transactions
            items = [(cid, msg(f"{cid}-m{k}"), None, 10, True) for k in (2, 3) for cid in clients]
            results = await store.append_batch(items, dedup_ttl_ms=1000)
            assert store.transactions == before + 1  # one operation, one transaction
            assert [appended(r).seq for r in results] == [2] * count + [3] * count
            for cid in clients:
                loaded = await store.load(cid)
                assert loaded is not None
                assert [m.message_id for m in loaded.messages] == [
                    "first",
                    f"{cid}-m2",
                    f"{cid}-m3",
                ]
                assert (loaded.stream.next_seq, loaded.stream.pending) == (4, 3)
        assert await store.total_pending() == 3 * sum((1, 2, 3, 31, 32, 33, 63, 90, 100))
    finally:
        await store.close()


async def test_ack_discard_and_dead_letters(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "tether.db", chunk_rows=10, dead_letter_limit=3)
    try:
        for n in range(1, 101):
            await store.append("alice", msg(f"m{n}"), max_size=1000)
        before = store.transactions
        assert await store.ack("alice", 95) == 95
        assert store.transactions - before >= 10  # 95 rows, 10 per transaction
        assert await store.ack("alice", 10_000) == 5  # clamped to the last seq handed out
        state = await store.stream("alice")
        assert state is not None and (state.acked, state.pending) == (100, 0)
        assert await store.ack("nobody", 5) == 0

        for n in range(101, 106):
            await store.append("alice", msg(f"m{n}"), max_size=1000)
        assert await store.discard("alice", [101, 102, 999]) == 2
        for n, seq in enumerate([103, 104, 105, None, None]):
            letter = DeadLetterRecord(
                seq, f"d{n}", b"data", MessageKind.BYTES, 5, "max retries", 1000 + n, 1
            )
            await store.dead_letter("alice", letter)
        letters = await store.dead_letters("alice")
        assert [d.message_id for d in letters] == ["d4", "d3", "d2"]  # newest first, bounded
        assert await store.pending_count("alice") == 0  # dead-lettering moved them
        assert await store.dead_letters("bob") == []
    finally:
        await store.close()


async def test_deletions_share_a_row_budget_per_transaction_and_the_file_shrinks(
    tmp_path: Path,
) -> None:
    path = tmp_path / "tether.db"
    store = await SqliteStore.open(path, synchronous="NORMAL", chunk_rows=100)
    clients = [f"c{i}" for i in range(20)]
    for n in range(100):
        await store.append_many(clients, msg(f"m{n}", bytes(1000)), max_size=1000)
    full = store.file_bytes()
    before = store.transactions
    # 20 concurrent acks of 100 rows each: 2,000 rows, at most 100 per transaction.
    assert await asyncio.gather(*(store.ack(c, 100) for c in clients)) == [100] * 20
    assert store.transactions - before >= 20
    assert await store.total_pending() == 0
    await store.close()
    assert store.vacuumed_pages > 0
    assert store.file_bytes() < full / 4, (store.file_bytes(), full)

    store = await SqliteStore.open(path)  # and it still works as before
    try:
        assert appended(await store.append("c0", msg("next"), max_size=10)).seq == 101
    finally:
        await store.close()
