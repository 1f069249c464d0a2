"""Channels across a takeover: the client reconnected while its old connection lingers
(half-open TCP after a network drop). Frames the old connection still had queued must not
act on the new one, and presence must end up showing the client, announced once."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect

from channel_support import silent_v1, ws_server
from support import hello, hello_frame, recv_json, until
from test_channels import MakeHub, hub_factory
from tether import Hub, protocol
from tether.channels import Channels

V1: Any = ["tether.v1"]


@pytest.fixture(params=["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def make(request: pytest.FixtureRequest) -> MakeHub:
    """A hub factory on each store (see `test_channels.hub_factory`)."""
    return hub_factory(str(request.param), request)


def subscribe_frame(channel: str, *, presence: bool = False) -> str:
    return orjson.dumps({"type": "subscribe", "channel": channel, "presence": presence}).decode()


def handled_frames(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Record (frame type, channel) of each channel frame once the hub has handled it."""
    done: list[tuple[str, str]] = []
    original = hub.channel_frame

    async def traced(
        client_id: str,
        transport: Any,
        frame: protocol.Subscribe | protocol.Unsubscribe,
        grants: frozenset[str] | None = None,
    ) -> None:
        try:
            await original(client_id, transport, frame, grants)
        finally:
            done.append((type(frame).__name__, frame.channel))

    monkeypatch.setattr(hub, "channel_frame", traced)
    return done


async def settled(service: Channels) -> None:
    """Every task the channels service spawned (deferred presence changes) has run."""
    while service._tasks:
        await asyncio.gather(*list(service._tasks))


