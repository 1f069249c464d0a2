"""Presence across a takeover between two nodes on one Redis: the client reconnects to
node B and subscribes there while its old connection on node A is ended later. A's
deferred leave must not take down (nor announce the end of) the presence B recorded."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from websockets.asyncio.client import connect

from channel_support import ws_server
from support import hello, recv_json
from test_channels import REDIS_URL
from test_channels_takeover import V1, settled, subscribe_frame
from tether import Hub, HubConfig
from tether.channels.redis_store import _PRESENCE, RedisChannelStore
from tether.channels.store import StoreEvents
from tether.clock import SystemClock

pytestmark = pytest.mark.redis


async def _ignore(*args: Any) -> None:
    return None


def node(prefix: str, name: str) -> Hub:
    return Hub(HubConfig(backend="redis", redis_url=REDIS_URL, redis_prefix=prefix, node_id=name))


async def test_a_leave_on_the_old_node_keeps_the_presence_recorded_by_the_new_one(
    redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = node(redis_prefix, "a"), node(redis_prefix, "b")
    # A's deferred leave of alice's old connection runs once B has recorded her (A learns
    # of the takeover late: its kick or the old socket's close is slow).
    recorded, left = asyncio.Event(), asyncio.Event()
    original_left = a.channels._left

    async def late_left(channel: str, client_id: str) -> None:
        if client_id == "alice":
            await recorded.wait()
        try:
            await original_left(channel, client_id)
        finally:
            if client_id == "alice":
                left.set()

    monkeypatch.setattr(a.channels, "_left", late_left)
    async with (
        a,
        b,
        ws_server(a) as on_a,
        ws_server(b) as on_b,
        connect(on_a.url, subprotocols=V1) as carol,
        connect(on_b.url, subprotocols=V1) as bob,
    ):
        for ws, name in ((carol, "carol"), (bob, "bob")):
            await hello(ws, name)
            await ws.send(subscribe_frame("news", presence=True))
            assert (await recv_json(ws))["type"] == "subscribed"
        assert await recv_json(carol) == {"type": "join", "channel": "news", "client_id": "bob"}
        old = await connect(on_a.url, subprotocols=V1)
        await hello(old, "alice")
        await old.send(subscribe_frame("news", presence=True))
        assert (await recv_json(old))["type"] == "subscribed"
        join = {"type": "join", "channel": "news", "client_id": "alice"}
        assert await recv_json(carol) == join  # from A itself
        assert await recv_json(bob) == join  # through Redis
        async with connect(on_b.url, subprotocols=V1) as new:
            await hello(new, "alice")  # alice reconnects to B
            await new.send(subscribe_frame("news", presence=True))
            assert (await recv_json(new))["type"] == "subscribed"
            recorded.set()
            await asyncio.wait_for(left.wait(), 5)  # A's leave has run
            await settled(b.channels)
            assert set(await b.presence("news")) == {"alice", "bob", "carol"}
            assert set(await a.presence("news")) == {"alice", "bob", "carol"}
            # A marker published on A after the leave: on A it follows any leave A
            # wrote, on B any leave A published (one pub/sub channel, in order).
            await a.publish("news", "marker")
            for ws in (carol, bob):
                seen = []
                while (frame := await recv_json(ws))["type"] != "pub":
                    seen.append(frame)
                assert seen == []  # alice never left
        leave = {"type": "leave", "channel": "news", "client_id": "alice"}
        assert await recv_json(carol) == leave  # she leaves B: announced everywhere
        assert await recv_json(bob) == leave
        assert set(await a.presence("news")) == {"bob", "carol"}
        await old.close()


async def test_the_old_node_neither_refreshes_nor_removes_an_entry_another_node_took_over(
    redis_prefix: str,
) -> None:
    config = HubConfig(backend="redis", redis_url=REDIS_URL, redis_prefix=redis_prefix)
    a = RedisChannelStore(config, SystemClock(), "a")
    b = RedisChannelStore(config, SystemClock(), "b")
    await a.start(StoreEvents(published=_ignore, presence=_ignore, resync=_ignore))
    await b.start(StoreEvents(published=_ignore, presence=_ignore, resync=_ignore))
    try:
        assert await a.presence_add("room", "alice", {"node": "a"}) is True
        assert await b.presence_add("room", "alice", {"node": "b"}) is False  # present
        # A's periodic refresh (claim "0") leaves B's entry alone.
        refresh = ["alice", a._expiry_ms(), '{"node":"a"}', a._keep_ms, "", "room", "a", 0]
        assert await a._eval("t", _PRESENCE, a._presence_keys("room"), refresh) == -1
        assert await a.presence("room") == {"alice": {"node": "b"}}
        assert await a.presence_remove("room", "alice") is False  # B holds it
        assert await a.presence("room") == {"alice": {"node": "b"}}
        await a.close()  # its courtesy leave skips the entry as well
        assert await b.presence("room") == {"alice": {"node": "b"}}
        assert await b.presence_remove("room", "alice") is True
        assert await b.presence("room") == {}
    finally:
        await a.close()
        await b.close()
