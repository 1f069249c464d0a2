"""The Redis connection layer on a real single server, a 3-master Redis Cluster and a Sentinel deployment."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import (
    ClusterDownError,
    MaxConnectionsError,
    RedisClusterException,
    TimeoutError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from redis_topology import ClusterTopology, SentinelTopology, free_port
from tether import HubConfig
from tether.backends.redis_connection import (
    LuaScript,
    RedisConnections,
    Topology,
    redact_url,
    slot_of,
)

pytestmark = pytest.mark.redis

# HINCRBY + XADD + PEXPIRE on one client's hash-tagged keys, as the backend's appends do.
APPEND = LuaScript(
    "local n = redis.call('HINCRBY', KEYS[1], 'n', 1)\n"
    "redis.call('XADD', KEYS[2], '*', 'd', ARGV[1])\n"
    "redis.call('PEXPIRE', KEYS[1], 60000)\n"
    "redis.call('PEXPIRE', KEYS[2], 60000)\n"
    "return n\n"
)

TOPOLOGIES = ["single", "cluster", "sentinel"]


def _config(kind: str, request: pytest.FixtureRequest, **values: Any) -> HubConfig:
    if kind == "single":
        return HubConfig(redis_url=request.getfixturevalue("redis_single"), **values)
    if kind == "cluster":
        return HubConfig(
            redis_url=request.getfixturevalue("redis_cluster"), redis_cluster=True, **values
        )
    sentinel: SentinelTopology = request.getfixturevalue("shared_redis_sentinel")
    return HubConfig(redis_sentinels=sentinel.sentinels_setting, **values)


@pytest.fixture
def prefix() -> Iterator[str]:
    yield f"tether-topo-{uuid.uuid4().hex[:10]}"


@pytest_asyncio.fixture(params=TOPOLOGIES)
async def conns(request: pytest.FixtureRequest, prefix: str) -> AsyncIterator[RedisConnections]:
    """RedisConnections on each topology; the test's keys (under `prefix`) are removed after."""
    connections = RedisConnections(
        _config(str(request.param), request), client_name=f"{prefix}-conns"
    )
    try:
        yield connections
    finally:
        await _delete_prefix(connections, prefix)
        await connections.aclose()


async def _delete_prefix(connections: RedisConnections, prefix: str) -> None:
    client = connections.commands
    if isinstance(client, RedisCluster):
        for node in client.get_primaries():
            node_client = aioredis.Redis(host=node.host, port=node.port)
            try:
                keys = [key async for key in node_client.scan_iter(match=f"*{prefix}*")]
                for key in keys:
                    await node_client.delete(key)
            finally:
                await node_client.aclose()
        return
    keys = [key async for key in client.scan_iter(match=f"*{prefix}*")]
    if keys:
        await client.delete(*keys)


def _client_keys(prefix: str, client: int) -> list[str]:
    return [f"{prefix}:{{c{client}}}:h", f"{prefix}:{{c{client}}}:s"]


async def _receive(pubsub: PubSub, count: int, timeout: float = 5.0) -> list[bytes]:
    """The data of the next `count` published messages (subscribe confirmations skipped)."""
    received: list[bytes] = []
    async with asyncio.timeout(timeout):
        while len(received) < count:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is not None and message["type"] == "message":
                received.append(message["data"])
    return received


# --------------------------------------------------------------------------- every topology


async def test_commands_and_a_hash_tagged_script_run(conns: RedisConnections, prefix: str) -> None:
    await conns.commands.set(f"{prefix}:plain", "v")
    assert await conns.commands.get(f"{prefix}:plain") == b"v"

    # The script cache starts empty (a restarted or newly promoted node looks like this):
    # the first batch meets NOSCRIPT, loads the script and re-runs only those calls.
    await conns.commands.script_flush()
    calls = [(_client_keys(prefix, i), [f"m{i}"]) for i in range(60)]
    assert await conns.run_script_batch(APPEND, calls) == [1] * 60
    assert await conns.run_script_batch(APPEND, calls) == [2] * 60

    for i in (0, 17, 59):
        hash_key, stream_key = _client_keys(prefix, i)
        assert await conns.commands.hget(hash_key, "n") == b"2"  # applied exactly twice
        assert await conns.commands.xlen(stream_key) == 2
        assert 0 < await conns.commands.pttl(stream_key) <= 60000

    groups = await conns.group_by_node([keys[0] for keys, _ in calls])
    if conns.topology is Topology.CLUSTER:
        assert len(groups) == 3  # the batch really crossed every master
    else:
        assert len(groups) == 1
    assert sorted(key for keys in groups.values() for key in keys) == sorted(
        keys[0] for keys, _ in calls
    )


