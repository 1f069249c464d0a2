"""Benchmark: the embedded SQLite store: concurrent appends, broadcast copies, file size, open and drain of a backlog.

    .venv/bin/python -m benchmarks.sqlite_store [--quick] [--json PATH]

Every figure is for the storage engine alone (tether.backends.sqlite_store, no hub, no
sockets), on a file in the system temp directory, with synchronous NORMAL and FULL in
the same run. Appends carry a 100-byte payload.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tether.backends.sqlite_store import MessageKind, NewMessage, SqliteStore, Synchronous

from ._common import Result, check, cli_main, make_result, median, rnd

NAME = "sqlite_store"
PAYLOAD = b'{"text":"' + b"x" * 89 + b'"}'  # 100 bytes of JSON
FAR = 2**62  # an expiry that never comes during the benchmark


def _message(n: int) -> NewMessage:
    return NewMessage(f"m{n}", PAYLOAD, MessageKind.JSON, 1_700_000_000_000, FAR)


async def _producers(
    path: Path, synchronous: Synchronous, producers: int, per_producer: int, **options: Any
) -> dict[str, Any]:
    """`producers` tasks each append `per_producer` messages to its own client."""
    store = await SqliteStore.open(path, synchronous=synchronous, **options)
    try:

        async def produce(p: int) -> None:
            for n in range(per_producer):
                await store.append(f"c{p}", _message(n), max_size=1_000_000)

        start = time.perf_counter()
        await asyncio.gather(*(produce(p) for p in range(producers)))
        elapsed = time.perf_counter() - start
        total = producers * per_producer
        return {
            "msgs_per_s": total / elapsed,
            "ops_per_transaction": store.operations / max(1, store.transactions),
        }
    finally:
        await store.close()


async def _sequential(path: Path, synchronous: Synchronous, count: int) -> float:
    """Appends/s from one producer that awaits each append (no batching possible)."""
    store = await SqliteStore.open(path, synchronous=synchronous)
    try:
        start = time.perf_counter()
        for n in range(count):
            await store.append("solo", _message(n), max_size=1_000_000)
        return count / (time.perf_counter() - start)
    finally:
        await store.close()


async def _reads_under_load(path: Path, synchronous: Synchronous, reads_on_writer: bool) -> float:
    """load() calls per second for one client while 100 producers append."""
    store = await SqliteStore.open(path, synchronous=synchronous, reads_on_writer=reads_on_writer)
    try:
        for n in range(20):
            await store.append("reader", _message(n), max_size=1000)
        stop = asyncio.Event()

        async def produce(p: int) -> None:
            n = 0
            while not stop.is_set():
                await store.append(f"c{p}", _message(n), max_size=1_000_000)
                n += 1

        tasks = [asyncio.create_task(produce(p)) for p in range(100)]
        reads = 0
        start = time.perf_counter()
        while time.perf_counter() - start < 1.0:
            loaded = await store.load("reader")
            assert loaded is not None and len(loaded.messages) == 20
            reads += 1
        elapsed = time.perf_counter() - start
        stop.set()
        await asyncio.gather(*tasks)
        return reads / elapsed
    finally:
        await store.close()


async def _broadcast(
    path: Path, synchronous: Synchronous, clients: int, rounds: int
) -> dict[str, Any]:
    """`rounds` critical broadcasts, each append_many to `clients` clients."""
    store = await SqliteStore.open(path, synchronous=synchronous)
    ids = [f"c{i}" for i in range(clients)]
    try:
        start = time.perf_counter()
        for n in range(rounds):
            await store.append_many(ids, _message(n), max_size=1_000_000)
        elapsed = time.perf_counter() - start
        return {"broadcasts_per_s": rounds / elapsed, "copies_per_s": rounds * clients / elapsed}
    finally:
        await store.close()


async def _backlog(path: Path, clients: int, per_client: int, auto_vacuum: bool) -> dict[str, Any]:
    """Fill a backlog of clients × per_client, reopen it, then drain it with acks."""
    store = await SqliteStore.open(path, synchronous="NORMAL", auto_vacuum=auto_vacuum)
    ids = [f"c{i}" for i in range(clients)]
    fill_start = time.perf_counter()
    for n in range(per_client):
        await store.append_many(ids, _message(n), max_size=10_000_000)
    fill_s = time.perf_counter() - fill_start
    await store.close()
    full_bytes = store.file_bytes()

    start = time.perf_counter()
    store = await SqliteStore.open(path, synchronous="NORMAL")
    open_s = time.perf_counter() - start
    try:
        total = await store.total_pending()
        first = await store.load("c0", after=per_client - 10)
        assert first is not None and len(first.messages) == 10
        first_load_s = time.perf_counter() - start
        rows_loaded_at_open = store.rows_loaded
        start = time.perf_counter()
        await asyncio.gather(*(store.ack(cid, per_client) for cid in ids))
        drain_s = time.perf_counter() - start
        left = await store.total_pending()
    finally:
        await store.close()
    return {
        "pending": total,
        "fill_s": fill_s,
        "file_bytes_full": full_bytes,
        "open_ms": open_s * 1000,
        "open_plus_first_load_ms": first_load_s * 1000,
        "rows_loaded": rows_loaded_at_open,
        "drain_s": drain_s,
        "drain_msgs_per_s": total / drain_s,
        "left_after_drain": left,
        "file_bytes_drained": store.file_bytes(),
        "vacuumed_pages": store.vacuumed_pages,
    }


async def _main(quick: bool, workdir: Path) -> Result:
    repeat = 1 if quick else 3
    per_producer = 50 if quick else 500
    rounds = 5 if quick else 50
    backlog_clients, backlog_per_client = (100, 100) if quick else (1000, 1000)
    rows: list[dict[str, Any]] = []
    targets: dict[str, dict[str, Any]] = {}
    measured: dict[str, dict[str, Any]] = {}

    def row(case: str, metric: str, value: float, unit: str) -> None:
        rows.append({"case": case, "metric": metric, "value": rnd(value), "unit": unit})

    # NORMAL and FULL alternate, `repeat` times, so both see the same machine load.
    runs: dict[str, list[dict[str, Any]]] = {"NORMAL": [], "FULL": []}
    for attempt in range(repeat):
        for synchronous in ("NORMAL", "FULL"):
            appends = await _producers(
                workdir / f"p-{synchronous}-{attempt}.db", synchronous, 100, per_producer
            )
            fanout = await _broadcast(
                workdir / f"b-{synchronous}-{attempt}.db", synchronous, 1000, rounds
            )
            solo = await _sequential(
                workdir / f"s-{synchronous}-{attempt}.db", synchronous, per_producer
            )
            runs[synchronous].append({**appends, **fanout, "solo_per_s": solo})
    for synchronous, results in runs.items():
        measured[synchronous] = {key: median(r[key] for r in results) for key in results[0]}
        figures = measured[synchronous]
        case = f"synchronous={synchronous} (median of {repeat})"
        row(case, "appends, 100 concurrent producers", figures["msgs_per_s"], "msgs/s")
        row(case, "operations per transaction", figures["ops_per_transaction"], "ops")
        row(case, "appends, 1 producer awaiting each", figures["solo_per_s"], "msgs/s")
        row(case, "broadcast append_many to 1,000 clients", figures["broadcasts_per_s"], "/s")
        row(case, "broadcast copies stored", figures["copies_per_s"], "copies/s")
    full_vs_normal = {
        key: median(f[key] / n[key] for f, n in zip(runs["FULL"], runs["NORMAL"], strict=True))
        for key in ("msgs_per_s", "copies_per_s", "solo_per_s")
    }
    for reads_on_writer in (False, True):
        reads = await _reads_under_load(
            workdir / f"r-{reads_on_writer}.db", "FULL", reads_on_writer
        )
        case = "reads on the writer thread" if reads_on_writer else "reads on a reader connection"
        row(case, "load() of a 20-message stream under 100 producers", reads, "loads/s")
    for auto_vacuum in (True, False):
        backlog = await _backlog(
            workdir / f"q-{auto_vacuum}.db", backlog_clients, backlog_per_client, auto_vacuum
        )
        pending = backlog["pending"]
        case = f"{pending:,} pending, auto_vacuum=" + ("INCREMENTAL" if auto_vacuum else "NONE")
        row(case, "fill (append_many to the clients)", pending / backlog["fill_s"], "msgs/s")
        row(
            case,
            "file size per pending 100-byte message",
            backlog["file_bytes_full"] / pending,
            "bytes",
        )
        row(case, "open", backlog["open_ms"], "ms")
        row(case, "open + total_pending + first load", backlog["open_plus_first_load_ms"], "ms")
        row(case, "rows read by open + one load(after=n-10)", backlog["rows_loaded"], "rows")
        row(case, "drain: acks of every client (concurrent)", backlog["drain_msgs_per_s"], "msgs/s")
        row(case, "drain time", backlog["drain_s"], "s")
        row(case, "file before drain", backlog["file_bytes_full"] / 1e6, "MB")
        row(case, "file after drain (closed)", backlog["file_bytes_drained"] / 1e6, "MB")
        if auto_vacuum:
            targets["open_ms_with_backlog"] = check(
                backlog["open_ms"],
                unit="ms",
                note=f"{pending:,} pending; nothing is loaded at open",
            )
            targets["drained_file_vs_full"] = check(
                backlog["file_bytes_drained"] / backlog["file_bytes_full"],
                unit="ratio",
                note="the file shrinks with the backlog (auto_vacuum=INCREMENTAL)",
            )
            targets["bytes_per_pending_message"] = check(
                backlog["file_bytes_full"] / pending, unit="bytes", note="100-byte payload"
            )
    targets["full_vs_normal_broadcast_copies"] = check(
        full_vs_normal["copies_per_s"],
        unit="ratio",
        higher_is_better=True,
        note="what fsync per group commit costs, append_many to 1,000 clients",
    )
    targets["full_vs_normal_single_producer"] = check(
        full_vs_normal["solo_per_s"],
        unit="ratio",
        higher_is_better=True,
        note="one fsync per append when nothing else shares the transaction",
    )
    targets["full_vs_normal_appends"] = check(
        full_vs_normal["msgs_per_s"],
        unit="ratio",
        higher_is_better=True,
        note="what fsync per group commit costs, 100 producers",
    )
    targets["appends_100_producers_full"] = check(
        measured["FULL"]["msgs_per_s"], unit="msgs/s", higher_is_better=True
    )
    params = {
        "quick": quick,
        "payload_bytes": len(PAYLOAD),
        "producers": 100,
        "appends_per_producer": per_producer,
        "broadcast_clients": 1000,
        "broadcast_rounds": rounds,
        "repeat": repeat,
        "backlog": backlog_clients * backlog_per_client,
        "directory": str(workdir.parent),
    }
    return make_result(NAME, params, rows, targets)


def run(quick: bool = False) -> Result:
    """The embedded SQLite store: appends/s, broadcast copies/s, bytes per message, open and drain."""
    workdir = Path(tempfile.mkdtemp(prefix="tether-sqlite-bench-"))
    try:
        return asyncio.run(_main(quick, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> None:
    cli_main(NAME, run, argv)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
