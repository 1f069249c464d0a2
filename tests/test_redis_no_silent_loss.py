"""Redis mode never loses an accepted message silently: vanished streams, big broadcasts, lost replies, shutdown counts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from websockets.asyncio.server import serve

from redis_server import OwnRedis, ReplyDropper
from support import until
from tether import Client, Hub, HubConfig, SendStatus
from tether.backends.redis import _LUA, RedisBackend
from tether.backends.redis_batch import PIPELINE_ITEMS
from tether.client import Lost
from tether.clock import Clock, ManualClock
from tether.protocol import Hello
from tether.testing import MockWebSocket
from tether.transports import websockets as tw

pytestmark = pytest.mark.redis

Factory = Callable[..., Hub]


@pytest.fixture
def own_redis() -> Iterator[OwnRedis]:
    server = OwnRedis("--maxclients", "64", "--enable-debug-command", "yes").start()
    try:
        yield server
    finally:
        server.close()


@pytest_asyncio.fixture
async def nodes(own_redis: OwnRedis) -> AsyncIterator[Factory]:
    """`nodes("a", **config)`: a Hub on the test-owned Redis (backend options via `backend=`)."""
    hubs: list[Hub] = []

    def factory(
        node_id: str, *, socket_timeout: float = 2.0, clock: Clock | None = None, **values: Any
    ) -> Hub:
        values.setdefault("presence_ttl", 5)
        config = HubConfig(
            backend="redis", redis_url=own_redis.url, redis_prefix="t", node_id=node_id, **values
        )
        backend = RedisBackend(
            own_redis.url, "t", node_id, config, clock=clock, socket_timeout=socket_timeout
        )
        hub = Hub(config, backend=backend, clock=clock)
        hubs.append(hub)
        return hub

    yield factory
    for hub in hubs:
        await hub.shutdown(timeout=1.0)


@pytest_asyncio.fixture
async def r(own_redis: OwnRedis) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(own_redis.url)
    yield client
    with contextlib.suppress(Exception):
        await client.aclose()


def frames(ws: MockWebSocket) -> list[dict[str, Any]]:
    return [json.loads(f) for f in ws.sent if isinstance(f, str)]


def msgs(ws: MockWebSocket) -> list[dict[str, Any]]:
    return [f for f in frames(ws) if f.get("type") == "msg"]


async def acked_fifty(hub: Hub, cid: str) -> str:
    """A tether.v1 client receives 50 critical messages, acks them and goes away; returns
    the epoch its welcome named."""
    ws = MockWebSocket()
    welcome = await hub.connect(cid, ws, hello=Hello(cid, 0))
    assert welcome is not None and welcome.epoch
    for n in range(50):
        assert (await hub.send(cid, {"n": n}, critical=True)).status is SendStatus.SENT
    assert [m["seq"] for m in msgs(ws)] == list(range(1, 51))
    assert await hub.ack(cid, 50) == 50
    await hub.disconnect(cid)
    return welcome.epoch


async def resume_and_check(hub: Hub, cid: str, epoch: str | None, count: int) -> None:
    """The client comes back from seq 50: it must be told of a reset (never resumed over a
    gap) and receive every queued message, renumbered after 50, in order."""
    ws = MockWebSocket()
    welcome = await hub.connect(cid, ws, hello=Hello(cid, 50, epoch=epoch))
    assert welcome is not None
    assert welcome.reset and not welcome.resumed, welcome
    assert welcome.acked == 50 and welcome.next_seq == 51 + count
    got = msgs(ws)
    assert [m["seq"] for m in got] == list(range(51, 51 + count))
    assert [m["data"] for m in got] == [{"late": n} for n in range(count)]
    assert hub.metrics.snapshot().to_dict()["streams"]["resets"] == 1


# ------------------------------------------------------------ 1. a stream vanishes


@pytest.mark.parametrize("with_epoch", [True, False], ids=["v1-client", "old-client"])
async def test_expired_stream_is_reset_not_resumed_over(
    nodes: Factory, r: aioredis.Redis, with_epoch: bool
) -> None:
    a = nodes("a", client_ttl=0.5, message_ttl=0.5)
    b = nodes("b", client_ttl=0.5, message_ttl=0.5)
    epoch = await acked_fifty(a, "x")
    meta = a.backend.keys.meta("x")  # type: ignore[attr-defined]
    for _ in range(400):  # the keys expire after client_ttl (Redis' own clock)
        if not await r.exists(meta):
            break
        await asyncio.sleep(0.01)
    assert not await r.exists(meta)
    await b.start()
    for n in range(100):  # through a node that holds no copy of x's stream
        result = await b.send("x", {"late": n}, critical=True, ttl=120)
        assert result.status is SendStatus.QUEUED, result
    await resume_and_check(a, "x", epoch if with_epoch else None, 100)


async def test_redis_restart_without_persistence_is_reset(
    nodes: Factory, own_redis: OwnRedis
) -> None:
    a, b = nodes("a"), nodes("b")
    epoch = await acked_fifty(a, "x")
    await b.start()
    own_redis.restart()
    for n in range(100):
        result = await b.send("x", {"late": n}, critical=True, message_id=f"late-{n}")
        for _ in range(20):  # the first write after a restart may fail; resend by id
            if result.status in (SendStatus.QUEUED, SendStatus.DUPLICATE):
                break
            await asyncio.sleep(0.05)
            result = await b.send("x", {"late": n}, critical=True, message_id=f"late-{n}")
        assert result.status is SendStatus.QUEUED, result
    await resume_and_check(a, "x", epoch, 100)


async def test_stream_vanishing_under_a_connected_client_is_reported(
    nodes: Factory, r: aioredis.Redis
) -> None:
    """x is connected to node b (real socket, real tether.Client); the producer posts to
    node a; the keys vanish mid-stream. x gets everything once, in order, and a reset."""
    a = nodes("a", presence_ttl=0.6)
    b = nodes("b", presence_ttl=0.6)
    await a.start()
    await b.start()
    handler = tw.handler(b)
    async with serve(handler, "127.0.0.1", 0, **tw.server_options(b)) as server:
        port = server.sockets[0].getsockname()[1]
        losses: list[Lost] = []
        received: list[Any] = []
        async with Client(f"ws://127.0.0.1:{port}", client_id="x", backoff_base=0.05) as client:
            client.on_lost(losses.append)

            async def read() -> None:
                async for message in client:
                    received.append(message.data)

            reader = asyncio.create_task(read())
            try:
                for n in range(20):
                    result = await a.send("x", {"n": n}, critical=True)
                    assert result.status is SendStatus.QUEUED
                await until(lambda: len(received) == 20, timeout=10)
                await r.flushall()
                for n in range(20, 50):
                    result = await a.send("x", {"n": n}, critical=True)
                    assert result.accepted, result
                await until(lambda: len(received) >= 50, timeout=15)
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
        assert received == [{"n": n} for n in range(50)]
        assert any(lost.reset for lost in losses)
        assert b.metrics.snapshot().to_dict()["streams"]["resets"] >= 1


# ------------------------------------------------------------ 2. broadcast to 1,000


async def test_critical_broadcast_to_a_thousand_clients_rejects_none(nodes: Factory) -> None:
    hub = nodes("a")
    mocks = [MockWebSocket() for _ in range(1000)]
    for i, ws in enumerate(mocks):
        await hub.connect(f"c{i}", ws)
    backend: RedisBackend = hub.backend  # type: ignore[assignment]
    for round_ in range(3):
        before = backend.describe()["pipelines"]
        result = await hub.broadcast({"round": round_}, critical=True)
        assert result.rejected == 0 and result.unknown == 0, result.reasons
        assert result.sent == 1000, result
        # batches store every copy: pipelines of PIPELINE_ITEMS copies (and a few more for
        # trims), not one round trip per client
        assert backend.describe()["pipelines"] - before <= 1000 // PIPELINE_ITEMS + 5
    for ws in mocks:
        assert ws.payloads == [{"round": n} for n in range(3)]


async def test_concurrent_producers_share_round_trips(nodes: Factory) -> None:
    hub = nodes("a")
    await hub.start()
    backend: RedisBackend = hub.backend  # type: ignore[assignment]
    before = backend.describe()["pipelines"]
    results = await asyncio.gather(
        *(hub.send(f"p{i}", {"i": i}, critical=True) for i in range(100))
    )
    assert all(r.status is SendStatus.QUEUED for r in results)
    assert backend.describe()["pipelines"] - before <= 4
    assert await backend.pending_counts([f"p{i}" for i in range(100)]) == 100


# ------------------------------------------------------------ 4. a reply that never came


async def test_lost_reply_is_unknown_and_a_resend_is_a_duplicate(own_redis: OwnRedis) -> None:
    """Redis runs the append but its replies are lost (a proxy swallows them): the
    producer is told the outcome is unknown (not REJECTED), with the id to resend with;
    the resend is a DUPLICATE and the client gets the message once."""
    proxy = await ReplyDropper(own_redis.port).start()
    config = HubConfig(
        backend="redis", redis_url=proxy.url, redis_prefix="t", node_id="a", presence_ttl=5
    )
    hub = Hub(config, backend=RedisBackend(proxy.url, "t", "a", config, socket_timeout=0.3))
    try:
        await hub.start()
        assert (await hub.send("warm", 0, critical=True)).accepted  # connections are open
        proxy.dropping = True
        result = await hub.send("y", {"text": "no id"}, critical=True)
        proxy.dropping = False
        assert result.status is SendStatus.UNKNOWN, result
        assert result.message_id and result.message_id in (result.reason or "")
        assert "unknown" in (result.reason or "")
        again = await hub.send("y", {"text": "no id"}, critical=True, message_id=result.message_id)
        assert again.status is SendStatus.DUPLICATE, again
        ws = MockWebSocket()
        await hub.connect("y", ws)
        assert ws.payloads == [{"text": "no id"}]
        assert hub.metrics.snapshot().to_dict()["streams"]["unknown"] == 1
    finally:
        await hub.shutdown(timeout=1.0)
        await proxy.close()


async def test_one_lost_reply_is_resolved_by_the_dedup_key(own_redis: OwnRedis) -> None:
    """Only the first reply is lost: the hub sends the append again, the dedup key says
    the first one was stored, and the producer gets QUEUED with its seq — no duplicate."""
    proxy = await ReplyDropper(own_redis.port).start()
    config = HubConfig(
        backend="redis", redis_url=proxy.url, redis_prefix="t", node_id="a", presence_ttl=5
    )
    backend = RedisBackend(proxy.url, "t", "a", config, socket_timeout=0.3)
    hub = Hub(config, backend=backend)
    try:
        await hub.start()
        assert (await hub.send("warm", 0, critical=True)).accepted  # connections are open
        proxy.dropping = True
        sending = asyncio.create_task(hub.send("z", "once", critical=True))
        await until(lambda: backend.errors >= 1, timeout=5)  # the first reply timed out
        proxy.dropping = False
        result = await sending
        assert result.status is SendStatus.QUEUED and result.seq == 1, result
        ws = MockWebSocket()
        await hub.connect("z", ws)
        assert ws.payloads == ["once"]
    finally:
        await hub.shutdown(timeout=1.0)
        await proxy.close()


async def test_an_unparsable_reply_to_a_stored_append_is_not_rejected(
    own_redis: OwnRedis,
) -> None:
    """The append ran but its reply cannot be parsed: the outcome is unknown, never
    REJECTED (a producer would resend and store it twice). The look-first resend finds
    it stored: QUEUED, stored once."""
    proxy = await ReplyDropper(own_redis.port).start()
    config = HubConfig(
        backend="redis", redis_url=proxy.url, redis_prefix="t", node_id="a", presence_ttl=5
    )
    backend = RedisBackend(proxy.url, "t", "a", config, socket_timeout=2.0)
    hub = Hub(config, backend=backend)
    r = aioredis.Redis.from_url(own_redis.url)
    try:
        await hub.start()
        assert (await hub.send("warm", 0, critical=True)).accepted  # connections are open
        proxy.corrupt_on = _LUA["append"].sha.encode()
        result = await hub.send("y", {"text": "once"}, critical=True)
        assert proxy.corrupt_on is None  # the reply was corrupted
        assert result.status is SendStatus.QUEUED and result.seq == 1, result
        assert await r.xlen(backend.keys.out("y")) == 1
    finally:
        await hub.shutdown(timeout=1.0)
        await proxy.close()
        await r.aclose()


async def test_a_resolved_append_rings_the_node_holding_the_client(
    own_redis: OwnRedis,
) -> None:
    """A's append reply is lost (unparsable) and the look-first resend settles it as
    stored: the node holding the client's connection (B) is rung all the same - else the
    message sits in Redis until some later event - and the producer is told it is
    delivered by B, not that the client is not connected."""
    proxy = await ReplyDropper(own_redis.port).start()
    hubs = []
    for node, url in (("a", proxy.url), ("b", own_redis.url)):
        config = HubConfig(
            backend="redis", redis_url=url, redis_prefix="t", node_id=node, presence_ttl=30
        )
        hubs.append(Hub(config, backend=RedisBackend(url, "t", node, config)))
    a, b = hubs
    try:
        for hub in hubs:
            await hub.start()
        ws = MockWebSocket()
        await b.connect("x", ws)
        assert (await a.send("x", {"m": 0}, critical=True)).accepted
        await until(lambda: len(ws.payloads) == 1, timeout=5)
        proxy.corrupt_on = _LUA["append"].sha.encode()
        result = await a.send("x", {"m": 1}, critical=True)
        assert proxy.corrupt_on is None  # the reply was corrupted
        assert result.status is SendStatus.QUEUED and result.seq == 2, result
        assert result.reason == "delivered by node b", result
        await until(lambda: len(ws.payloads) == 2, timeout=5)
        assert ws.payloads == [{"m": 0}, {"m": 1}]
    finally:
        for hub in hubs:
            await hub.shutdown(timeout=1.0)
        await proxy.close()


async def test_a_claim_whose_reply_is_lost_still_kicks_the_previous_holder(
    own_redis: OwnRedis,
) -> None:
    """x moves from node B to node A and the reply to A's claim is lost: the claim is run
    again, and the re-run must still name B (not A itself), so B closes its stale
    connection instead of writing the client's messages to it."""
    proxy = await ReplyDropper(own_redis.port).start()
    hubs = []
    for node, url in (("a", proxy.url), ("b", own_redis.url)):
        config = HubConfig(
            backend="redis", redis_url=url, redis_prefix="t", node_id=node, presence_ttl=30
        )
        hubs.append(Hub(config, backend=RedisBackend(url, "t", node, config)))
    a, b = hubs
    try:
        for hub in hubs:
            await hub.start()
        old = MockWebSocket()
        await b.connect("x", old)
        proxy.corrupt_on = _LUA["claim"].sha.encode()
        await a.connect("x", MockWebSocket())
        assert proxy.corrupt_on is None  # the first claim's reply was lost
        await until(lambda: old.closed, timeout=5)  # B was kicked
    finally:
        for hub in hubs:
            await hub.shutdown(timeout=1.0)
        await proxy.close()


