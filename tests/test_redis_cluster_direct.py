"""Script rounds written straight on kept connections: cancellation, killed connections and per-node failures stay honest."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from redis_topology import ClusterTopology
from tether import Hub, HubConfig, SendStatus
from tether.backends.base import Accepted, BackendError
from tether.backends.redis import RedisBackend
from tether.backends.redis_connection import LuaScript, RedisConnections, slot_of
from tether.messages import Envelope

pytestmark = pytest.mark.redis

# Returns its argument after spinning for ARGV[2] ms: a reply that arrives late.
ECHO = LuaScript(
    "local t = redis.call('TIME')\n"
    "local stop = t[1] * 1000 + t[2] / 1000 + tonumber(ARGV[2])\n"
    "repeat t = redis.call('TIME') until t[1] * 1000 + t[2] / 1000 >= stop\n"
    "redis.call('INCRBY', KEYS[1], 1)\n"
    "return ARGV[1]\n"
)

READ = LuaScript("return tonumber(redis.call('GET', KEYS[1]) or '0')")


@pytest_asyncio.fixture(params=["single", "cluster"])
async def conns(request: pytest.FixtureRequest) -> AsyncIterator[tuple[RedisConnections, str]]:
    prefix = f"tether-direct-{uuid.uuid4().hex[:10]}"
    if request.param == "single":
        config = HubConfig(redis_url=request.getfixturevalue("redis_single"))
    else:
        config = HubConfig(redis_url=request.getfixturevalue("redis_cluster"), redis_cluster=True)
    connections = RedisConnections(config, client_name=prefix)
    try:
        yield connections, prefix
    finally:
        await _delete(connections, prefix)
        await connections.aclose()


async def _delete(connections: RedisConnections, prefix: str) -> None:
    for server in await _servers(connections):  # fresh connections: the test kills its own
        try:
            async for key in server.scan_iter(match=f"{prefix}*"):
                await server.delete(key)
        finally:
            await server.aclose()


def _calls(
    prefix: str, tag: str, count: int, spin_ms: int = 0
) -> list[tuple[list[str], list[Any]]]:
    # one key per slot group, spread over the cluster's nodes
    return [([f"{prefix}:{{g{i}}}"], [f"{tag}{i}", spin_ms]) for i in range(count)]


async def _servers(connections: RedisConnections) -> list[aioredis.Redis]:
    client = connections.commands
    if isinstance(client, RedisCluster):
        await client.initialize()
        return [aioredis.Redis(host=n.host, port=n.port) for n in client.get_primaries()]
    pool_options = client.connection_pool.connection_kwargs
    return [aioredis.Redis(host=pool_options["host"], port=pool_options["port"])]


async def test_a_round_cancelled_with_replies_pending_leaves_none_for_the_next(
    conns: tuple[RedisConnections, str],
) -> None:
    """The late replies of a cancelled round must never be read as the next round's: its
    connections are dropped, not kept."""
    connections, prefix = conns
    # connected first: the round to cancel is written at once on kept connections
    await connections.run_script_batch(ECHO, _calls(prefix, "warm", 6))
    slow = asyncio.ensure_future(connections.run_script_batch(ECHO, _calls(prefix, "old", 6, 300)))
    await asyncio.sleep(0.1)  # written, and the servers are still spinning
    slow.cancel()
    with pytest.raises(asyncio.CancelledError):
        await slow
    for round_number in range(3):
        calls = _calls(prefix, f"new{round_number}-", 6)
        replies = await connections.run_script_batch(ECHO, calls)
        assert replies == [args[0].encode() for _, args in calls]


async def test_killed_connections_fail_their_round_and_the_next_reconnects(
    conns: tuple[RedisConnections, str],
) -> None:
    """Kept connections killed by the server between rounds: the next round's calls
    either run (a connection seen closed is replaced, as the pool would) or come back as
    connection errors (outcome unknown) - never as another call's reply - and the round
    after that runs every call; each call ran exactly as often as it was answered."""
    connections, prefix = conns
    await connections.load_script(READ)  # before the kill: it also cuts the command client's
    calls = _calls(prefix, "a", 6)
    assert await connections.run_script_batch(ECHO, calls) == [b"a%d" % i for i in range(6)]
    servers = await _servers(connections)
    try:
        for server in servers:  # only this test's connections (named by its prefix)
            for client in await server.client_list():
                if client.get("name") == prefix:
                    await server.client_kill_filter(_id=client["id"])
        try:
            replies = await connections.run_script_batch(ECHO, calls)
        except (RedisConnectionError, RedisTimeoutError) as exc:  # one server: the whole round
            replies = [exc] * len(calls)
        for (_keys, args), reply in zip(calls, replies, strict=True):
            assert reply == args[0].encode() or isinstance(
                reply, RedisConnectionError | RedisTimeoutError
            ), reply
        ran = sum(1 for reply in replies if isinstance(reply, bytes))
        assert await connections.run_script_batch(ECHO, calls) == [b"a%d" % i for i in range(6)]
        counts = [
            (await connections.run_script_batch(READ, [([keys[0]], [])]))[0] for keys, _ in calls
        ]
        # the first round and the last ran every call; the middle one only what it answered
        assert sum(counts) == 2 * len(calls) + ran
    finally:
        for server in servers:
            await server.aclose()


async def test_a_send_to_a_migrating_slot_is_rejected_not_stored_twice(
    fresh_redis_cluster: ClusterTopology,
) -> None:
    """While the slot of a client's keys migrates, the source node answers ASK (the
    call's declared bucket key never exists). Following it (ASKING on the importing node)
    started a second stream there - seq 1 again - which MIGRATE then clashes with or
    overwrites. The send is REJECTED as not run, retryable, and nothing lands on the
    target."""
    topology = fresh_redis_cluster
    prefix = f"tether-migrate-{uuid.uuid4().hex[:8]}"
    config = HubConfig(
        backend="redis",
        redis_url=topology.seed_url,
        redis_cluster=True,
        redis_prefix=prefix,
        node_id="a",
        presence_ttl=5,
    )
    hub = Hub(config)
    await hub.start()
    backend = hub.backend
    assert isinstance(backend, RedisBackend)
    keys = backend.keys
    slot = slot_of(keys.slot_key(keys.bucket("x")))
    source = topology.node_for_slot(slot)
    target = next(node for node in topology.nodes if node is not source)
    src = aioredis.Redis(port=source.port, single_connection_client=True)
    dst = aioredis.Redis(port=target.port, single_connection_client=True)
    try:
        assert (await hub.send("x", 0, critical=True)).seq == 1
        src_id = (await src.execute_command("CLUSTER", "MYID")).decode()
        dst_id = (await dst.execute_command("CLUSTER", "MYID")).decode()
        await dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        await src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        result = await hub.send("x", 1, critical=True)
        assert result.status is SendStatus.REJECTED, result
        assert "migrating; retry" in (result.reason or "")
        await dst.execute_command("ASKING")
        assert await dst.xlen(keys.out("x")) == 0  # no second stream on the target
        assert await src.xlen(keys.out("x")) == 1
    finally:
        for server in (src, dst):
            await server.execute_command("CLUSTER", "SETSLOT", slot, "STABLE")
            await server.aclose()
        await hub.shutdown(timeout=1.0)


@dataclass
class _Stream:  # the part of a session a backend reads, for a client connected nowhere
    client_id: str
    epoch: str | None = None
    next_seq: int = 1
    dedup: Any = None
    outbox: Any = None


async def test_a_migrating_slot_rejects_only_its_own_clients_sends(
    fresh_redis_cluster: ClusterTopology,
) -> None:
    """Clients of several buckets on one node share a script call, which declares one
    bucket key. That bucket's slot migrating made the node refuse (ASK) the whole call:
    every client in it was REJECTED, though only one slot moves. The call's items are sent
    again once, one call per bucket: only the migrating bucket's sends are REJECTED, in
    a send of its own or a broadcast's copies alike."""
    topology = fresh_redis_cluster
    prefix = f"tether-ask-{uuid.uuid4().hex[:8]}"
    config = HubConfig(
        backend="redis",
        redis_url=topology.seed_url,
        redis_cluster=True,
        redis_prefix=prefix,
        node_id="a",
        presence_ttl=5,
    )
    hub = Hub(config)
    await hub.start()
    backend = hub.backend
    assert isinstance(backend, RedisBackend)
    keys = backend.keys
    slot = slot_of(keys.slot_key(keys.bucket("x")))
    source = topology.node_for_slot(slot)
    y = next(
        c
        for c in (f"y{n}" for n in range(10_000))
        if keys.bucket(c) != keys.bucket("x")
        and topology.node_for_slot(slot_of(keys.slot_key(keys.bucket(c)))) is source
    )
    target = next(node for node in topology.nodes if node is not source)
    src = aioredis.Redis(port=source.port, single_connection_client=True)
    dst = aioredis.Redis(port=target.port, single_connection_client=True)
    try:
        for cid in ("x", y):
            assert (await hub.send(cid, 0, critical=True)).seq == 1
        src_id = (await src.execute_command("CLUSTER", "MYID")).decode()
        dst_id = (await dst.execute_command("CLUSTER", "MYID")).decode()
        await dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        await src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        stored_x = 1
        rejected_x = 0
        for order in (("x", y), (y, "x")):  # whichever bucket the call declares
            results = await asyncio.gather(*(hub.send(c, "m", critical=True) for c in order))
            by_client = dict(zip(order, results, strict=True))
            assert by_client[y].status is SendStatus.QUEUED, by_client[y]
            # x's keys have not moved yet: a call declaring y's key stores it on the source
            if by_client["x"].status is SendStatus.QUEUED:
                stored_x += 1
            else:
                assert by_client["x"].status is SendStatus.REJECTED, by_client["x"]
                assert "migrating; retry" in (by_client["x"].reason or "")
                rejected_x += 1
        assert rejected_x  # a call declaring x's bucket key was refused
        now = backend.clock.now()
        envelope = Envelope(
            message_id="b-1",
            data="all",
            data_json=None,
            critical=True,
            created_at=now,
            expires_at=now + 60,
        )
        copies: list[Any] = [(_Stream(y), envelope, False), (_Stream("x"), envelope, False)]
        outcomes = await backend.append_many(copies)  # the call declares x's bucket key
        assert isinstance(outcomes[0], Accepted) and outcomes[0].seq == 4
        assert isinstance(outcomes[1], BackendError) and "migrating" in str(outcomes[1])
        assert await src.xlen(keys.out(y)) == 4
        assert await src.xlen(keys.out("x")) == stored_x
        await dst.execute_command("ASKING")
        assert await dst.xlen(keys.out("x")) == 0  # no second stream on the target
    finally:
        for server in (src, dst):
            await server.execute_command("CLUSTER", "SETSLOT", slot, "STABLE")
            await server.aclose()
        await hub.shutdown(timeout=1.0)


