"""Redis presence: a leave that overtakes the periodic refresh of the same entry sticks."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tether import HubConfig
from tether.channels.redis_store import RedisChannelStore
from tether.channels.store import StoreEvents
from tether.clock import SystemClock

pytestmark = pytest.mark.redis


async def _ignore(*args: Any) -> None:
    return None


async def test_a_leave_during_an_in_flight_refresh_is_not_undone(
    redis_url: str, redis_prefix: str
) -> None:
    config = HubConfig(
        backend="redis", redis_url=redis_url, redis_prefix=redis_prefix, presence_ttl=1.5
    )
    store = RedisChannelStore(config, SystemClock(), "a")
    evals = store._eval
    refresh_started = asyncio.Event()
    removed = asyncio.Event()
    pass_over = asyncio.Event()
    flush_index = store._flush_index

    async def interleaved(what: str, *args: Any) -> Any:
        # The refresh's call reaches Redis only after the leave has been written: the
        # order two calls on different pooled connections can take.
        if what == "presence refresh":
            refresh_started.set()
            await removed.wait()
        return await evals(what, *args)

    async def end_of_pass() -> None:
        await flush_index()
        if removed.is_set():
            pass_over.set()  # the refresh pass that raced the leave has finished

    store._eval = interleaved  # type: ignore[method-assign]
    store._flush_index = end_of_pass  # type: ignore[method-assign]
    await store.start(StoreEvents(published=_ignore, presence=_ignore, resync=_ignore))
    try:
        await store.presence_add("room", "alice", {"n": 1})
        await asyncio.wait_for(refresh_started.wait(), 10)
        await store.presence_remove("room", "alice")
        removed.set()
        await asyncio.wait_for(pass_over.wait(), 10)
        assert await store.presence("room") == {}  # long before the entry would expire
    finally:
        await store.close()