async def test_a_send_without_a_free_connection_is_rejected(nodes: Factory) -> None:
    """Every connection of the pool is busy past the wait: the append never left this
    process, so it is REJECTED (certainly not stored), not UNKNOWN."""
    hub = nodes("a", socket_timeout=0.2, redis_max_connections=1)
    await hub.start()
    assert (await hub.send("warm", 0, critical=True)).accepted
    backend = hub.backend
    assert isinstance(backend, RedisBackend)
    pool = backend._r.connection_pool
    held = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        result = await hub.send("y", {"t": 1}, critical=True)
    finally:
        await pool.release(held)
    assert result.status is SendStatus.REJECTED, result
    assert "not sent" in (result.reason or "")
    assert await backend.pending_counts(["y"]) == 0


async def test_an_append_refused_over_maxmemory_is_rejected(
    nodes: Factory, r: aioredis.Redis
) -> None:
    """Over maxmemory (noeviction) Redis refuses the script before it writes anything
    (-OOM): REJECTED with the reason, not UNKNOWN."""
    hub = nodes("a")
    await hub.start()
    assert (await hub.send("warm", 0, critical=True)).accepted
    used = int((await r.info("memory"))["used_memory"])
    await r.config_set("maxmemory", str(used // 2))
    try:
        result = await hub.send("y", {"t": 1}, critical=True)
    finally:
        await r.config_set("maxmemory", "0")
    assert result.status is SendStatus.REJECTED, result
    assert "maxmemory" in (result.reason or "")
    assert await r.xlen(hub.backend.keys.out("y")) == 0  # type: ignore[attr-defined]


# ------------------------------------------------------------ 5. shutdown counts


async def test_shutdown_counts_what_redis_keeps(nodes: Factory) -> None:
    a = nodes("a")
    for i in range(5):
        for n in range(100):
            assert (await a.send(f"o{i}", n, critical=True)).status is SendStatus.QUEUED
    stats = await a.shutdown(timeout=1.0)
    assert stats.pending_messages_persisted == 500, stats
    assert stats.pending_messages_dropped == 0 and stats.pending_messages_flushed == 0
    b = nodes("b")
    for i in range(5):
        ws = MockWebSocket()
        await b.connect(f"o{i}", ws)
        assert ws.payloads == list(range(100))


# ------------------------------------------------------------ cluster views


async def test_stored_pending_and_dead_letters_are_the_cluster_view(nodes: Factory) -> None:
    """`pending`/`dead_letters` are this node's view; `stored_pending`/`stored_dead_letters`
    what the store holds for the client, whichever node accepted or dead-lettered it."""
    a, b = nodes("a", max_retries=1, failure_threshold=100), nodes("b")
    await b.start()
    for n in range(3):
        assert (await a.send("v", n, critical=True)).status is SendStatus.QUEUED
    assert b.pending("v") == 0 and await b.stored_pending("v") == 3
    failing = MockWebSocket(failure_rate=1.0)
    await a.connect("w", failing)
    await a.send("w", "poison", critical=True, message_id="p1")
    for _ in range(100):
        if a.dead_letters("w"):
            break
        await a.retry_now()
        await asyncio.sleep(0.02)
    assert [d.message_id for d in a.dead_letters("w")] == ["p1"]
    assert b.dead_letters("w") == []
    stored = await b.stored_dead_letters("w")
    assert [(d.message_id, d.data) for d in stored] == [("p1", "poison")]


# ------------------------------------------------------------ review findings


async def test_client_ids_cannot_name_each_others_keys(nodes: Factory) -> None:
    """Client ids may contain ':'; '#' ends the id in every key, so "a160:d:i"'s stream and
    "a160"'s dedup key for "m" are different keys, and neither send poisons the other."""
    hub = nodes("a")
    await hub.start()
    results = await asyncio.gather(
        hub.send("a160", "one", critical=True, message_id="m"),
        hub.send("a160:d:i", "two", critical=True),
    )
    assert [r.status for r in results] == [SendStatus.QUEUED, SendStatus.QUEUED], results
    assert await hub.stored_pending("a160") == 1
    assert await hub.stored_pending("a160:d:i") == 1


async def test_an_unstorable_ttl_is_refused_before_it_reaches_the_store(nodes: Factory) -> None:
    hub = nodes("a")
    await hub.start()
    for ttl in (1e20, float("inf"), float("nan")):
        result = await hub.send("t", "x", critical=True, ttl=ttl)
        assert result.status is SendStatus.REJECTED and "ttl" in (result.reason or "")
    assert (await hub.send("t", "ok", critical=True, ttl=60)).status is SendStatus.QUEUED


async def test_expired_messages_do_not_hold_places_in_a_full_stored_outbox(
    nodes: Factory,
) -> None:
    """Nobody mirrors an offline client's stream to expire it: the store drops what is past
    its TTL before applying the bound, and the hub counts it as expired, not dropped."""
    clock = ManualClock()
    hub = nodes("a", clock=clock, max_queue_size=2, overflow_policy="reject")
    await hub.start()
    for n in range(2):
        assert (await hub.send("e", n, critical=True, ttl=5)).status is SendStatus.QUEUED
    clock.advance(6)  # the hub's clock decides expiry, in the store's scripts too
    third = await hub.send("e", "fresh", critical=True)
    assert third.status is SendStatus.QUEUED, third
    messages = hub.metrics.snapshot().to_dict()["messages"]
    assert messages["expired"] == 2 and messages["dropped"] == 0 and messages["rejected"] == 0
    ws = MockWebSocket()
    await hub.connect("e", ws)
    assert ws.payloads == ["fresh"]


async def test_a_reset_skips_expired_messages_and_numbers_agree(nodes: Factory) -> None:
    """A resume the store cannot vouch for renumbers what it holds after last_seq: an
    expired message is not renumbered, so the hub and the store agree on every seq and
    the live message arrives once."""
    clock = ManualClock()
    a = nodes("a", clock=clock)
    await acked_fifty(a, "z")
    r = aioredis.Redis.from_url(a.config.redis_url)  # the keys vanish (as on expiry)
    try:
        await r.delete(a.backend.keys.meta("z"), a.backend.keys.out("z"))  # type: ignore[attr-defined]
    finally:
        await r.aclose()
    assert (await a.send("z", "short", critical=True, ttl=5)).status is SendStatus.QUEUED
    assert (await a.send("z", "live", critical=True, ttl=60)).status is SendStatus.QUEUED
    clock.advance(6)
    ws = MockWebSocket()
    welcome = await a.connect("z", ws, hello=Hello("z", 50))
    assert welcome is not None and welcome.reset
    got = msgs(ws)
    assert [m["data"] for m in got] == ["live"] and [m["seq"] for m in got] == [51]
    assert welcome.next_seq == 52
    assert await a.ack("z", 51) == 1
    assert (await a.send("z", "next", critical=True)).seq == 52
    assert [m["data"] for m in msgs(ws)] == ["live", "next"]


async def test_a_stale_copy_leaving_never_deletes_another_message_at_its_seq(
    nodes: Factory, r: aioredis.Redis
) -> None:
    """A node holds a copy of seq 1 when the client's keys vanish; another node stores a
    new message, seq 1 of the recreated stream. The stale copy expiring on the first
    node must not delete the new message, which nobody would count."""
    clock = ManualClock()
    a = nodes("a", clock=clock, retry_base_delay=100, retry_max_delay=100)
    b = nodes("b", clock=clock)
    await a.start()
    await b.start()
    ws = MockWebSocket()
    ws.fail_next(1)
    await a.connect("x", ws)
    assert (await a.send("x", "stale", critical=True, ttl=5)).status is SendStatus.QUEUED
    keys = a.backend.keys  # type: ignore[attr-defined]
    await r.delete(keys.out("x"), keys.meta("x"), keys.presence("x"))  # the keys vanish
    fresh = await b.send("x", "fresh", critical=True, ttl=600)
    assert fresh.status is SendStatus.QUEUED and fresh.seq == 1
    clock.advance(6)
    await a.retry_now()  # expires (and counts) its stale copy
    assert a.metrics.snapshot().to_dict()["messages"]["expired"] == 1
    assert await b.backend.pending_count("x") == 1
    assert [e[1][b"d"] for e in await r.xrange(keys.out("x"))] == [b"fresh"]


async def test_a_plain_clients_copies_are_stored_again_when_its_stream_is_recreated(
    nodes: Factory, r: aioredis.Redis
) -> None:
    """A plain-mode client has three messages queued on its node when its keys vanish: the
    next send finds the stream recreated and the connection is closed; the node's copies
    (the only ones left) are stored again in the new stream, in order, and delivered when
    the client is back, none dropped uncounted."""
    hub = nodes("a", retry_interval=60, retry_base_delay=60)
    await hub.start()
    ws = MockWebSocket()
    ws.fail_next(1)
    await hub.connect("x", ws)
    for n in range(3):
        assert (await hub.send("x", n, critical=True)).status is SendStatus.QUEUED
    keys = hub.backend.keys  # type: ignore[attr-defined]
    await r.delete(keys.out("x"), keys.meta("x"))  # the client's keys vanish
    assert (await hub.send("x", 3, critical=True)).status is SendStatus.QUEUED
    await until(lambda: ws.closed)
    again = MockWebSocket()
    await hub.connect("x", again)
    await until(lambda: len(again.payloads) == 4)
    # behind the send that found the stream recreated (stored first), the rest in order
    assert again.payloads == [3, 0, 1, 2]
    messages = hub.metrics.snapshot().to_dict()["messages"]
    assert messages["delivered"] == 4 and messages["dropped"] == 0


async def test_a_copy_that_cannot_be_stored_again_is_counted_dropped(
    nodes: Factory, r: aioredis.Redis
) -> None:
    """The recreated stream has no room for every copy the node held (overflow policy
    reject): the copy that does not fit is counted dropped (and logged), not lost silently."""
    hub = nodes(
        "a", retry_interval=60, retry_base_delay=60, max_queue_size=2, overflow_policy="reject"
    )
    await hub.start()
    ws = MockWebSocket()
    ws.fail_next(1)
    await hub.connect("x", ws)
    for n in range(2):
        assert (await hub.send("x", n, critical=True)).status is SendStatus.QUEUED
    keys = hub.backend.keys  # type: ignore[attr-defined]
    await r.delete(keys.out("x"), keys.meta("x"))
    assert (await hub.send("x", 2, critical=True)).status is SendStatus.QUEUED
    await until(lambda: hub.metrics.snapshot().to_dict()["messages"]["dropped"] == 1)
    again = MockWebSocket()
    await hub.connect("x", again)
    await until(lambda: len(again.payloads) == 2)
    assert again.payloads == [2, 0]
    assert hub.metrics.snapshot().to_dict()["messages"]["dropped"] == 1


async def test_a_restored_copy_with_a_dedup_key_is_stored_again(
    nodes: Factory, r: aioredis.Redis
) -> None:
    """The dedup keys of a plain-mode client's copies outlive its vanished stream: the
    copies are stored again all the same (the key recorded anew, not checked), not
    counted dropped as duplicates of themselves."""
    hub = nodes("a", retry_interval=60, retry_base_delay=60)
    await hub.start()
    ws = MockWebSocket()
    ws.fail_next(1)
    await hub.connect("x", ws)
    sent = await hub.send("x", "with-id", critical=True, message_id="order-1")
    assert sent.status is SendStatus.QUEUED
    assert (await hub.send("x", {"id": "o-2"}, critical=True)).status is SendStatus.QUEUED
    keys = hub.backend.keys  # type: ignore[attr-defined]
    assert await r.exists(keys.dedup("x", "i:order-1"))
    await r.delete(keys.out("x"), keys.meta("x"))  # the stream goes, its dedup keys stay
    assert (await hub.send("x", "next", critical=True)).status is SendStatus.QUEUED
    await until(lambda: ws.closed)
    again = MockWebSocket()
    await hub.connect("x", again)
    await until(lambda: len(again.payloads) == 3)
    assert again.payloads == ["next", "with-id", {"id": "o-2"}]
    messages = hub.metrics.snapshot().to_dict()["messages"]
    assert messages["delivered"] == 3 and messages["dropped"] == 0
    # recorded anew: a resend of the restored message is still a duplicate
    resent = await hub.send("x", "with-id", critical=True, message_id="order-1")
    assert resent.status is SendStatus.DUPLICATE


async def test_a_restore_skips_copies_another_node_delivered_after_a_rollback(
    nodes: Factory, r: aioredis.Redis
) -> None:
    """A failover rolled back the last write of a plain-mode client's stream (same
    epoch). Node a finds out and stores its copies again, but the client came back
    through node b first, which delivered (and acked) those the stream still held: a
    stores again only the copy the rollback lost, not the delivered ones a second time."""
    a, b = nodes("a", retry_interval=60, retry_base_delay=60), nodes("b", retry_interval=60)
    await a.start()
    await b.start()
    ws = MockWebSocket()
    ws.fail_next(1)
    await a.connect("x", ws)
    for n in range(3):
        assert (await a.send("x", n, critical=True)).status is SendStatus.QUEUED
    keys = a.backend.keys  # type: ignore[attr-defined]
    # the failover lost seq 3, and the counter went back to 2 (same epoch)
    await r.xdel(keys.out("x"), "3-0")
    await r.hset(keys.meta("x"), "s", 2)
    streams = a._pipeline.streams
    restore, go = streams.restore, asyncio.Event()
    assert restore is not None

    async def slow_restore(*args: Any) -> None:  # a's restore waits until b has delivered
        await go.wait()
        await restore(*args)

    streams.restore = slow_restore
    sent = await a.send("x", "new", critical=True)  # finds the rollback
    assert sent.status is SendStatus.QUEUED
    ws_b = MockWebSocket()
    await b.connect("x", ws_b)  # the client comes back through node b
    await until(lambda: len(ws_b.payloads) == 3)
    assert ws_b.payloads == [0, 1, "new"]
    go.set()
    await until(lambda: 2 in ws_b.payloads)
    assert ws_b.payloads == [0, 1, "new", 2]
    for hub in (a, b):
        assert hub.metrics.snapshot().to_dict()["messages"]["dropped"] == 0


async def test_messages_a_doorbell_load_finds_expired_are_counted(
    nodes: Factory, r: aioredis.Redis
) -> None:
    """Another node stores a message for a client connected here while the doorbell does
    not reach us (its presence had lapsed); by the time this node loads the stream the
    message has expired: the load removes it, and it is counted as expired."""
    clock = ManualClock()
    a = nodes("a", clock=clock)
    b = nodes("b", clock=clock)
    await a.start()
    await b.start()
    ws = MockWebSocket()
    await a.connect("x", ws)
    await r.delete(a.backend.keys.presence("x"))  # type: ignore[attr-defined]
    assert (await b.send("x", "late", critical=True, ttl=5)).status is SendStatus.QUEUED
    clock.advance(10)
    await b.backend.notify("a", "x")  # the doorbell that had rung nobody
    await until(lambda: a.metrics.snapshot().to_dict()["messages"]["expired"] == 1)
    assert await a.backend.pending_count("x") == 0 and ws.payloads == []


async def test_messages_a_reset_leaves_out_as_expired_are_counted(nodes: Factory) -> None:
    """A resume the store cannot vouch for renumbers what it holds; what has expired is
    left out of the new stream, and counted as expired, as a plain connect counts it."""
    clock = ManualClock()
    hub = nodes("a", clock=clock)
    await hub.start()
    assert (await hub.send("x", "short", critical=True, ttl=1)).status is SendStatus.QUEUED
    assert (await hub.send("x", "long", critical=True, ttl=600)).status is SendStatus.QUEUED
    clock.advance(5)
    ws = MockWebSocket()
    welcome = await hub.connect("x", ws, hello=Hello("x", 7))
    assert welcome is not None and welcome.reset
    assert [m["data"] for m in msgs(ws)] == ["long"]
    assert hub.metrics.snapshot().to_dict()["messages"]["expired"] == 1


async def test_the_keys_outlive_a_pending_message_after_a_reset_and_an_ack(
    nodes: Factory, r: aioredis.Redis
) -> None:
    """A reset renumbers a message that lives a minute under a client_ttl of half a
    second: the keys get its TTL, and the next ack must not shorten them to client_ttl
    (the reset had left the recorded deadline at 0)."""
    hub = nodes("a", presence_ttl=0.5, client_ttl=0.5, message_ttl=0.5)
    await hub.start()
    for n in range(2):
        assert (await hub.send("x", n, critical=True, ttl=60)).status is SendStatus.QUEUED
    ws = MockWebSocket()
    welcome = await hub.connect("x", ws, hello=Hello("x", 5))
    assert welcome is not None and welcome.reset
    assert await hub.ack("x", 6) == 1
    keys = hub.backend.keys  # type: ignore[attr-defined]
    # seq 7 lives ~60 s; client_ttl-scale expiry would be 625 ms
    assert await r.pttl(keys.out("x")) > 30_000 and await r.pttl(keys.meta("x")) > 30_000


async def test_a_short_append_never_shortens_a_stream_holding_a_longer_message(
    nodes: Factory, r: aioredis.Redis
) -> None:
    """A meta hash evicted on its own (maxmemory evicts keys one by one) is recreated by
    the next append: a short message must not shorten the stream's expiry below that of
    the long message it holds, nor leave the meta to expire before the stream."""
    hub = nodes("a", presence_ttl=0.5, client_ttl=0.5, message_ttl=0.5)
    await hub.start()
    assert (await hub.send("y", "long", critical=True, ttl=60)).status is SendStatus.QUEUED
    keys = hub.backend.keys  # type: ignore[attr-defined]
    await r.delete(keys.meta("y"))
    assert (await hub.send("y", "short", critical=True, ttl=1)).status is SendStatus.QUEUED
    assert await r.pttl(keys.out("y")) > 30_000 and await r.pttl(keys.meta("y")) > 30_000


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["redis", "redis-cluster"])
async def test_expired_and_dead_lettered_copies_leave_the_store_on_every_topology(
    kind: str, request: pytest.FixtureRequest
) -> None:
    """The checked discard (one batched script call per Cluster node) still removes the
    stored copies of messages that expire or are dead-lettered, for clients spread over
    every node."""
    from conftest import redis_topology_values

    prefix = f"t-discard-{uuid.uuid4().hex[:10]}"
    clock = ManualClock()
    values: dict[str, Any] = {
        "redis_prefix": prefix,
        "node_id": "a",
        **redis_topology_values(kind, request),
    }
    config = HubConfig(
        backend="redis", max_retries=1, failure_threshold=100, retry_base_delay=0.1, **values
    )
    backend = RedisBackend(config.redis_url, prefix, "a", config, clock=clock)
    hub = Hub(config, backend=backend, clock=clock)
    await hub.start()
    clients = [f"c{n}" for n in range(12)]
    try:
        for n, cid in enumerate(clients):
            await hub.connect(cid, MockWebSocket(failure_rate=1.0))
            ttl = 2 if n % 2 else 600
            assert (await hub.send(cid, n, critical=True, ttl=ttl)).status is SendStatus.QUEUED
        assert await hub.stored_pending(clients[0]) == 1
        for _ in range(10):
            clock.advance(1)
            await hub.retry_now()

        def gone() -> int:
            messages = hub.metrics.snapshot().to_dict()["messages"]
            return int(messages["expired"] + messages["dead_lettered"])

        # A dead letter started by a send's own failed write runs as a task of its own
        # and is counted once the store has it: wait for the last ones to land.
        await until(lambda: gone() == len(clients))
        assert [await hub.stored_pending(cid) for cid in clients] == [0] * len(clients)
    finally:
        await hub.shutdown(timeout=1.0)
        await _delete_prefix(config.redis_url, prefix, cluster=kind == "redis-cluster")


async def _delete_prefix(url: str, prefix: str, *, cluster: bool) -> None:
    """Remove a test's keys (on every primary of a Cluster)."""
    servers = [aioredis.Redis.from_url(url)]
    if cluster:
        seed = RedisCluster.from_url(url)
        try:
            await seed.initialize()
            servers = [aioredis.Redis(host=n.host, port=n.port) for n in seed.get_primaries()]
        finally:
            await seed.aclose()
    for server in servers:
        try:
            async for key in server.scan_iter(match=f"{prefix}:*"):
                await server.delete(key)
        finally:
            await server.aclose()
