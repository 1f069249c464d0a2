"""Time sources: the real clock, and a manual clock that tests advance instead of sleeping."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Protocol, runtime_checkable


@runtime_checkable
class Clock(Protocol):
    """What every time-dependent part of Tether reads time from.

    `now()` is monotonic seconds (for deadlines and ages); `wall()` is epoch seconds
    (for display). `sleep()` waits on this clock, so background loops follow a manual
    clock in tests.
    """

    def now(self) -> float: ...

    def wall(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clock: `time.monotonic`, `time.time` and `asyncio.sleep`."""

    __slots__ = ()

    def now(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class ManualClock:
    """A clock that only moves when told to.

    `advance(seconds)` moves time forward and wakes every `sleep()` whose deadline has
    passed, so a test can run an hour of retry and cleanup cycles in microseconds.
    """

    def __init__(self, start: float = 1000.0, *, wall_start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._wall_offset = wall_start - start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._counter = itertools.count()

    def now(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._now + self._wall_offset

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._counter), future))
        await future

    def set(self, value: float) -> None:
        """Jump to an absolute time (never backwards)."""
        if value < self._now:
            raise ValueError("a ManualClock never goes backwards")
        self._now = value
        self._wake()

    def advance(self, seconds: float) -> None:
        """Move time forward by `seconds` and wake the sleepers that are now due."""
        if seconds < 0:
            raise ValueError("a ManualClock never goes backwards")
        self.set(self._now + seconds)

    @property
    def sleepers(self) -> int:
        """How many tasks are waiting on this clock (useful to know a loop is idle)."""
        return sum(1 for *_, f in self._sleepers if not f.done())

    def _wake(self) -> None:
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, future = heapq.heappop(self._sleepers)
            if not future.done():
                future.set_result(None)