async def test_a_subscribe_held_in_a_hook_on_a_replaced_connection_leaves_the_new_one_alone(
    make: MakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = make()
    entered, release = asyncio.Event(), asyncio.Event()

    @hub.authorize_subscribe
    async def slow(client_id: str, channel: str) -> bool:
        if channel == "slow":  # e.g. a database lookup
            entered.set()
            await release.wait()
        return True

    handled = handled_frames(hub, monkeypatch)
    async with hub, ws_server(hub) as srv:
        old = await silent_v1(srv.port, [hello_frame("alice"), subscribe_frame("slow")])
        await asyncio.wait_for(entered.wait(), 5)
        async with connect(srv.url, subprotocols=V1) as new:
            await hello(new, "alice")  # takes over; the old connection waits in the hook
            await new.send(subscribe_frame("news"))
            assert (await recv_json(new))["type"] == "subscribed"
            release.set()
            await until(lambda: ("Subscribe", "slow") in handled)
            assert hub.channels.subscriptions("alice") == frozenset({"news"})
            assert set(await hub.presence("news")) == {"alice"}
            result = await hub.publish("news", "hi")
            assert result.delivered == 1
            pub = await recv_json(new)
            assert (pub["type"], pub["channel"], pub["data"]) == ("pub", "news", "hi")
        old.close()


async def test_a_late_unsubscribe_of_a_replaced_connection_does_not_end_the_new_subscription(
    make: MakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = make()
    entered, gate = asyncio.Event(), asyncio.Event()

    @hub.on_message
    async def held(client_id: str, data: Any) -> None:
        entered.set()
        await gate.wait()

    handled = handled_frames(hub, monkeypatch)
    async with hub, ws_server(hub) as srv:
        old = await silent_v1(
            srv.port,
            [
                hello_frame("alice"),
                subscribe_frame("news"),
                '{"type":"publish","data":"x"}',
                '{"type":"unsubscribe","channel":"news"}',
            ],
        )
        await asyncio.wait_for(entered.wait(), 5)  # its unsubscribe waits behind the handler
        async with connect(srv.url, subprotocols=V1) as new:
            await hello(new, "alice")
            await new.send(subscribe_frame("news"))
            assert (await recv_json(new))["type"] == "subscribed"
            gate.set()
            await until(lambda: ("Unsubscribe", "news") in handled)
            assert hub.channels.subscribers("news") == frozenset({"alice"})
            result = await hub.publish("news", "hello")
            assert result.delivered == 1
            frame = await recv_json(new)  # no `unsubscribed` meant for the old socket
            assert (frame["type"], frame["data"]) == ("pub", "hello")
        old.close()


async def test_presence_after_a_takeover_shows_the_client_and_announces_it_once(
    make: MakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = make()
    handled = handled_frames(hub, monkeypatch)
    async with hub, ws_server(hub) as srv, connect(srv.url, subprotocols=V1) as bob:
        await hello(bob, "bob")
        await bob.send(subscribe_frame("news", presence=True))
        assert (await recv_json(bob))["type"] == "subscribed"
        old = await silent_v1(
            srv.port, [hello_frame("alice"), subscribe_frame("news", presence=True)]
        )
        assert await recv_json(bob) == {"type": "join", "channel": "news", "client_id": "alice"}
        async with connect(srv.url, subprotocols=V1) as new:
            await hello(new, "alice")  # alice reconnects; the old connection lingers
            await new.send(subscribe_frame("news", presence=True))
            assert (await recv_json(new))["type"] == "subscribed"
            await until(lambda: handled.count(("Subscribe", "news")) == 3)
            await settled(hub.channels)  # the old connection's deferred leave has run
            assert set(await hub.presence("news")) == {"alice", "bob"}
            assert hub.channels.subscribers("news") == frozenset({"alice", "bob"})
            await hub.publish("news", "marker")
            seen = []
            while (frame := await recv_json(bob))["type"] != "pub":
                seen.append(frame)
            assert seen == []  # not join, leave: alice never left
        old.close()


async def test_a_takeover_subscribe_that_fails_at_the_store_leaves_no_ghost_presence() -> None:
    """The old connection's deferred leave runs while the new connection's subscribe waits
    for the store (and skips: the client looks subscribed); when the store then fails,
    the failed subscribe must take the presence down itself."""
    from tether.backends.base import BackendError
    from tether.channels.store import MemoryChannelStore
    from tether.clock import ManualClock
    from tether.config import HubConfig

    class Frames:
        def __init__(self) -> None:
            self.frames: list[dict[str, Any]] = []

        async def send(self, data: str | bytes) -> None:
            self.frames.append(orjson.loads(data))

        def try_send(self, data: str | bytes) -> bool:
            self.frames.append(orjson.loads(data))
            return True

    class FailingStore(MemoryChannelStore):
        gate: asyncio.Event | None = None
        entered = asyncio.Event()

        async def recover(self, channel: str, since: Any) -> Any:
            if self.gate is not None:
                self.entered.set()
                await self.gate.wait()  # a round trip that ends in a timeout
                raise BackendError("timeout")
            return await super().recover(channel, since)

    clock = ManualClock()
    store = FailingStore(100, 300, clock)
    current: dict[str, Any] = {}
    service = Channels(HubConfig(), clock, store=store, current=current.get)
    await service.start()
    bob, old, new = Frames(), Frames(), Frames()
    current.update(bob=bob, alice=old)
    await service.subscribe("bob", bob, "room", None, presence=True)
    await service.subscribe("alice", old, "room", None)
    await settled(service)
    current["alice"] = new  # alice reconnected; the old connection lingers half-open
    store.gate = asyncio.Event()
    attempt = asyncio.create_task(service.subscribe("alice", new, "room", None))
    await store.entered.wait()
    await settled(service)  # the old connection's deferred leave: skipped
    store.gate.set()
    with pytest.raises(Exception, match="backend unavailable"):
        await attempt
    await settled(service)
    assert service.subscriptions("alice") == frozenset()
    assert sorted(await service.presence("room")) == ["bob"]
    events = [(f["type"], f["client_id"]) for f in bob.frames if f["type"] in ("join", "leave")]
    assert events == [("join", "alice"), ("leave", "alice")]
    await service.close()