async def test_a_script_error_is_that_calls_result(conns: RedisConnections, prefix: str) -> None:
    await conns.commands.set(f"{prefix}:{{c1}}:h", "not a hash")
    results = await conns.run_script_batch(
        APPEND, [(_client_keys(prefix, i), ["x"]) for i in range(3)]
    )
    assert results[0] == 1 and results[2] == 1
    assert "WRONGTYPE" in str(results[1])


async def test_a_message_published_through_another_node_reaches_the_subscriber(
    conns: RedisConnections, prefix: str
) -> None:
    channel = f"{prefix}:chan"
    pubsub = await conns.pubsub()
    try:
        await pubsub.subscribe(channel)
        publishers: list[aioredis.Redis] = []
        if isinstance(conns.commands, RedisCluster):
            # every master publishes once, whichever node the subscriber is on
            publishers = [
                aioredis.Redis(host=node.host, port=node.port)
                for node in conns.commands.get_primaries()
            ]
            assert len(publishers) == 3
        try:
            for index, publisher in enumerate(publishers):
                await publisher.publish(channel, f"node-{index}")
            await conns.commands.publish(channel, "commands")
            expected = {f"node-{i}".encode() for i in range(len(publishers))} | {b"commands"}
            assert set(await _receive(pubsub, len(expected))) == expected
        finally:
            for publisher in publishers:
                await publisher.aclose()
    finally:
        await pubsub.aclose()


async def test_commands_wait_for_a_connection_instead_of_failing(
    request: pytest.FixtureRequest, prefix: str
) -> None:
    """1,000 concurrent INCRs through a bound of 8 connections all complete."""
    for kind in TOPOLOGIES:
        name = f"{prefix}-{kind}"
        connections = RedisConnections(
            _config(kind, request, redis_max_connections=8), client_name=name
        )
        counter = f"{prefix}:{{counter}}"
        try:
            results = await asyncio.gather(
                *(connections.commands.incr(counter) for _ in range(1000)),
                return_exceptions=True,
            )
            failures = [r for r in results if isinstance(r, BaseException)]
            assert failures == [], f"{kind}: {failures[:3]}"
            assert sorted(results) == list(range(1, 1001))  # type: ignore[type-var]
            # every connection the client opened is still in the pool: at most 8
            opened = await _connections_named(connections, name)
            assert 1 <= opened <= 8, f"{kind}: {opened} connections"
        finally:
            await _delete_prefix(connections, prefix)
            await connections.aclose()


async def _connections_named(connections: RedisConnections, name: str) -> int:
    client = connections.commands
    if isinstance(client, RedisCluster):
        node = client.get_node_from_key("{counter}")
        entries = await client.client_list(target_nodes=node)
    else:
        entries = await client.client_list()
    return sum(1 for entry in entries if entry.get("name") == name)


async def test_unbounded_default_pools_fail_where_the_bound_waits(
    request: pytest.FixtureRequest, prefix: str
) -> None:
    """The contrast: redis-py's default pools at the same size raise instead of waiting."""
    counter = f"{prefix}:{{counter}}"
    single = aioredis.Redis.from_url(request.getfixturevalue("redis_single"), max_connections=8)
    cluster = RedisCluster.from_url(request.getfixturevalue("redis_cluster"), max_connections=8)
    sentinel_topology: SentinelTopology = request.getfixturevalue("shared_redis_sentinel")
    sentinel = Sentinel(sentinel_topology.sentinel_addresses)
    master = sentinel.master_for(sentinel_topology.service, max_connections=8)
    try:
        for client in (single, cluster, master):
            results = await asyncio.gather(
                *(client.incr(counter) for _ in range(1000)), return_exceptions=True
            )
            failures = [r for r in results if isinstance(r, BaseException)]
            assert failures, f"{client!r} did not run out of connections"
            # (the fresh cluster client also trips over its own lazy discovery: other errors)
            assert any(isinstance(f, MaxConnectionsError) for f in failures), failures[:3]
            await client.delete(counter)
    finally:
        await single.aclose()
        await cluster.aclose()
        await master.aclose()
        await sentinel.aclose()


