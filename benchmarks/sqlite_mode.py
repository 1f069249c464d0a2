"""SQLite-mode figures: critical sends and broadcasts through a sqlite-backed hub vs memory, same run; file size; start-up with a backlog.

    nice -n -15 .venv/bin/python -m benchmarks.sqlite_mode [--rounds 5] [--backlog 1000000]
                                                           [--synchronous NORMAL|FULL]

Transports are in-process sockets that always take a frame at once (no network), so the
figures isolate what the backend costs: memory does no I/O; sqlite commits every stored
message (group commit: every send waiting at that moment shares one transaction and one
fsync) before the send returns. Memory and sqlite alternate round by round, each on a
fresh file in the system temp directory; rates are medians of the rounds, and
`sqlite_vs_memory` is the median of each round's ratio (two adjacent runs, the same
machine load), with every round's ratio listed.

- offline: 100 concurrent producers, each sending critical messages to its own offline
  client one after another (stored only); sends/s.
- producers_v1: the same producers to connected tether.v1 clients that ack every 64
  messages (each message stored until acknowledged, then trimmed); sends/s.
- broadcast: one critical broadcast to 1,000 connected plain-mode clients, repeated;
  deliveries/s (a plain-mode client with nothing queued is written to at once: written
  is delivered, nothing to store).
- broadcast_v1: the same to tether.v1 clients, which ack every 8 broadcasts (each copy is
  stored in one transaction per broadcast, and kept until acknowledged).
- channel_publish: 100 concurrent producers, each publishing to its own channel one
  message after another (no subscribers: the store's cost alone; on sqlite every publish
  is committed to the file before it returns PUBLISHED); publishes/s.
- file size: bytes of the file (with its WAL) per pending message after `offline`.
- start-up: `Hub.start()` on a file holding `--backlog` pending messages (1,000 clients
  x 1,000) vs an empty file, the rows read at start-up (must be 0), and the first
  tether.v1 connect of one client (which loads its 1,000 messages).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from tether import Hub, HubConfig
from tether.backends.sqlite import SqliteBackend
from tether.backends.sqlite_store import MessageKind, NewMessage, SqliteStore
from tether.protocol import Hello

from ._hubkit import SocketLikeTransport

CLIENTS = 1000
PRODUCERS = 100
ACK_EVERY = 8  # broadcasts between a client's acks (tether.Client: 64 messages or 50 ms)
PAYLOAD = {"text": "x" * 64}


def _config(kind: str, path: Path, synchronous: str) -> HubConfig:
    return HubConfig(
        backend=kind,
        sqlite_path=str(path),
        sqlite_synchronous=synchronous,
        max_queue_size=1_000_000,
    )


async def _connect(hub: Hub, ids: list[str], *, v1: bool = False) -> None:
    for cid in ids:
        await hub.connect(cid, SocketLikeTransport(), hello=Hello(cid, 0) if v1 else None)


async def _broadcast(hub: Hub, messages: int, *, v1: bool) -> dict[str, float]:
    ids = [f"b{i}" for i in range(CLIENTS)]
    await _connect(hub, ids, v1=v1)
    rejected = 0
    start = time.perf_counter()
    for n in range(messages):
        result = await hub.broadcast({"n": n, **PAYLOAD}, critical=True)
        rejected += result.rejected + result.unknown
        if v1 and n % ACK_EVERY == ACK_EVERY - 1:
            # Clients ack in batches (as tether.Client does), each from its own connection.
            await asyncio.gather(*(hub.ack(cid, hub.highest_sent(cid)) for cid in ids))
    elapsed = time.perf_counter() - start
    return {"per_s": messages * CLIENTS / elapsed, "rejected": rejected}


async def _producers(hub: Hub, messages: int, connected: bool, v1: bool) -> dict[str, float]:
    ids = [f"p{i}" for i in range(PRODUCERS)]
    if connected:
        await _connect(hub, ids, v1=v1)
    else:
        await hub.start()
    per_producer = max(1, messages // PRODUCERS)
    rejected = 0

    async def produce(cid: str) -> None:
        nonlocal rejected
        for n in range(per_producer):
            result = await hub.send(cid, {"n": n, **PAYLOAD}, critical=True)
            rejected += not result.accepted
            if v1 and n % 64 == 63:  # the client acks every 64 messages
                await hub.ack(cid, hub.highest_sent(cid))

    start = time.perf_counter()
    await asyncio.gather(*(produce(cid) for cid in ids))
    elapsed = time.perf_counter() - start
    figures = {"per_s": per_producer * PRODUCERS / elapsed, "rejected": rejected}
    backend = hub.backend
    if isinstance(backend, SqliteBackend) and not connected:
        pending = await backend.pending_counts([])
        figures["bytes_per_pending"] = backend.store.file_bytes() / max(1, pending or 0)
    return figures


async def _channel_publish(hub: Hub, messages: int) -> dict[str, float]:
    await hub.start()
    per_producer = max(1, messages // PRODUCERS)
    rejected = 0

    async def produce(channel: str) -> None:
        nonlocal rejected
        for n in range(per_producer):
            result = await hub.publish(channel, {"n": n, **PAYLOAD})
            rejected += result.status.value != "published"

    start = time.perf_counter()
    await asyncio.gather(*(produce(f"ch{i}") for i in range(PRODUCERS)))
    elapsed = time.perf_counter() - start
    return {"per_s": per_producer * PRODUCERS / elapsed, "rejected": rejected}


async def _one(kind: str, workdir: Path, scenario: str, size: int, sync: str) -> dict[str, float]:
    path = workdir / f"{scenario}-{time.monotonic_ns()}.db"
    hub = Hub(_config(kind, path, sync))
    try:
        if scenario == "channel_publish":
            return await _channel_publish(hub, size)
        if scenario.startswith("broadcast"):
            return await _broadcast(hub, size, v1=scenario == "broadcast_v1")
        connected = scenario.startswith("producers")
        return await _producers(hub, size, connected, v1=scenario == "producers_v1")
    finally:
        await hub.shutdown(timeout=1.0)
        _remove(path)


def _remove(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", ".lock"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


async def _fill(path: Path, backlog: int) -> float:
    """A file with `backlog` pending messages, 1,000 clients x backlog/1,000 (NORMAL:
    the fill is set-up, not what is measured). Returns its size in bytes."""
    store = await SqliteStore.open(path, synchronous="NORMAL")
    ids = [f"c{i}" for i in range(CLIENTS)]
    data = json.dumps({"n": 0, **PAYLOAD}).encode()
    now_ms = int(time.time() * 1000)
    far = now_ms + 86_400_000
    try:
        for n in range(max(1, backlog // CLIENTS)):
            message = NewMessage(f"m{n}", data, MessageKind.JSON, now_ms, far)
            await store.append_many(ids, message, max_size=10_000_000)
    finally:
        await store.close()
    return float(store.file_bytes())


async def _startup(workdir: Path, backlog: int, sync: str, rounds: int) -> dict[str, Any]:
    full = workdir / "backlog.db"
    fill_start = time.perf_counter()
    size = await _fill(full, backlog)
    fill_s = time.perf_counter() - fill_start
    starts: dict[str, list[float]] = {"memory": [], "sqlite_empty": [], "sqlite_backlog": []}
    first_connect: list[float] = []
    rows_at_start: list[int] = []
    loaded_by_connect: list[int] = []
    for attempt in range(rounds):
        for case in starts:
            if case == "memory":
                hub = Hub(HubConfig(backend="memory"))
            else:
                path = full if case == "sqlite_backlog" else workdir / f"empty-{attempt}.db"
                hub = Hub(_config("sqlite", path, sync))
            try:
                start = time.perf_counter()
                await hub.start()
                starts[case].append(time.perf_counter() - start)
                if case == "sqlite_backlog":
                    backend = hub.backend
                    assert isinstance(backend, SqliteBackend)
                    rows_at_start.append(backend.store.rows_loaded)
                    socket = SocketLikeTransport()
                    start = time.perf_counter()
                    await hub.connect("c7", socket, hello=Hello("c7", 0))
                    first_connect.append(time.perf_counter() - start)
                    loaded_by_connect.append(backend.store.rows_loaded)
            finally:
                # Nothing delivered is acked: the backlog stays for the next round.
                await hub.shutdown(timeout=0.1, flush=False)
    return {
        "pending": backlog,
        "fill_s": round(fill_s, 1),
        "file_mb": round(size / 1e6, 1),
        "bytes_per_pending": round(size / max(1, backlog), 1),
        "start_ms": {k: round(statistics.median(v) * 1000, 2) for k, v in starts.items()},
        "rows_read_at_start": max(rows_at_start),
        "first_v1_connect_ms": round(statistics.median(first_connect) * 1000, 2),
        "rows_read_by_first_connect": max(loaded_by_connect),
    }


SIZES = {
    "offline": 10_000,
    "producers_v1": 10_000,
    "broadcast": 20,
    "broadcast_v1": 24,
    "channel_publish": 10_000,
}


async def main(rounds: int, backlog: int, sync: str) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="tether-sqlite-mode-"))
    results: dict[str, Any] = {
        "clients": CLIENTS,
        "producer_tasks": PRODUCERS,
        "rounds": rounds,
        "synchronous": sync,
    }
    try:
        for scenario, size in SIZES.items():
            runs: dict[str, list[dict[str, float]]] = {"memory": [], "sqlite": []}
            for _ in range(rounds):  # alternate, so drift on a noisy machine hits both alike
                runs["memory"].append(await _one("memory", workdir, scenario, size, sync))
                runs["sqlite"].append(await _one("sqlite", workdir, scenario, size, sync))
            medians = {k: statistics.median(r["per_s"] for r in v) for k, v in runs.items()}
            entry: dict[str, Any] = {f"{k}_per_s": round(v) for k, v in medians.items()}
            # Each round's ratio compares two adjacent runs (the same machine load); their
            # median is the figure to read on a shared machine.
            ratios = [
                s["per_s"] / m["per_s"] for s, m in zip(runs["sqlite"], runs["memory"], strict=True)
            ]
            entry["sqlite_vs_memory"] = round(statistics.median(ratios), 3)
            entry["ratio_of_medians"] = round(medians["sqlite"] / medians["memory"], 3)
            entry["ratios"] = [round(r, 2) for r in ratios]
            entry["sqlite_rejected"] = sum(r["rejected"] for r in runs["sqlite"])
            sizes = [r["bytes_per_pending"] for r in runs["sqlite"] if "bytes_per_pending" in r]
            if sizes:
                entry["file_bytes_per_pending"] = round(statistics.median(sizes), 1)
            results[scenario] = entry
        results["startup"] = await _startup(workdir, backlog, sync, rounds)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return results


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--backlog", type=int, default=1_000_000)
    parser.add_argument("--synchronous", choices=("FULL", "NORMAL"), default="NORMAL")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.rounds, args.backlog, args.synchronous)), indent=2))
