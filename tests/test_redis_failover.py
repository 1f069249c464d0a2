"""Sentinel failover under load, and replica-confirmed acceptance (TETHER_REDIS_MIN_REPLICAS)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.server import serve

from redis_topology import SentinelTopology
from support import until
from tether import Client, Hub, HubConfig, SendStatus
from tether.client import Lost
from tether.transports import websockets as tw

pytestmark = [pytest.mark.redis, pytest.mark.slow]


def sentinel_hub(topology: SentinelTopology, node_id: str, prefix: str, **values: Any) -> Hub:
    return Hub(
        HubConfig(
            backend="redis",
            redis_url="redis://127.0.0.1:6379/0",  # the sentinels name the master
            redis_sentinels=topology.sentinels_setting,
            redis_sentinel_service=topology.service,
            redis_prefix=prefix,
            node_id=node_id,
            presence_ttl=1.5,
            retry_interval=0.1,
            **values,
        )
    )


@contextlib.asynccontextmanager
async def served(hub: Hub) -> AsyncIterator[str]:
    async with serve(tw.handler(hub), "127.0.0.1", 0, **tw.server_options(hub)) as server:
        yield f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def accept(hub: Hub, client_id: str, n: int) -> SendStatus:
    """Send message n until the hub accepts it (or says it already has it); REJECTED and
    UNKNOWN during the failover are resent with the same id, which is always safe."""
    for _ in range(400):
        result = await hub.send(client_id, {"n": n}, critical=True, message_id=f"m{n}")
        if result.status in (SendStatus.QUEUED, SendStatus.SENT, SendStatus.DUPLICATE):
            return result.status
        assert result.status in (SendStatus.REJECTED, SendStatus.UNKNOWN), result
        await asyncio.sleep(0.025)
    raise AssertionError(f"message {n} never accepted")


async def test_nodes_follow_a_sentinel_promotion_mid_stream(
    redis_sentinel: SentinelTopology,
) -> None:
    """Node a produces, node b holds the client's connection; the master is SIGKILLed
    mid-stream. Both nodes follow the promotion by themselves. Every message accepted
    after the failover arrives; nothing arrives twice or out of order; a message accepted
    before it and lost with the master (asynchronous replication) is never lost silently:
    the client is told (a reset)."""
    a = sentinel_hub(redis_sentinel, "a", "fo")
    b = sentinel_hub(redis_sentinel, "b", "fo")
    total, kill_at = 400, 150
    received: list[int] = []
    losses: list[Lost] = []
    async with a, b, served(b) as url:
        client = Client(url, client_id="x", backoff_base=0.05, backoff_max=0.3)
        client.on_lost(losses.append)
        async with client:

            async def read() -> None:
                async for message in client:
                    received.append(message.data["n"])

            reader = asyncio.create_task(read())
            try:
                for n in range(total):
                    if n == kill_at:
                        await until(lambda: len(received) >= kill_at // 2, timeout=20)
                        redis_sentinel.kill_master()
                    await accept(a, "x", n)
                    if n == kill_at:
                        await redis_sentinel.wait_for_promotion()
                await until(lambda: received[-1:] == [total - 1], timeout=60)
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
    assert received == sorted(set(received)), "in order, never twice"
    after = list(range(kill_at + 1, total))
    assert received[-len(after) :] == after, "everything accepted after the failover"
    missing = set(range(total)) - set(received)
    if missing:  # lost with the dead master: the client was told, not left with a gap
        assert any(lost.reset or lost.count for lost in losses), (sorted(missing), losses)
    assert a.backend.describe()["healthy"] or a.backend.errors > 0


async def test_min_replicas_accepts_only_what_a_replica_confirmed(
    redis_sentinel: SentinelTopology,
) -> None:
    hub = sentinel_hub(redis_sentinel, "w", "wait", redis_min_replicas=1)
    async with hub:
        assert await accept(hub, "r", 0) is SendStatus.QUEUED  # the replica confirmed it
        redis_sentinel.replica.kill()  # no replica can confirm anything now
        result = await hub.send("r", {"n": 1}, critical=True, message_id="m1")
        assert result.status is SendStatus.UNKNOWN, result
        assert "replica" in (result.reason or "") and result.message_id == "m1"
        assert result.accepted is False