async def test_a_send_answered_moved_is_stored_once_on_the_new_owner(
    fresh_redis_cluster: ClusterTopology, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slot handed to another node behind the hub's back (its slot map is stale): the
    old owner answers MOVED without running the call, and the call is sent once to the
    node named, where it is stored."""
    topology = fresh_redis_cluster
    prefix = f"tether-moved-{uuid.uuid4().hex[:8]}"
    config = HubConfig(
        backend="redis",
        redis_url=topology.seed_url,
        redis_cluster=True,
        redis_prefix=prefix,
        node_id="a",
        presence_ttl=5,
    )
    hub = Hub(config)
    await hub.start()
    backend = hub.backend
    assert isinstance(backend, RedisBackend)
    keys = backend.keys
    slot = slot_of(keys.slot_key(keys.bucket("x")))
    source = topology.node_for_slot(slot)
    target = next(node for node in topology.nodes if node is not source)
    servers = [aioredis.Redis(port=node.port) for node in topology.nodes]
    redirected: list[Any] = []
    resend = RedisConnections._resend_moved

    async def spy(self: RedisConnections, *args: Any) -> Any:
        redirected.append(args[3])
        return await resend(self, *args)

    monkeypatch.setattr(RedisConnections, "_resend_moved", spy)
    try:
        assert (await hub.send("warm", 0, critical=True)).accepted  # the slot map is read
        dst_id = await servers[topology.nodes.index(target)].execute_command("CLUSTER", "MYID")
        for server in servers:  # the slot is empty: handed over at once
            await server.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id.decode())
        result = await hub.send("x", 1, critical=True)
        assert result.status is SendStatus.QUEUED and result.seq == 1, result
        assert [type(moved).__name__ for moved in redirected] == ["MovedError"]
        owner = servers[topology.nodes.index(target)]
        assert await owner.xlen(keys.out("x")) == 1
    finally:
        for server in servers:
            await server.aclose()
        await hub.shutdown(timeout=1.0)