def test_describe_names_the_topology_without_the_password() -> None:
    secret = "hunter2-secret"
    single = RedisConnections(HubConfig(redis_url=f"redis://app:{secret}@10.0.0.5:6380/3"))
    cluster = RedisConnections(
        HubConfig(redis_url=f"redis://:{secret}@10.0.0.6:7000/0", redis_cluster=True)
    )
    sentinel = RedisConnections(
        HubConfig(
            redis_url=f"redis://:{secret}@ignored:1/2",
            redis_sentinels="10.0.0.7:26379,10.0.0.8:26379",
            redis_sentinel_service="orders",
        )
    )
    assert single.topology is Topology.SINGLE
    assert single.describe() == "Redis redis://app:***@10.0.0.5:6380/3"
    assert cluster.topology is Topology.CLUSTER
    assert cluster.describe() == "Redis Cluster via seed redis://:***@10.0.0.6:7000/0"
    assert sentinel.topology is Topology.SENTINEL
    assert sentinel.describe() == (
        "Redis Sentinel service 'orders' via 10.0.0.7:26379,10.0.0.8:26379 (db 2)"
    )
    for connections in (single, cluster, sentinel):
        assert secret not in connections.describe()
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


# --------------------------------------------------------------------------- no silent retries


async def test_a_failed_command_is_sent_once_and_never_retried(
    redis_single: str, prefix: str
) -> None:
    """A proxy in front of the real server cuts the connection as an INCR passes: the
    command is tried exactly once (redis-py's default client re-sends it up to 10 times,
    and a command cut after the server got it would then run twice)."""
    target = urlsplit(redis_single)
    incr_seen = 0

    async def relay(
        client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        nonlocal incr_seen
        server_reader, server_writer = await asyncio.open_connection(target.hostname, target.port)

        async def replies() -> None:
            while data := await server_reader.read(65536):
                client_writer.write(data)
                await client_writer.drain()

        pump = asyncio.ensure_future(replies())
        try:
            while True:
                command = await _read_resp_command(client_reader)
                if command[0].upper() in (b"INCR", b"INCRBY"):
                    incr_seen += 1
                    return  # cut both ways, as a network failure would
                server_writer.write(_resp_command(command))
                await server_writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            pump.cancel()
            server_writer.close()
            client_writer.close()

    proxy = await asyncio.start_server(relay, "127.0.0.1", 0)
    port = proxy.sockets[0].getsockname()[1]
    connections = RedisConnections(HubConfig(redis_url=f"redis://127.0.0.1:{port}/0"))
    default_client = aioredis.Redis(host="127.0.0.1", port=port)
    try:
        assert await connections.commands.ping()
        with pytest.raises((RedisConnectionError, TimeoutError)):
            await connections.commands.incr(f"{prefix}:n")
        assert incr_seen == 1
        with pytest.raises((RedisConnectionError, TimeoutError)):
            await default_client.incr(f"{prefix}:n")
        assert incr_seen > 2  # the contrast: the default client silently re-sent it
    finally:
        await connections.aclose()
        await default_client.aclose()
        proxy.close()
        await proxy.wait_closed()


async def _read_resp_command(reader: asyncio.StreamReader) -> list[bytes]:
    header = await reader.readuntil(b"\r\n")
    assert header.startswith(b"*"), header
    parts = []
    for _ in range(int(header[1:-2])):
        length = await reader.readuntil(b"\r\n")
        data = await reader.readexactly(int(length[1:-2]) + 2)
        parts.append(data[:-2])
    return parts


def _resp_command(parts: list[bytes]) -> bytes:
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


# --------------------------------------------------------------------------- Cluster


async def test_an_unreachable_cluster_is_a_connection_error(prefix: str) -> None:
    """Not redis-py's RedisClusterException, which is not even a RedisError."""
    nobody = free_port()
    connections = RedisConnections(
        HubConfig(redis_url=f"redis://127.0.0.1:{nobody}/0", redis_cluster=True)
    )
    try:
        with pytest.raises(RedisConnectionError, match="cannot be connected"):
            await connections.commands.get(f"{prefix}:k")
        with pytest.raises(RedisConnectionError):
            await connections.pubsub()
        with pytest.raises(RedisConnectionError):
            await connections.run_script_batch(APPEND, [(_client_keys(prefix, 1), ["x"])])
        with pytest.raises(RedisConnectionError):
            async with connections.commands.pipeline() as pipe:
                pipe.set(f"{prefix}:{{a}}", "1")
                await pipe.execute()
    finally:
        await connections.aclose()


async def test_slot_of_agrees_with_the_cluster(redis_cluster: str) -> None:
    client = aioredis.Redis.from_url(redis_cluster)
    try:
        for key in ("plain", "tether:{alice}:out", "{alice}", b"tether:{bob}:seq", "{}x"):
            assert slot_of(key) == await client.execute_command("CLUSTER KEYSLOT", key)
        assert slot_of("tether:{alice}:out") == slot_of("other:{alice}:seq")
    finally:
        await client.aclose()


async def test_group_by_node_puts_each_key_on_the_node_that_serves_it(
    redis_cluster: str, prefix: str
) -> None:
    connections = RedisConnections(HubConfig(redis_url=redis_cluster, redis_cluster=True))
    keys = [f"{prefix}:{{c{i}}}:k" for i in range(40)]
    try:
        groups = await connections.group_by_node(keys)
        assert len(groups) == 3
        for name, members in groups.items():
            host, port = name.rsplit(":", 1)
            node = aioredis.Redis(host=host, port=int(port))
            try:
                for key in members:  # a wrong node would answer MOVED
                    assert await node.set(key, "v")
                    assert await node.delete(key) == 1
            finally:
                await node.aclose()
    finally:
        await connections.aclose()


async def test_a_registered_script_cannot_join_a_cluster_pipeline(redis_cluster: str) -> None:
    """Why run_script_batch queues raw EVALSHA: redis-py blocks evalsha() on a cluster
    pipeline, so `script(client=pipe)` fails before anything is sent."""
    connections = RedisConnections(HubConfig(redis_url=redis_cluster, redis_cluster=True))
    try:
        script = connections.commands.register_script(APPEND.source)
        async with connections.commands.pipeline() as pipe:
            with pytest.raises(RedisClusterException, match="blocked"):
                await script(keys=["{x}:h", "{x}:s"], args=["d"], client=pipe)
    finally:
        await connections.aclose()


async def test_cluster_pubsub_survives_its_node_being_killed(
    fresh_redis_cluster: ClusterTopology, prefix: str
) -> None:
    connections = RedisConnections(
        HubConfig(redis_url=fresh_redis_cluster.seed_url, redis_cluster=True)
    )
    channel = f"{prefix}:chan"
    pubsub = await connections.pubsub()
    try:
        await pubsub.subscribe(channel)
        assert pubsub.connection is not None
        victim = next(n for n in fresh_redis_cluster.nodes if n.port == pubsub.connection.port)
        survivors = [n for n in fresh_redis_cluster.nodes if n is not victim]
        victim.kill()

        with pytest.raises((RedisConnectionError, TimeoutError)):
            async with asyncio.timeout(10):
                while True:  # the dead socket is noticed on the next read
                    await pubsub.get_message(timeout=0.2)
        await pubsub.aclose()

        pubsub = await connections.pubsub()  # lands on a live node
        assert pubsub.connection is not None
        assert pubsub.connection.port in {n.port for n in survivors}
        await pubsub.subscribe(channel)
        publisher = aioredis.Redis(host="127.0.0.1", port=survivors[0].port)
        other = aioredis.Redis(host="127.0.0.1", port=survivors[1].port)
        try:
            await publisher.publish(channel, "after-1")
            await other.publish(channel, "after-2")
            assert set(await _receive(pubsub, 2)) == {b"after-1", b"after-2"}
        finally:
            await publisher.aclose()
            await other.aclose()
    finally:
        await pubsub.aclose()
        await connections.aclose()


async def test_a_dead_master_fails_only_its_own_calls_of_a_batch(
    fresh_redis_cluster: ClusterTopology, prefix: str
) -> None:
    connections = RedisConnections(
        HubConfig(redis_url=fresh_redis_cluster.seed_url, redis_cluster=True)
    )
    calls = [(_client_keys(prefix, i), ["x"]) for i in range(30)]
    try:
        assert await connections.run_script_batch(APPEND, calls) == [1] * 30
        victim = fresh_redis_cluster.node_for_slot(slot_of(calls[0][0][0]))
        victim.kill()

        results = await connections.run_script_batch(APPEND, calls)
        for (keys, _), result in zip(calls, results, strict=True):
            if fresh_redis_cluster.node_for_slot(slot_of(keys[0])) is victim:
                assert isinstance(result, RedisConnectionError | TimeoutError), result
            else:  # ran on a live master - unless the cluster already declared itself down
                assert result == 2 or isinstance(result, ClusterDownError), result
    finally:
        await connections.aclose()


async def test_a_call_to_a_moved_slot_is_redirected_and_runs_once(
    fresh_redis_cluster: ClusterTopology, prefix: str
) -> None:
    connections = RedisConnections(
        HubConfig(redis_url=fresh_redis_cluster.seed_url, redis_cluster=True)
    )
    keys = _client_keys(prefix, 7)
    slot = slot_of(keys[0])
    try:
        await connections.load_script(APPEND)
        assert await connections.run_script_batch(APPEND, [(_client_keys(prefix, 1), ["x"])])
        owner = fresh_redis_cluster.node_for_slot(slot)
        target = next(node for node in fresh_redis_cluster.nodes if node is not owner)
        # Reshard the (still empty) slot behind the client's back: its map is now stale.
        admin = aioredis.Redis(host="127.0.0.1", port=target.port)
        try:
            target_id = (await admin.execute_command("CLUSTER MYID")).decode()
            for node in fresh_redis_cluster.nodes:
                each = aioredis.Redis(host="127.0.0.1", port=node.port)
                try:
                    await each.execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)
                finally:
                    await each.aclose()
        finally:
            await admin.aclose()
        assert fresh_redis_cluster.node_for_slot(slot) is target

        assert await connections.run_script_batch(APPEND, [(keys, ["x"])]) == [1]
        direct = aioredis.Redis(host="127.0.0.1", port=target.port)
        try:
            assert await direct.hget(keys[0], "n") == b"1"  # ran once, on the new owner
        finally:
            await direct.aclose()
    finally:
        await connections.aclose()


