"""Channels through real sockets: subscribe, publish, recovery across cuts, loss counts, refusals."""

from __future__ import annotations

import asyncio
import base64
import random
import socket
import uuid
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect

from channel_support import CuttingProxy, ws_server
from conftest import REDIS_URL
from support import hello, recv_json, until
from tether import Hub, HubConfig
from tether.channels import Position, PublishStatus
from tether.client import Client, ClientState
from tether.clock import ManualClock
from tether.subscription import ChannelLost, Publication, Subscription, SubscriptionRefused

N = 2_000
CUTS = 24
WINDOW = 200  # the publisher stays at most this far ahead of the slower subscriber


MakeHub = Callable[..., Hub]


def hub_factory(kind: str, request: pytest.FixtureRequest) -> MakeHub:
    """`make(clock=None, **HubConfig fields)`: a hub whose channels live in memory, in a
    SQLite file of the test's own, or in Redis (one server, a 3-master Cluster, or a Sentinel-managed master) under a private
    key prefix (on one server, deleted after the test)."""

    def factory(clock: ManualClock | None = None, **values: Any) -> Hub:
        if kind == "sqlite":
            tmp_path = request.getfixturevalue("tmp_path")
            values.setdefault("sqlite_path", str(tmp_path / f"channels-{uuid.uuid4().hex[:8]}.db"))
            values.update(backend="sqlite")
        elif kind == "redis":
            prefix = request.getfixturevalue("redis_prefix")
            values.update(backend="redis", redis_url=REDIS_URL, redis_prefix=prefix)
        elif kind == "redis-sentinel":
            topology = request.getfixturevalue("shared_redis_sentinel")
            values.update(
                backend="redis",
                redis_url=REDIS_URL,
                redis_sentinels=topology.sentinels_setting,
                redis_sentinel_service=topology.service,
                redis_prefix=f"tether-test-{uuid.uuid4().hex[:12]}",
            )
        elif kind == "redis-cluster":
            seed = request.getfixturevalue("redis_cluster")
            prefix = f"tether-test-{uuid.uuid4().hex[:12]}"
            values.update(backend="redis", redis_url=seed, redis_cluster=True, redis_prefix=prefix)
        return Hub(HubConfig(**values), clock=clock)

    return factory


@pytest.fixture(
    params=[
        "memory",
        "sqlite",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("redis-cluster", marks=[pytest.mark.redis, pytest.mark.slow]),
        pytest.param("redis-sentinel", marks=[pytest.mark.redis, pytest.mark.slow]),
    ]
)
def make(request: pytest.FixtureRequest) -> MakeHub:
    """A hub factory on each store and Redis topology (see `hub_factory`)."""
    return hub_factory(str(request.param), request)


