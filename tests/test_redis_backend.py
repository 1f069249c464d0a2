"""RedisBackend through real Hubs (MockWebSocket transports) on a real Redis: storage, routing, failures."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from tether import Hub, HubConfig, SendStatus
from tether.backends.redis import RedisBackend
from tether.clock import ManualClock, SystemClock
from tether.protocol import Hello
from tether.testing import MockWebSocket

pytestmark = pytest.mark.redis

Factory = Callable[..., Hub]


@pytest_asyncio.fixture
async def node(redis_url: str, redis_prefix: str) -> AsyncIterator[Factory]:
    """`node("a", **config)`: a started-on-demand Hub on Redis under this test's prefix."""
    hubs: list[Hub] = []

    def factory(node_id: str, clock: Any = None, **values: Any) -> Hub:
        values.setdefault("presence_ttl", 5)
        config = HubConfig(
            backend="redis",
            redis_url=redis_url,
            redis_prefix=redis_prefix,
            node_id=node_id,
            **values,
        )
        hub = Hub(config, clock=clock or SystemClock())
        hubs.append(hub)
        return hub

    yield factory
    for hub in hubs:
        await hub.shutdown(timeout=1.0)


@pytest_asyncio.fixture
async def r(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def kill_connections(r: aioredis.Redis, prefix: str, node_id: str, *, kind: str) -> int:
    """`CLIENT KILL` one node's connections of one type (pubsub or normal), by id, so
    tests sharing this Redis are not disturbed."""
    name = f"tether:{prefix}:{node_id}".encode()
    killed = 0
    for line in (await r.execute_command("CLIENT", "LIST", "TYPE", kind)).splitlines():
        fields = dict(part.split(b"=", 1) for part in line.split(b" ") if b"=" in part)
        if fields.get(b"name") == name:
            killed += int(await r.execute_command("CLIENT", "KILL", "ID", fields[b"id"].decode()))
    return killed


def v1_hello(cid: str, last_seq: int = 0) -> Hello:
    return Hello(cid, last_seq)


# ---------------------------------------------------------------------------- storage


async def test_offline_messages_are_in_redis_and_delivered_on_connect(
    node: Factory, r: aioredis.Redis, redis_prefix: str
) -> None:
    hub = node("a")
    for n in range(3):
        result = await hub.send("alice", {"n": n}, critical=True)
        assert result.status is SendStatus.QUEUED and result.seq == n + 1
    assert await hub.backend.pending_count("alice") == 3
    out = hub.backend.keys.out("alice")  # type: ignore[attr-defined]
    assert out.startswith(f"{redis_prefix}:")
    assert await r.xlen(out) == 3
    ws = MockWebSocket()
    await hub.connect("alice", ws)
    assert ws.payloads == [{"n": 0}, {"n": 1}, {"n": 2}]
    # plain mode: written = delivered, so the store is trimmed
    assert await hub.backend.pending_count("alice") == 0
    assert (await hub.send("alice", "now", critical=True)).status is SendStatus.SENT
    assert await hub.backend.pending_count("alice") == 0


async def test_payload_kinds_round_trip_through_redis(node: Factory) -> None:
    hub = node("a")
    payloads: list[Any] = ["héllo \U0001f600", b"\x00\xffbinary", {"id": "x1", "v": [1, 2]}]
    for p in payloads:
        assert (await hub.send("bob", p, critical=True)).accepted
    ws = MockWebSocket()
    await hub.connect("bob", ws, hello=v1_hello("bob"))
    data = ws.data()
    assert data[0] == payloads[0]
    assert data[1] == "AP9iaW5hcnk="  # bytes travel base64 in tether.v1 (enc)
    assert [f.get("enc") for f in ws.frames if f["type"] == "msg"][1] == "base64"
    assert data[2] == {"id": "x1", "v": [1, 2]}
    assert ws.seqs() == [1, 2, 3]


async def test_sends_batched_into_one_script_call_keep_their_own_ids_and_payloads(
    node: Factory,
) -> None:
    # Sent concurrently to offline clients: one append call carries all four payloads in
    # its payload table. Ids and data with "|" or non-ASCII must not bleed into each other.
    hub = node("a")
    sends: list[tuple[str, str, Any]] = [
        ("d0", "a|b|c", "x|y"),
        ("d1", "ü-ñ|😀", b"|\x00|\xff"),
        ("d2", "plain", {"k": "|", "n": 1}),
        ("d3", "", "empty id falls back to a generated one"),
    ]
    await hub.start()
    pipelines = hub.backend.describe()["pipelines"]
    results = await asyncio.gather(
        *(hub.send(cid, data, critical=True, message_id=mid or None) for cid, mid, data in sends)
    )
    assert [res.status for res in results] == [SendStatus.QUEUED] * 4
    assert hub.backend.describe()["pipelines"] == pipelines + 1  # one round trip for all
    for (cid, mid, data), res in zip(sends, results, strict=True):
        ws = MockWebSocket()
        await hub.connect(cid, ws, hello=v1_hello(cid))
        (frame,) = [f for f in ws.frames if f["type"] == "msg"]
        assert frame["id"] == res.message_id
        if mid:
            assert frame["id"] == mid
        if isinstance(data, bytes):
            assert base64.b64decode(frame["data"]) == data
        else:
            assert frame["data"] == data


async def test_v1_ack_trims_and_resume_after_restart(node: Factory) -> None:
    first = node("a")
    ws = MockWebSocket()
    await first.connect("carl", ws, hello=v1_hello("carl"))
    for n in range(5):
        await first.send("carl", n, critical=True)
    assert ws.seqs() == [1, 2, 3, 4, 5]
    await first.ack("carl", 2)
    assert await first.backend.pending_count("carl") == 3
    stats = await first.shutdown(timeout=0.2)  # 3 written, unacked: they stay in Redis
    assert stats.pending_messages_persisted == 3 and stats.pending_messages_dropped == 0

    second = node("b")  # a new process, same Redis
    ws2 = MockWebSocket()
    welcome = await second.connect("carl", ws2, hello=v1_hello("carl", last_seq=3))
    assert welcome is not None and welcome.resumed and not welcome.reset
    assert ws2.seqs() == [4, 5]  # the client had 3; acked in Redis by the resume
    assert await second.backend.pending_count("carl") == 2
    assert (await second.send("carl", "six", critical=True)).seq == 6


async def test_overflow_policies_hold_in_redis(node: Factory) -> None:
    oldest = node("a", max_queue_size=3)
    results = [await oldest.send("d", n, critical=True) for n in range(5)]
    assert [x.status for x in results] == [SendStatus.QUEUED] * 5
    assert oldest.metrics.snapshot().to_dict()["queue"]["overflows"] == 2
    ws = MockWebSocket()
    await oldest.connect("d", ws)
    assert ws.payloads == [2, 3, 4]
    for policy, status in (("reject", SendStatus.REJECTED), ("drop_newest", SendStatus.DROPPED)):
        strict = node(f"s-{policy}", max_queue_size=3, overflow_policy=policy)
        got = [(await strict.send(f"e-{policy}", n, critical=True)).status for n in range(5)]
        assert got == [SendStatus.QUEUED] * 3 + [status] * 2
        assert await strict.backend.pending_count(f"e-{policy}") == 3


async def test_an_evicted_message_written_and_then_acked_is_delivered_not_dropped(
    node: Factory,
) -> None:
    """drop_oldest pushes out a message that was written and awaits its ack; the ack then
    covers it: delivered, as with the memory backend — the store's evicted entry is the
    session's own envelope, which knows it was written."""
    hub = node("a", max_queue_size=2, overflow_policy="drop_oldest")
    ws = MockWebSocket()
    await hub.connect("x", ws, hello=v1_hello("x"))
    results = [await hub.send("x", n, critical=True) for n in range(3)]
    assert [x.status for x in results] == [SendStatus.SENT] * 3
    assert await hub.ack("x", 3) >= 2
    snapshot = hub.metrics.snapshot().to_dict()
    assert snapshot["queue"]["overflows"] == 1
    assert snapshot["messages"]["delivered"] == 3 and snapshot["messages"]["dropped"] == 0


async def test_an_eviction_looks_only_at_the_head_of_the_sessions_outbox(
    node: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full outbox under drop_oldest evicts on every append: the evicted entry is
    matched against the head of the session's outbox (the oldest), not a map of all of
    it, and is still the session's own envelope (which knows it was written)."""
    hub = node("a", max_queue_size=300, overflow_policy="drop_oldest")
    ws = MockWebSocket()
    await hub.connect("x", ws, hello=v1_hello("x"))
    for n in range(300):
        assert (await hub.send("x", n, critical=True)).status is SendStatus.SENT
    backend = hub.backend
    own = backend._own  # type: ignore[attr-defined]
    looked: list[Any] = []
    owned: list[Any] = []

    def counted_own(session: Any, entries: list[Any]) -> Any:
        head = next(iter(session.outbox))
        original = type(session.outbox).__iter__

        def counting(outbox: Any) -> Any:
            for envelope in original(outbox):
                looked.append(envelope)
                yield envelope

        monkeypatch.setattr(type(session.outbox), "__iter__", counting)
        try:
            result = own(session, entries)
        finally:
            monkeypatch.setattr(type(session.outbox), "__iter__", original)
        owned.extend(envelope is head for envelope in result)
        return result

    monkeypatch.setattr(backend, "_own", counted_own)
    assert (await hub.send("x", 300, critical=True)).status is SendStatus.SENT
    assert owned == [True]  # the session's own envelope
    assert len(looked) < 100  # the head, not all 300
    assert await hub.ack("x", 301) >= 300
    messages = hub.metrics.snapshot().to_dict()["messages"]
    assert messages["delivered"] == 301 and messages["dropped"] == 0


async def test_critical_dedup_is_cluster_wide(node: Factory) -> None:
    a, b = node("a"), node("b")
    assert (await a.send("f", {"id": "order-1"}, critical=True)).status is SendStatus.QUEUED
    assert (await b.send("f", {"id": "order-1"}, critical=True)).status is SendStatus.DUPLICATE
    assert (await b.send("f", {"id": "order-2"}, critical=True)).seq == 2


async def test_non_ascii_dedup_keys_and_long_client_ids_in_one_batch(node: Factory) -> None:
    # Append items carry the client's key and the dedup key as UTF-8 after their byte
    # length: multi-byte characters must not shift the items that follow in the call.
    a, b = node("a"), node("b")
    clients = ["u", "user:42@x.y", "c" * 128, "plain"]
    first = await asyncio.gather(
        *(
            a.send(cid, {"id": f"ключ|{n}|😀", "n": n}, critical=True)
            for n, cid in enumerate(clients)
        )
    )
    assert [r.status for r in first] == [SendStatus.QUEUED] * 4
    again = await asyncio.gather(
        *(
            b.send(cid, {"id": f"ключ|{n}|😀", "n": n}, critical=True)
            for n, cid in enumerate(clients)
        )
    )
    assert [r.status for r in again] == [SendStatus.DUPLICATE] * 4
    for n, cid in enumerate(clients):
        ws = MockWebSocket()
        await b.connect(cid, ws, hello=v1_hello(cid))
        assert [f["data"]["n"] for f in ws.frames if f["type"] == "msg"] == [n]


async def test_a_message_id_longer_than_64_kib_is_stored_and_deduplicated(node: Factory) -> None:
    # The dedup key travels after a uint32 length: a uint16 would not hold it.
    a, b = node("a"), node("b")
    long_id = "i" * 70_000
    first = await a.send("long", {"id": long_id, "n": 1}, critical=True)
    assert first.status is SendStatus.QUEUED
    assert (await b.send("long", {"id": long_id, "n": 1}, critical=True)).status is (
        SendStatus.DUPLICATE
    )
    broadcast = await a.broadcast({"id": "b" * 70_000}, critical=True)
    assert broadcast.rejected == broadcast.unknown == 0


async def test_expired_messages_are_removed_on_load(node: Factory) -> None:
    clock = ManualClock()
    hub = node("a", clock=clock)
    await hub.send("g", "short", critical=True, ttl=5)
    await hub.send("g", "long", critical=True, ttl=500)
    clock.advance(6)
    ws = MockWebSocket()
    await hub.connect("g", ws)
    assert ws.sent == ["long"]
    assert hub.metrics.snapshot().to_dict()["messages"]["expired"] == 1
    assert await hub.backend.pending_count("g") == 0


async def test_dead_letters_are_stored(node: Factory) -> None:
    clock = ManualClock()
    hub = node("a", clock=clock, max_retries=1, failure_threshold=100, retry_base_delay=0.1)
    ws = MockWebSocket(failure_rate=1.0)
    await hub.connect("h", ws)
    await hub.send("h", "poison", critical=True)
    for _ in range(20):
        clock.advance(1)
        await hub.retry_now()
    assert [d.data for d in hub.dead_letters("h")] == ["poison"]
    backend = hub.backend
    assert isinstance(backend, RedisBackend)
    stored = await backend.dead_letters("h")
    assert stored[0]["data"] == "poison" and stored[0]["reason"] == "retries exhausted"
    assert await backend.pending_count("h") == 0


# ---------------------------------------------------------------------------- routing


async def test_cross_node_critical_best_effort_and_broadcast(node: Factory) -> None:
    a, b = node("a"), node("b")
    await a.start()
    ws = MockWebSocket()
    await b.connect("ivy", ws, hello=v1_hello("ivy"))
    assert await a.backend.owner("ivy") == "b"
    for n in range(20):
        result = await a.send("ivy", {"n": n}, critical=True)
        assert result.status is SendStatus.QUEUED and result.reason == "delivered by node b"
    await eventually(lambda: len(ws.seqs()) == 20)
    assert ws.seqs() == list(range(1, 21))
    fwd = await a.send("ivy", "best effort")
    assert fwd.status is SendStatus.SENT and fwd.reason == "forwarded to b"
    await eventually(lambda: "best effort" in ws.data())
    bc = await a.broadcast({"all": 1})
    await eventually(lambda: {"all": 1} in ws.data())
    assert bc.total == 0  # nobody local to a; the cluster got it by pub/sub
    crit = await a.broadcast({"all": 2}, critical=True)
    assert crit.queued == 1
    await eventually(lambda: {"all": 2} in ws.data())
    await b.ack("ivy", max(ws.seqs()))
    assert await b.backend.pending_count("ivy") == 0


async def test_critical_broadcast_stores_local_copies_while_asking_who_else(
    node: Factory,
) -> None:
    """The round trip that asks Redis for the clients other nodes know runs alongside
    the storing of this node's copies, not before it; the broadcast still covers both."""
    a, b = node("a"), node("b")
    here, there = MockWebSocket(), MockWebSocket()
    await a.connect("near", here, hello=v1_hello("near"))
    await b.connect("far", there, hello=v1_hello("far"))
    asked, answer = asyncio.Event(), asyncio.Event()
    members = a.backend.members

    async def slow_members(group: str | None) -> set[str] | None:
        asked.set()
        await answer.wait()
        return await members(group)

    a.backend.members = slow_members  # type: ignore[method-assign]
    broadcast = asyncio.ensure_future(a.broadcast({"all": 1}, critical=True))
    await asyncio.wait_for(asked.wait(), 5)
    await eventually(lambda: {"all": 1} in here.data())  # stored and written meanwhile
    assert not broadcast.done()
    answer.set()
    result = await asyncio.wait_for(broadcast, 5)
    assert (result.sent, result.queued) == (1, 1)
    await eventually(lambda: {"all": 1} in there.data())


class ReadySocket(MockWebSocket):
    """A MockWebSocket that also takes frames synchronously, as the adapters' sockets do
    (so a broadcast stores its copies in slices instead of one send per client)."""

    def try_send(self, data: str | bytes) -> bool:
        self.sent.append(data)
        return True


async def test_a_send_started_during_a_broadcast_comes_after_it_for_every_client(
    node: Factory,
) -> None:
    """A critical broadcast is ordered against other deliveries for all its clients at
    once, however many slices its copies are stored in: a send to the last client, made
    while the first slices are on their way, arrives after the broadcast's copy."""
    a = node("a")
    sockets = {f"o{i}": ReadySocket() for i in range(300)}  # several store slices
    for cid, ws in sockets.items():
        await a.connect(cid, ws, hello=v1_hello(cid))
    broadcast = asyncio.ensure_future(a.broadcast({"all": 1}, critical=True))
    await asyncio.sleep(0)  # the broadcast has started; its later slices are not built
    send = asyncio.ensure_future(a.send("o299", {"own": 1}, critical=True))
    await asyncio.wait_for(asyncio.gather(broadcast, send), 10)
    assert sockets["o299"].data() == [{"all": 1}, {"own": 1}]


async def test_a_cancelled_broadcast_still_delivers_the_copies_it_stored(node: Factory) -> None:
    """The producer gives up while the first slice is on its way to Redis: the copies
    stored there reach their clients connected here, each once, without another send."""
    a = node("a")
    sockets = {f"k{i}": ReadySocket() for i in range(300)}
    for cid, ws in sockets.items():
        await a.connect(cid, ws, hello=v1_hello(cid))
    broadcast = asyncio.ensure_future(a.broadcast({"all": 1}, critical=True))
    await asyncio.sleep(0)  # its first slice is handed to the store
    broadcast.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await broadcast
    await eventually(lambda: sockets["k0"].data() == [{"all": 1}])
    got = [cid for cid, ws in sockets.items() if ws.data()]
    assert all(sockets[cid].data() == [{"all": 1}] for cid in got)  # never twice
    for cid in got:  # what reached a client is what the store holds for it
        assert await a.backend.pending_count(cid) == 1


async def test_group_broadcast_reaches_only_members_elsewhere(node: Factory) -> None:
    a, b = node("a"), node("b")
    await a.start()
    in_group, outside = MockWebSocket(), MockWebSocket()
    await b.connect("m1", in_group)
    await b.connect("m2", outside)
    b.join("m1", "room")
    await asyncio.sleep(0.1)  # join is recorded in the background
    await a.broadcast("hello room", group="room")
    await eventually(lambda: in_group.sent == ["hello room"])
    crit = await a.broadcast("critical room", group="room", critical=True)
    assert crit.queued == 1
    await eventually(lambda: in_group.sent == ["hello room", "critical room"])
    assert outside.sent == []


async def test_gap_from_another_node_keeps_fifo(node: Factory) -> None:
    """A message stored by node A for a client on B whose doorbell has not arrived yet
    must still go out before B's own next message."""
    a, b = node("a"), node("b")
    await a.start()
    ws = MockWebSocket()
    await b.connect("jo", ws)
    backend = b.backend
    assert isinstance(backend, RedisBackend)
    backend._bell = lambda client_id: None  # type: ignore[method-assign]  # doorbell lost
    await a.send("jo", "from a", critical=True)
    queued = await b.send("jo", "from b", critical=True)
    assert queued.reason == "behind earlier undelivered messages"
    assert b.pending("jo") == 2  # a's message was pulled in ahead of b's own
    await eventually(lambda: ws.sent == ["from a", "from b"])  # the retry loop flushes


async def test_moving_a_client_kicks_the_old_node(node: Factory) -> None:
    a, b = node("a"), node("b")
    old, new = MockWebSocket(), MockWebSocket()
    await a.connect("kim", old, hello=v1_hello("kim"))
    await a.send("kim", "one", critical=True)  # written, never acked
    await b.connect("kim", new, hello=v1_hello("kim"))
    assert new.seqs() == [1]
    await eventually(lambda: old.closed)
    assert old.close_reason == "moved to node b"
    await eventually(lambda: a.pending("kim") == 0)  # a's stale copy is dropped
    assert await a.backend.owner("kim") == "b"


# ---------------------------------------------------------------------------- failures


async def test_redis_unreachable_rejects_critical_keeps_local_delivery() -> None:
    # Port 1 on loopback: connection refused at once.
    hub = Hub(
        HubConfig(backend="redis", redis_url="redis://:s3cret@127.0.0.1:1/0", node_id="x"),
        clock=SystemClock(),
    )
    ws = MockWebSocket()
    await hub.connect("lee", ws)  # the connection works without Redis
    critical = await hub.send("lee", "important", critical=True)
    assert critical.status is SendStatus.REJECTED
    assert critical.reason is not None and critical.reason.startswith("backend unavailable: ")
    assert (await hub.send("lee", "chatter")).status is SendStatus.SENT
    assert ws.sent == ["chatter"]
    with pytest.raises(ValueError, match="backend unavailable"):  # v1: close 1013, retry later
        await hub.connect("lee-v1", MockWebSocket(), hello=v1_hello("lee-v1", last_seq=4))
    assert not hub.is_connected("lee-v1")
    backend = hub.backend
    info = backend.describe()
    assert info["healthy"] is False and info["errors"] > 0
    assert "s3cret" not in info["url"] and info["node_id"] == "x"
    assert hub.metrics.snapshot().to_dict()["backend"]["errors"] == backend.errors
    stats = await hub.shutdown(timeout=0.2)
    assert stats.pending_messages_persisted == 0


async def test_pubsub_listener_recovers_from_client_kill(node: Factory, r: aioredis.Redis) -> None:
    a, b = node("a"), node("b")
    await a.start()
    ws = MockWebSocket()
    await b.connect("max", ws)
    backend = b.backend
    assert isinstance(backend, RedisBackend)
    await eventually(lambda: backend.healthy)
    errors = backend.errors
    await a.send("max", "before", critical=True)
    await eventually(lambda: ws.sent == ["before"])
    await kill_connections(r, backend.prefix, "b", kind="pubsub")
    await eventually(lambda: backend.listener_reconnects >= 1)
    assert backend.errors > errors
    assert b.metrics.snapshot().to_dict()["backend"]["errors"] == backend.errors
    await eventually(lambda: backend.healthy)
    await a.send("max", "after", critical=True)
    await eventually(lambda: ws.sent == ["before", "after"])


async def test_killed_command_connections_lose_nothing(
    node: Factory, r: aioredis.Redis, redis_prefix: str
) -> None:
    hub = node("a")
    await hub.start()
    accepted = []
    for n in range(200):
        if n % 50 == 25:
            assert await kill_connections(r, redis_prefix, "a", kind="normal") >= 1
        result = await hub.send("ned", n, critical=True, message_id=f"m{n}")
        while not result.accepted:  # REJECTED on a dead connection: resend, dedup keeps it once
            assert result.status in (SendStatus.REJECTED, SendStatus.DUPLICATE), result
            if result.status is SendStatus.DUPLICATE:
                break
            result = await hub.send("ned", n, critical=True, message_id=f"m{n}")
        accepted.append(n)
    ws = MockWebSocket()
    await hub.connect("ned", ws)
    assert ws.payloads == list(range(200))


async def test_an_append_to_an_emptied_stream_keeps_an_expiry_no_later_than_its_meta(
    node: Factory, r: aioredis.Redis
) -> None:
    hub = node("a")
    ws = MockWebSocket()
    await hub.connect("kx", ws, hello=Hello("kx", 0))
    await hub.send("kx", {"n": 1}, critical=True)
    await hub.ack("kx", 1)  # the stream is empty now
    await hub.send("kx", {"n": 2}, critical=True)
    backend: RedisBackend = hub.backend  # type: ignore[assignment]
    meta = await r.pttl(backend.keys.meta("kx"))
    out = await r.pttl(backend.keys.out("kx"))
    # both expire (-1 would be a key that never does), the stream not after its meta
    assert meta > 0 and out > 0
    assert out <= meta


async def test_payload_kinds_whose_json_starts_with_a_quote_come_back_as_sent(
    node: Factory,
) -> None:
    """Stored in Redis for an offline client and loaded on connect: JSON whose encoding is
    a JSON string (a datetime, a UUID) stays JSON, text stays text, bytes stay bytes."""
    import datetime
    import uuid

    hub = node("a")
    await hub.start()
    when = datetime.datetime(2026, 12, 3, 8, 40, tzinfo=datetime.UTC)
    ident = uuid.UUID(int=9)
    for payload in (when, ident, '"quoted" text', b"\x00\x01", {"n": 1}):
        assert (await hub.send("kinds", payload, critical=True)).status is SendStatus.QUEUED
    ws = MockWebSocket()
    await hub.connect("kinds", ws, hello=Hello("kinds", 0))
    assert ws.data() == [
        "2026-12-03T08:40:00+00:00",
        str(ident),
        '"quoted" text',
        base64.b64encode(b"\x00\x01").decode(),
        {"n": 1},
    ]