# --------------------------------------------------------------------------- Sentinel


async def test_sentinel_writes_continue_after_the_master_is_killed(
    redis_sentinel: SentinelTopology, prefix: str
) -> None:
    connections = RedisConnections(
        HubConfig(redis_sentinels=redis_sentinel.sentinels_setting),
        socket_timeout=1.0,
        connect_timeout=0.5,
    )
    counter = f"{prefix}:n"
    pubsub = await connections.pubsub()
    try:
        for _ in range(100):
            await connections.commands.incr(counter)
        await pubsub.subscribe(f"{prefix}:chan")
        old = redis_sentinel.kill_master()

        errors: list[BaseException] = []
        written_after = 0
        promoted: tuple[str, int] | None = None
        for _ in range(2000):  # bounded: each failed attempt waits 50 ms
            try:
                await connections.commands.incr(counter)
            except (RedisConnectionError, TimeoutError) as exc:
                errors.append(exc)
                await asyncio.sleep(0.05)
                continue
            written_after += 1
            if promoted is None:
                promoted = await redis_sentinel.wait_for_promotion()
            if written_after >= 100:
                break
        assert written_after == 100, f"writes never resumed: {errors[-3:]}"
        assert errors, "the kill went unnoticed: the writes cannot have moved"
        assert promoted is not None and promoted != old
        # the writes really land on the promoted replica
        direct = aioredis.Redis(host=promoted[0], port=promoted[1])
        try:
            assert int(await direct.get(counter)) >= 100
            assert (await direct.info("replication"))["role"] == "master"
        finally:
            await direct.aclose()

        # the old pub/sub connection died with the master; a new one follows the promotion
        with pytest.raises((RedisConnectionError, TimeoutError)):
            async with asyncio.timeout(10):
                while True:
                    await pubsub.get_message(timeout=0.2)
        await pubsub.aclose()
        pubsub = await connections.pubsub()
        assert pubsub.connection is not None
        assert (pubsub.connection.host, pubsub.connection.port) == promoted
        await pubsub.subscribe(f"{prefix}:chan")
        await connections.commands.publish(f"{prefix}:chan", "after failover")
        assert await _receive(pubsub, 1) == [b"after failover"]
    finally:
        await pubsub.aclose()
        await connections.aclose()