@pytest.fixture(params=["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def make_heavy(request: pytest.FixtureRequest) -> MakeHub:
    """For tests that store tens of MB: memory, and one Redis server whose keys are
    deleted right after (the topology-agnostic store code is the same)."""
    return hub_factory(str(request.param), request)


def fast_client(url: str, client_id: str, seed: int = 1) -> Client:
    return Client(
        url,
        client_id=client_id,
        backoff_base=0.001,
        backoff_max=0.01,
        ack_interval=0.005,
        rng=random.Random(seed),
    )


async def collect(sub: Subscription, into: list[Publication], count: int) -> None:
    async for pub in sub:
        into.append(pub)
        if len(into) == count:
            return


async def test_publish_reaches_subscribers_in_offset_order(make: MakeHub) -> None:
    hub = make()
    async with (
        hub,
        ws_server(hub) as srv,
        fast_client(srv.url, "alice") as alice,
        fast_client(srv.url, "bob") as bob,
    ):
        sa = await alice.subscribe("news")
        sb = await bob.subscribe("news")
        assert sa.offset == 0 and sa.epoch is not None
        results = [await hub.publish("news", {"n": n}) for n in range(1, 6)]
        assert [r.status for r in results] == [PublishStatus.PUBLISHED] * 5
        assert [r.offset for r in results] == [1, 2, 3, 4, 5]
        assert {r.epoch for r in results} == {sa.epoch}
        assert results[0].delivered == 2
        for sub in (sa, sb):
            got: list[Publication] = []
            await asyncio.wait_for(collect(sub, got, 5), 5)
            assert [p.offset for p in got] == [1, 2, 3, 4, 5]
            assert [p.data for p in got] == [{"n": n} for n in range(1, 6)]
            assert all(p.channel == "news" for p in got)


async def test_a_fresh_subscription_of_a_quiet_channel_is_recoverable(make: MakeHub) -> None:
    """Nothing published yet: the subscription still gets a position at once, and what is
    published while it is away is replayed when it comes back."""
    hub = make()
    async with (
        hub,
        ws_server(hub) as srv,
        CuttingProxy(srv.port) as proxy,
        fast_client(proxy.url, "alice") as alice,
    ):
        sub = await alice.subscribe("quiet")
        assert sub.epoch is not None and sub.offset == 0
        proxy.down = True
        proxy.cut()
        await until(lambda: not hub.is_connected("alice"))
        for n in range(1, 4):
            await hub.publish("quiet", n)
        proxy.down = False
        got: list[Publication] = []
        await asyncio.wait_for(collect(sub, got, 3), 10)
        assert [p.data for p in got] == [1, 2, 3]
        assert sub.lost == 0
        assert sub.last_subscribed is not None and sub.last_subscribed.recovered


@pytest.mark.slow
async def test_two_subscribers_get_every_message_once_in_order_across_cuts(make: MakeHub) -> None:
    hub = make()
    rng = random.Random(20261202)
    async with hub, ws_server(hub) as srv, CuttingProxy(srv.port) as proxy:
        clients = [fast_client(proxy.url, f"sub-{i}", seed=i) for i in range(2)]
        async with clients[0], clients[1]:
            subs = [await c.subscribe("ticks") for c in clients]
            received: list[list[Publication]] = [[], []]
            consumers = [
                asyncio.create_task(collect(s, r, N)) for s, r in zip(subs, received, strict=True)
            ]
            cut_points = set(rng.sample(range(50, N - 50), CUTS))

            def all_live() -> bool:
                # New links exist only once both clients noticed the last cut, so their
                # state and subscriptions are those of the new connections.
                return len(proxy.links) == 2 and all(
                    c.state is ClientState.CONNECTED and s.cursor.active
                    for c, s in zip(clients, subs, strict=True)
                )

            for n in range(1, N + 1):
                result = await hub.publish("ticks", {"n": n}, message_id=f"t{n}")
                assert result.status is PublishStatus.PUBLISHED and result.offset == n
                if n - min(len(r) for r in received) > WINDOW:
                    floor = n - WINDOW // 2
                    await until(lambda f=floor: min(len(r) for r in received) >= f, timeout=20)
                elif rng.random() < 0.2:
                    await asyncio.sleep(0)
                if n in cut_points:
                    await until(all_live, timeout=10)  # every cut really cuts both links
                    assert proxy.cut() >= 2
            done, _ = await asyncio.wait(consumers, timeout=30)
            assert len(done) == 2, [len(r) for r in received]
            for sub, got in zip(subs, received, strict=True):
                assert [p.offset for p in got] == list(range(1, N + 1))
                assert [p.data["n"] for p in got] == list(range(1, N + 1))
                assert sub.lost == 0
            assert proxy.cuts == CUTS
            assert all(c.reconnects >= CUTS for c in clients)
            assert hub.channels.counters.recoveries >= 2 * CUTS


async def test_a_subscriber_away_longer_than_the_history_is_told_exactly_what_it_lost(
    make: MakeHub,
) -> None:
    hub = make(channel_history_size=10)
    async with (
        hub,
        ws_server(hub) as srv,
        CuttingProxy(srv.port) as proxy,
        fast_client(proxy.url, "alice") as alice,
    ):
        sub = await alice.subscribe("news")
        losses: list[ChannelLost] = []
        sub.on_lost(losses.append)
        for n in range(1, 4):
            await hub.publish("news", n)
        got: list[Publication] = []
        await asyncio.wait_for(collect(sub, got, 3), 5)
        proxy.down = True
        proxy.cut()
        await until(lambda: not hub.is_connected("alice"))
        for n in range(4, 54):  # 50 messages while away; the history keeps the last 10
            await hub.publish("news", n)
        proxy.down = False
        await asyncio.wait_for(collect(sub, got, 13), 10)
        assert [p.data for p in got] == [1, 2, 3, *range(44, 54)]
        assert [p.offset for p in got[3:]] == list(range(44, 54))
        assert losses == [ChannelLost("news", 40, 3, False)]
        assert sub.lost == 40
        answer = sub.last_subscribed
        assert answer is not None
        assert (answer.recovered, answer.lost, answer.offset) == (False, 40, 53)
        assert hub.channels.counters.losses == 40


async def test_history_ttl_counts_expired_messages_as_lost(make: MakeHub) -> None:
    clock = ManualClock()
    hub = make(channel_history_ttl=60, clock=clock)
    async with (
        hub,
        ws_server(hub) as srv,
        CuttingProxy(srv.port) as proxy,
        fast_client(proxy.url, "alice") as alice,
    ):
        sub = await alice.subscribe("news")
        proxy.down = True
        proxy.cut()
        await until(lambda: not hub.is_connected("alice"))
        for n in range(1, 6):
            await hub.publish("news", n)
        clock.advance(61)  # those five expire
        await hub.publish("news", 6)
        proxy.down = False
        got: list[Publication] = []
        await asyncio.wait_for(collect(sub, got, 1), 10)
        assert [(p.offset, p.data) for p in got] == [(6, 6)]
        assert sub.lost == 5


async def test_an_unauthorized_subscribe_is_refused_and_the_connection_stays(make: MakeHub) -> None:
    hub = make()

    @hub.authorize_subscribe
    async def only_public(client_id: str, channel: str) -> bool:
        return channel.startswith("public.")

    async with hub, ws_server(hub) as srv, fast_client(srv.url, "mallory") as client:
        with pytest.raises(SubscriptionRefused) as refused:
            await client.subscribe("secret")
        assert refused.value.code == "forbidden"
        assert "secret" not in client.subscriptions
        assert hub.channels.counters.refused == 1
        assert client.state is ClientState.CONNECTED and client.reconnects == 0
        # the same connection still works: a message, and an allowed channel
        await hub.send("mallory", "still here", critical=True)
        msg = await asyncio.wait_for(anext(client), 5)
        assert msg.data == "still here"
        sub = await client.subscribe("public.news")
        await hub.publish("public.news", "hi")
        await hub.publish("secret", "not for mallory")
        pub = await asyncio.wait_for(anext(sub), 5)
        assert (pub.channel, pub.data) == ("public.news", "hi")
        assert hub.channels.subscribers("secret") == frozenset()
        assert client.reconnects == 0


async def test_refusal_on_the_wire_is_an_unsubscribed_frame_with_a_code(make: MakeHub) -> None:
    hub = make()

    @hub.authorize_subscribe
    async def nobody(client_id: str, channel: str) -> bool:
        return False

    async with (
        hub,
        ws_server(hub) as srv,
        connect(srv.url, subprotocols=["tether.v1"]) as ws,
    ):  # type: ignore[list-item]
        await hello(ws, "raw")
        await ws.send('{"type":"subscribe","channel":"x"}')
        frame = await recv_json(ws)
        assert frame["type"] == "unsubscribed" and frame["code"] == "forbidden"
        await ws.send('{"type":"subscribe","channel":"bad name"}')
        error = await recv_json(ws)
        assert error["type"] == "error" and error["code"] == "invalid_frame"


async def test_raw_frames_position_replay_and_dedup(make: MakeHub) -> None:
    hub = make()
    async with hub, ws_server(hub) as srv:
        first = await hub.publish("feed", {"id": "a", "v": 1})
        again = await hub.publish("feed", {"id": "a", "v": 1})
        assert again.status is PublishStatus.DUPLICATE and again.offset == first.offset == 1
        await hub.publish("feed", {"v": 2})
        async with connect(srv.url, subprotocols=["tether.v1"]) as ws:  # type: ignore[list-item]
            await hello(ws, "raw")
            since = {"epoch": first.epoch, "offset": 0}
            await ws.send(
                orjson.dumps({"type": "subscribe", "channel": "feed", "since": since}).decode()
            )
            subscribed = await recv_json(ws)
            assert subscribed == {
                "type": "subscribed",
                "channel": "feed",
                "epoch": first.epoch,
                "offset": 2,
                "recovered": True,
                "lost": 0,
                "after": 0,
                "reset": False,
            }
            one, two = await recv_json(ws), await recv_json(ws)
            assert (one["type"], one["offset"], one["id"], one["data"]) == (
                "pub",
                1,
                "a",
                {"id": "a", "v": 1},
            )
            assert (two["offset"], two["data"]) == (2, {"v": 2})
            await ws.send(
                '{"type":"subscribe","channel":"feed","since":{"epoch":"other","offset":7}}'
            )
            reset = await recv_json(ws)
            assert (reset["recovered"], reset["reset"], reset["after"]) == (False, True, 0)
            assert [(await recv_json(ws))["offset"] for _ in range(2)] == [1, 2]
            await ws.send('{"type":"unsubscribe","channel":"feed"}')
            assert (await recv_json(ws))["type"] == "unsubscribed"
            assert hub.channels.subscribers("feed") == frozenset()


async def test_history_and_presence(make: MakeHub) -> None:
    hub = make(channel_history_size=3)
    async with hub, ws_server(hub) as srv:
        for n in range(1, 6):
            await hub.publish("room", {"n": n})
        history = await hub.history("room")
        assert [m.offset for m in history] == [3, 4, 5]
        assert [m.data for m in history] == [{"n": 3}, {"n": 4}, {"n": 5}]
        assert [m.offset for m in await hub.history("room", since=3, limit=1)] == [4]
        assert [m.offset for m in await hub.history("room", since=Position("old", 4))] == [3, 4, 5]
        with pytest.raises(ValueError):
            await hub.history("no spaces")
        async with fast_client(srv.url, "alice") as alice, fast_client(srv.url, "bob") as bob:
            sa = await alice.subscribe("room", presence=True)
            joined: list[str] = []
            left: list[str] = []
            sa.on_join(joined.append)
            sa.on_leave(left.append)
            sb = await bob.subscribe("room")
            assert set(await hub.presence("room")) == {"alice", "bob"}
            await hub.publish("room", "ping")  # presence callbacks run as frames arrive
            await asyncio.wait_for(anext(sa), 5)
            assert joined == ["bob"]
            await sb.unsubscribe()
            await until(lambda: left == ["bob"])
            assert set(await hub.presence("room")) == {"alice"}
        await until(lambda: not hub.channels.subscribers("room"))
        assert await hub.presence("room") == {}


async def test_the_channel_listing_reports_each_channel_with_its_position(make: MakeHub) -> None:
    hub = make(channel_history_size=4)
    async with hub:
        names = [f"list-{n:02d}" for n in range(12)]  # spread over every Cluster node
        for index, name in enumerate(names):
            for n in range(index + 1):
                await hub.publish(name, {"n": n})
        listing = {c["name"]: c for c in await hub.channels.channels()}
        assert sorted(listing) == names
        for index, name in enumerate(names):
            assert listing[name]["offset"] == index + 1
            assert listing[name]["depth"] == min(index + 1, 4)
            assert listing[name]["subscribers"] == 0


async def test_server_side_subscribe_and_unsubscribe(make: MakeHub) -> None:
    hub = make()
    async with hub, ws_server(hub) as srv:
        assert not await hub.subscribe("nobody", "news")
        async with fast_client(srv.url, "alice") as alice:
            assert await hub.subscribe("alice", "news")
            await until(lambda: "news" in alice.subscriptions)
            sub = alice.subscriptions["news"]
            await hub.publish("news", "hello")
            assert (await asyncio.wait_for(anext(sub), 5)).data == "hello"
            assert await hub.unsubscribe("alice", "news")
            with pytest.raises(StopAsyncIteration):
                await asyncio.wait_for(anext(sub), 5)
            assert "news" not in alice.subscriptions


async def test_groups_and_channels_are_independent(make: MakeHub) -> None:
    hub = make()
    async with hub, ws_server(hub) as srv, fast_client(srv.url, "alice") as alice:
        hub.join("alice", "room")
        sub = await alice.subscribe("room")
        await hub.broadcast("group message", group="room", critical=True)
        await hub.publish("room", "channel message")
        assert (await asyncio.wait_for(anext(alice), 5)).data == "group message"
        assert (await asyncio.wait_for(anext(sub), 5)).data == "channel message"
        assert hub.members("room") == frozenset({"alice"})


async def test_publish_rejects_bad_input_with_a_reason(make: MakeHub) -> None:
    hub = make(max_message_size=100)
    async with hub:
        bad_name = await hub.publish("a b", 1)
        assert bad_name.status is PublishStatus.REJECTED and "channel name" in (
            bad_name.reason or ""
        )
        too_big = await hub.publish("ok", "x" * 200)
        assert too_big.status is PublishStatus.REJECTED and "max_message_size" in (
            too_big.reason or ""
        )
        unencodable = await hub.publish("ok", {1j})
        assert unencodable.status is PublishStatus.REJECTED
        assert hub.channels.counters.rejected == 3
        assert await hub.history("ok") == []
    after = await hub.publish("ok", 1)
    assert after.status is PublishStatus.REJECTED and after.reason == "shutting down"


class GatedTransport:
    """A transport that takes nothing at once and blocks every write until opened."""

    def __init__(self) -> None:
        self.frames: list[dict[str, object]] = []
        self.gate = asyncio.Event()

    def try_send(self, data: str | bytes) -> bool:
        return False

    async def send(self, data: str | bytes) -> None:
        await self.gate.wait()
        self.frames.append(orjson.loads(data))

    async def close(self, code: int = 1000, reason: str = "") -> None:
        return None


async def test_presence_events_reach_a_subscriber_whose_replay_is_still_being_written(
    make: MakeHub,
) -> None:
    hub = make()
    async with hub:
        first = await hub.publish("room", {"n": 1})
        for n in range(2, 6):
            await hub.publish("room", {"n": n})
        alice = GatedTransport()  # takes nothing until opened: the replay waits
        await hub.connect("alice", alice)
        assert await hub.subscribe("alice", "room", since=Position(first.epoch, 0), presence=True)
        bob = GatedTransport()
        bob.gate.set()
        await hub.connect("bob", bob)
        assert await hub.subscribe("bob", "room")
        assert await hub.unsubscribe("bob", "room")
        alice.gate.set()
        await until(lambda: len(alice.frames) >= 8)
        kinds = [(f["type"], f.get("offset", f.get("client_id"))) for f in alice.frames]
        assert kinds[0] == ("subscribed", 5)
        assert [k for k in kinds if k[0] == "pub"] == [("pub", n) for n in range(1, 6)]
        assert [k for k in kinds if k[0] in ("join", "leave")] == [
            ("join", "bob"),
            ("leave", "bob"),
        ]


async def test_slow_consumer_policy_ends_the_subscription_visibly(make: MakeHub) -> None:
    hub = make(channel_send_buffer=5)
    async with hub:
        transport = GatedTransport()
        await hub.connect("slow", transport)
        assert await hub.subscribe("slow", "news")
        await asyncio.sleep(0)  # the writer task takes the `subscribed` frame and blocks
        for n in range(1, 7):
            await hub.publish("news", n)
        assert hub.channels.counters.slow_consumers == 1
        assert hub.channels.subscribers("news") == frozenset()
        transport.gate.set()
        await until(lambda: len(transport.frames) == 2)
        subscribed, unsubscribed = transport.frames
        assert subscribed["type"] == "subscribed"
        assert unsubscribed == {
            "type": "unsubscribed",
            "channel": "news",
            "reason": "too far behind; resubscribe from your last offset",
            "code": "slow_consumer",
        }


@pytest.mark.slow
async def test_a_client_that_stops_reading_resumes_from_history_without_loss(
    make_heavy: MakeHub,
) -> None:
    count = 1_500
    hub = make_heavy(channel_send_buffer=50, channel_history_size=count, send_timeout=1.0)
    rng = random.Random(5)
    # ~60 MB of incompressible text: more than the loopback socket buffers hold
    pads = [base64.b64encode(rng.randbytes(30_000)).decode() for _ in range(16)]
    async with hub, ws_server(hub) as srv:
        client = Client(
            srv.url, client_id="lazy", max_buffer=10, backoff_base=0.001, backoff_max=0.01
        )
        async with client:
            sub = await client.subscribe("bulk")
            for n in range(1, count + 1):
                await hub.publish("bulk", {"n": n, "pad": pads[n % 16] + str(n)})
            assert hub.channels.counters.slow_consumers >= 1
            got: list[Publication] = []
            await asyncio.wait_for(collect(sub, got, count), 60)
            assert [p.data["n"] for p in got] == list(range(1, count + 1))
            assert sub.lost == 0 and sub.resubscribes + client.reconnects >= 1


async def test_a_replay_longer_than_the_send_buffer_is_paced_not_cut(make_heavy: MakeHub) -> None:
    # History is in the store: a resubscribe that misses more than `channel_send_buffer`
    # messages (each bigger than the socket takes at once) is written as the socket
    # drains, and a subscriber that reads is never cut as a slow consumer for it.
    count = 120
    hub = make_heavy(channel_send_buffer=8, channel_history_size=count, send_timeout=5.0)
    pad = base64.b64encode(random.Random(7).randbytes(60_000)).decode()
    async with hub, ws_server(hub) as srv:
        first = await hub.publish("big", {"n": 1, "pad": pad})
        for n in range(2, count + 1):
            await hub.publish("big", {"n": n, "pad": pad})
        async with fast_client(srv.url, "reader") as client:
            sub = await client.subscribe("big", since=(first.epoch, 0))
            got: list[Publication] = []
            await asyncio.wait_for(collect(sub, got, count), 60)
        assert [p.data["n"] for p in got] == list(range(1, count + 1))
        assert hub.channels.counters.slow_consumers == 0
        assert sub.lost == 0


async def test_a_connection_holds_a_bounded_number_of_subscriptions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tether.channels import service

    monkeypatch.setattr(service, "MAX_SUBSCRIPTIONS", 3)
    hub = Hub(HubConfig())
    async with hub, ws_server(hub) as srv, fast_client(srv.url, "greedy") as client:
        for name in ("a", "b", "c"):
            await client.subscribe(name)
        with pytest.raises(SubscriptionRefused) as refused:
            await client.subscribe("d")
        assert refused.value.code == "too_many_subscriptions"
        await client.subscriptions["a"].unsubscribe()
        await until(lambda: "a" not in hub.channels.subscriptions("greedy"))
        assert (await client.subscribe("d")).channel == "d"
        assert hub.channels.subscriptions("greedy") == frozenset({"b", "c", "d"})


async def test_a_signed_tokens_channel_grants_limit_what_it_may_subscribe() -> None:
    import time

    from websockets.asyncio.server import serve

    from tether.auth import sign_token, signed_token_authenticator
    from tether.transports import websockets as tw

    secret = "a-secret-of-32-characters-at-least"
    hub = Hub(HubConfig())
    expiry = time.time() + 3600
    handler = tw.handler(hub, authenticate=signed_token_authenticator(secret))
    async with hub, serve(handler, "127.0.0.1", 0, **tw.server_options(hub)) as server:
        url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        rooms_only = sign_token(secret, "alice", expiry, channels=["room.*", "news"])
        nothing = sign_token(secret, "bob", expiry, channels=[])
        anything = sign_token(secret, "carol", expiry)
        async with (
            Client(url, client_id="alice", token=rooms_only) as alice,
            Client(url, client_id="bob", token=nothing) as bob,
            Client(url, client_id="carol", token=anything) as carol,
        ):
            assert (await alice.subscribe("room.42")).channel == "room.42"
            assert (await alice.subscribe("news")).channel == "news"
            for client, channel in ((alice, "admin"), (alice, "newsroom"), (bob, "news")):
                with pytest.raises(SubscriptionRefused) as refused:
                    await client.subscribe(channel)
                assert refused.value.code == "forbidden"
            assert (await carol.subscribe("admin")).channel == "admin"
            assert alice.reconnects == bob.reconnects == 0
    with pytest.raises(ValueError):
        sign_token(secret, "alice", expiry, channels=["bad name"])


async def test_with_redis_down_publish_is_rejected_with_a_reason_and_history_raises() -> None:
    from tether.backends import BackendError

    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    hub = Hub(HubConfig(backend="redis", redis_url=f"redis://127.0.0.1:{port}/0"))
    async with hub:
        result = await hub.publish("news", {"id": "n1"})
        assert result.status is PublishStatus.REJECTED  # the connection was never made
        assert (result.reason or "").startswith("backend unavailable")
        assert hub.channels.counters.rejected == 1
        with pytest.raises(BackendError):
            await hub.history("news")


async def test_a_refused_resubscribe_ends_the_subscription_it_would_replace(make: MakeHub) -> None:
    """The hooks now say no to a channel the connection is subscribed to: the refusal
    ends that subscription (and its presence), it does not go on delivering."""
    hub = make()
    allowed = {"payroll"}

    @hub.authorize_subscribe
    async def check(client_id: str, channel: str) -> bool:
        return channel in allowed

    async with hub, ws_server(hub) as srv, connect(srv.url, subprotocols=["tether.v1"]) as ws:  # type: ignore[list-item]
        await hello(ws, "alice")
        await ws.send('{"type":"subscribe","channel":"payroll"}')
        assert (await recv_json(ws))["type"] == "subscribed"
        assert set(await hub.presence("payroll")) == {"alice"}
        allowed.clear()  # access revoked
        await ws.send('{"type":"subscribe","channel":"payroll"}')
        refused = await recv_json(ws)
        assert (refused["type"], refused["code"]) == ("unsubscribed", "forbidden")
        assert hub.channels.subscriptions("alice") == frozenset()
        assert await hub.presence("payroll") == {}
        assert (await hub.publish("payroll", {"salary": 1})).delivered == 0
        await hub.send("alice", "after", critical=False)  # the connection goes on, no pub
        assert (await recv_json(ws))["type"] == "msg"


async def test_a_token_refresh_that_narrows_the_grants_ends_the_subscriptions_no_longer_granted() -> (
    None
):
    from tether.auth import sign_token

    secret = "a-secret-of-32-characters-at-least"
    clock = ManualClock()
    hub = Hub(HubConfig(auth_secret=secret, retry_interval=3600), clock=clock)
    async with hub, ws_server(hub) as srv, connect(srv.url, subprotocols=["tether.v1"]) as ws:  # type: ignore[list-item]
        both = sign_token(secret, "alice", clock.wall() + 100, channels=["news", "payroll"])
        await hello(ws, "alice", token=both)
        for channel in ("news", "payroll"):
            await ws.send(orjson.dumps({"type": "subscribe", "channel": channel}).decode())
            assert (await recv_json(ws))["type"] == "subscribed"
        news_only = sign_token(secret, "alice", clock.wall() + 200, channels=["news"])
        await ws.send(orjson.dumps({"type": "auth", "token": news_only}).decode())
        ended = await recv_json(ws)
        assert (ended["type"], ended["channel"], ended["code"]) == (
            "unsubscribed",
            "payroll",
            "forbidden",
        )
        assert hub.channels.subscriptions("alice") == frozenset({"news"})
        assert await hub.presence("payroll") == {}
        assert (await hub.publish("payroll", {"salary": 123})).delivered == 0
        assert (await hub.publish("news", "still on")).delivered == 1
        pub = await recv_json(ws)
        assert (pub["type"], pub["channel"], pub["data"]) == ("pub", "news", "still on")


async def test_channels_only_named_in_subscribes_keep_nothing_in_memory() -> None:
    """The memory store keeps no stream for a channel nobody published to: subscribing to
    many names and leaving costs nothing, and a quiet channel stays recoverable — the
    epoch given at subscribe is the one its first publish creates the stream with."""
    hub = Hub(HubConfig(), clock=ManualClock())
    async with hub, ws_server(hub) as srv, connect(srv.url, subprotocols=["tether.v1"]) as ws:  # type: ignore[list-item]
        await hello(ws, "mallory")
        epochs = []
        for n in range(50):
            await ws.send(orjson.dumps({"type": "subscribe", "channel": f"junk-{n}"}).decode())
            subscribed = await recv_json(ws)
            assert (subscribed["offset"], subscribed["after"]) == (0, 0)
            epochs.append(subscribed["epoch"])
            if n == 0:  # while subscribed, the channel is listed
                assert [c["name"] for c in await hub.channels.channels()] == ["junk-0"]
            await ws.send(orjson.dumps({"type": "unsubscribe", "channel": f"junk-{n}"}).decode())
            assert (await recv_json(ws))["type"] == "unsubscribed"
        assert await hub.channels.channels() == []
        assert len(hub.channels.store._streams) == 0  # type: ignore[attr-defined]
        assert (await hub.channels.read("junk-0", 0, 10)) == ("", [])
        # Coming back to a quiet channel after three publishes: all three, nothing lost.
        for n in range(1, 4):
            assert (await hub.publish("junk-0", n)).epoch == epochs[0]
        since = {"epoch": epochs[0], "offset": 0}
        await ws.send(
            orjson.dumps({"type": "subscribe", "channel": "junk-0", "since": since}).decode()
        )
        subscribed = await recv_json(ws)
        assert (subscribed["recovered"], subscribed["reset"], subscribed["lost"]) == (
            True,
            False,
            0,
        )
        assert [(await recv_json(ws))["data"] for _ in range(3)] == [1, 2, 3]
