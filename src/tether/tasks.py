"""A hub's background work: its periodic loops and fire-and-forget tasks, stopped together."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from .clock import Clock
from .transports.base import Transport

log = logging.getLogger("tether")


class BackgroundTasks:
    """Runs the hub's loops and stray tasks; `stop` cancels all of them."""

    __slots__ = ("_clock", "loops", "stray")

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self.loops: list[asyncio.Task[None]] = []
        self.stray: set[asyncio.Task[Any]] = set()

    def spawn(self, coroutine: Awaitable[Any]) -> None:
        """Run `coroutine` without waiting for it (cancelled by `stop`)."""
        task = asyncio.ensure_future(coroutine)
        self.stray.add(task)
        task.add_done_callback(self.stray.discard)

    def every(self, interval: float, cycle: Callable[[], Awaitable[int]], name: str) -> None:
        """Run `cycle` every `interval` seconds of the hub's clock until `stop`."""
        self.loops.append(asyncio.create_task(self._loop(cycle, interval), name=name))

    async def _loop(self, cycle: Callable[[], Awaitable[int]], interval: float) -> None:
        while True:
            await self._clock.sleep(interval)
            try:
                await cycle()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bad cycle must never kill the loop
                log.exception("tether background cycle %s failed", cycle.__name__)

    def close_later(self, transport: Transport, code: int, reason: str) -> None:
        """Close a connection in the background (the caller holds a client's lock)."""
        self.spawn(close_quietly(transport, code, reason))

    async def stop(self) -> int:
        """Cancel the loops, then the stray tasks. Returns how many loops were running."""
        stopped = 0
        for task in self.loops:
            if not task.done():
                task.cancel()
                stopped += 1
        await asyncio.gather(*self.loops, return_exceptions=True)
        self.loops = []
        for task in list(self.stray):
            task.cancel()
        await asyncio.gather(*self.stray, return_exceptions=True)
        return stopped


async def close_quietly(transport: Transport, code: int, reason: str) -> None:
    """Close a connection; a peer that is already gone is not an error."""
    try:
        await transport.close(code, reason)
    except Exception as exc:
        log.debug("tether: close(%s) failed: %r", code, exc)
