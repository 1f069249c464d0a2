"""In-process hub fixtures for the hub-only benchmarks: a transport whose `send` discards."""

from __future__ import annotations

from tether import Hub


class NullTransport:
    """A `tether.Transport` that accepts every frame and keeps only a count."""

    __slots__ = ("closed", "frames")

    def __init__(self) -> None:
        self.frames = 0
        self.closed = False

    async def send(self, data: str | bytes) -> None:
        self.frames += 1

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.closed = True


async def connect_many(hub: Hub, count: int, prefix: str = "c") -> list[str]:
    """Connect `count` clients in plain mode through NullTransports; returns their ids."""
    ids = [f"{prefix}{i}" for i in range(count)]
    for cid in ids:
        await hub.connect(cid, NullTransport())
    return ids
