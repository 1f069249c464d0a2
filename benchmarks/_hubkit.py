"""In-process hub fixtures for the hub-only benchmarks: transports that discard what they get."""

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


class SocketLikeTransport(NullTransport):
    """A `NullTransport` that also takes every frame synchronously, as the `websockets`
    adapter's `try_send` does when the socket can take it: the hub's real hot path (no
    send task, no timeout), so the figures are the hub's and the backend's."""

    __slots__ = ()

    def try_send(self, data: str | bytes) -> bool:
        self.frames += 1
        return True


async def connect_many(hub: Hub, count: int, prefix: str = "c") -> list[str]:
    """Connect `count` clients in plain mode through NullTransports; returns their ids."""
    ids = [f"{prefix}{i}" for i in range(count)]
    for cid in ids:
        await hub.connect(cid, NullTransport())
    return ids
