"""MockWebSocket: an in-memory `tether.Transport` with latency, seeded failures and stalls."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import orjson

from ..clock import Clock
from ..transports.base import TransportClosed


class MockSendError(ConnectionError):
    """The failure a MockWebSocket injects into `send` (a delivery failure, not a close)."""


class MockWebSocket:
    """A fake connection that records what it was sent.

    - `latency`: seconds each send takes (on `clock` if given, else real time);
    - `failure_rate` with `seed`: each send fails with that probability, reproducibly;
    - `fail_next(n)`: the next n sends fail;
    - `stall()` / `unstall()`: sends hang, like a client that stopped reading;
    - `drop()`: the peer went away; sends raise `TransportClosed`;
    - `inject(data)` / `incoming()`: frames the fake client sends to the server.
    """

    def __init__(
        self,
        *,
        latency: float = 0.0,
        failure_rate: float = 0.0,
        seed: int | None = None,
        clock: Clock | None = None,
        name: str = "mock",
    ) -> None:
        if not 0.0 <= failure_rate <= 1.0:
            raise ValueError("failure_rate must be within [0, 1]")
        self.name = name
        self.latency = latency
        self.failure_rate = failure_rate
        self.clock = clock
        self.sent: list[str | bytes] = []
        self.attempts = 0
        self.failures = 0
        self.closed = False
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self._rng = random.Random(seed)
        self._fail_next = 0
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._incoming: asyncio.Queue[str | bytes | None] = asyncio.Queue()

    def __repr__(self) -> str:
        return f"<MockWebSocket {self.name} sent={len(self.sent)} closed={self.closed}>"

    async def send(self, data: str | bytes) -> None:
        self.attempts += 1
        if self.closed:
            raise TransportClosed(f"{self.name} is closed")
        await self._flowing.wait()
        if self.latency:
            await (self.clock.sleep(self.latency) if self.clock else asyncio.sleep(self.latency))
        if self.closed:
            raise TransportClosed(f"{self.name} is closed")
        if self._fail_next:
            self._fail_next -= 1
            self.failures += 1
            raise MockSendError(f"{self.name}: injected failure")
        if self.failure_rate and self._rng.random() < self.failure_rate:
            self.failures += 1
            raise MockSendError(f"{self.name}: random failure")
        self.sent.append(data)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if not self.closed:
            self.closed = True
            self.close_code = code
            self.close_reason = reason
        self._flowing.set()
        self._incoming.put_nowait(None)

    def fail_next(self, count: int = 1) -> None:
        self._fail_next += count

    def stall(self) -> None:
        self._flowing.clear()

    def unstall(self) -> None:
        self._flowing.set()

    def drop(self) -> None:
        """The peer disappears without a close handshake."""
        self.closed = True
        self._flowing.set()
        self._incoming.put_nowait(None)

    def inject(self, data: str | bytes) -> None:
        self._incoming.put_nowait(data)

    async def incoming(self) -> Any:
        """Async-iterate the frames injected with `inject`, until closed."""
        while (item := await self._incoming.get()) is not None:
            yield item

    # --- reading what was sent

    @property
    def payloads(self) -> list[Any]:
        """What was sent, JSON-decoded where it parses (plain mode)."""
        out: list[Any] = []
        for frame in self.sent:
            try:
                out.append(orjson.loads(frame))
            except orjson.JSONDecodeError:
                out.append(frame)
        return out

    @property
    def frames(self) -> list[dict[str, Any]]:
        """What was sent, as tether.v1 frames (JSON objects)."""
        return [orjson.loads(frame) for frame in self.sent]

    def data(self) -> list[Any]:
        """The `data` of every tether.v1 `msg` frame sent, in order."""
        return [f["data"] for f in self.frames if f.get("type") == "msg"]

    def seqs(self) -> list[int]:
        """The `seq` of every critical tether.v1 `msg` frame sent, in order."""
        return [f["seq"] for f in self.frames if f.get("type") == "msg" and "seq" in f]
