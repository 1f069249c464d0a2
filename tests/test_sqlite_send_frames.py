"""A critical send waiting for its SQLite group commit suspends a short chain of coroutine frames (each one is suspended and resumed per send), and still answers QUEUED only once stored."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import CoroutineType
from typing import Any

from test_sqlite_backend import grow
from test_sqlite_store import tmpfs
from tether import Hub, HubConfig, SendStatus


def suspended_frames(task: asyncio.Task[Any]) -> list[str]:
    """The coroutines a suspended task's await chain goes through, outermost first."""
    names: list[str] = []
    awaited: Any = task.get_coro()
    while isinstance(awaited, CoroutineType):
        names.append(awaited.cr_code.co_name)
        awaited = awaited.cr_await
    return names


async def test_a_stored_send_waits_in_two_coroutine_frames(tmp_path: Path) -> None:
    """A performance guard, on purpose tied to the implementation: each frame a waiting
    send suspends in is resumed for every commit (see docs/benchmarks.md, SQLite)."""
    hub = Hub(HubConfig(backend="sqlite", sqlite_path=str(tmp_path / "tether.db")))
    try:
        first = await hub.send("alice", {"n": 0}, critical=True)  # loads the stream
        assert first.status is SendStatus.QUEUED
        task = asyncio.ensure_future(hub.send("alice", {"n": 1}, critical=True))
        await asyncio.sleep(0)  # the send runs up to its wait for the commit
        assert not task.done()
        # Hub.send and the pipeline's accept step; not also the pipeline's deliver and
        # the backend's append (4 frames before).
        frames = suspended_frames(task)
        assert frames == ["send", "_accept"], frames
        result = await task
        assert result.status is SendStatus.QUEUED
        assert result.seq == 2
        assert await hub.stored_pending("alice") == 2  # committed before QUEUED
    finally:
        await hub.shutdown(timeout=1.0)


async def test_a_best_effort_send_still_goes_through_deliver(tmp_path: Path) -> None:
    hub = Hub(HubConfig(backend="sqlite", sqlite_path=str(tmp_path / "tether.db")))
    try:
        result = await hub.send("bob", {"n": 0})
        assert result.status is SendStatus.DROPPED  # not connected: best-effort is dropped
        assert await hub.stored_pending("bob") == 0
    finally:
        await hub.shutdown(timeout=1.0)


async def test_a_failed_commit_is_rejected_and_counted_once_per_sender(tmp_path: Path) -> None:
    """The commit's failure reaches every sender waiting on it (REJECTED: nothing stored)
    and the backend's health; a later commit that succeeds makes it healthy again."""
    with tmpfs(tmp_path / "small", "size=256k") as directory:
        hub = Hub(HubConfig(backend="sqlite", sqlite_path=str(directory / "tether.db")))
        backend = hub.backend
        try:
            await hub.send("kim", {"n": 0}, critical=True)
            assert backend.describe()["healthy"] is True
            results = []
            for n in range(200):
                sends = [
                    hub.send(f"kim{i}", {"n": n, "pad": "x" * 2000}, critical=True)
                    for i in range(4)
                ]
                results = await asyncio.gather(*sends)
                if any(r.status is SendStatus.REJECTED for r in results):
                    break
            rejected = [r for r in results if r.status is SendStatus.REJECTED]
            assert rejected, "the 256 KiB file system never filled up"
            assert all("disk is full" in (r.reason or "") for r in rejected)
            info = backend.describe()
            assert info["healthy"] is False
            assert info["errors"] == len(rejected)
            grow(directory, "4m")
            again = await hub.send("kim", {"n": 1}, critical=True)
            assert again.status is SendStatus.QUEUED
            assert backend.describe()["healthy"] is True
        finally:
            await hub.shutdown(timeout=1.0)
