"""Channels across two `tether serve` nodes on Redis: a subscriber's node is killed mid-stream."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import until
from test_redis_cluster import Node
from tether import Hub, HubConfig
from tether.channels import PublishStatus
from tether.client import Client, ClientState
from tether.subscription import Publication, Subscription

pytestmark = [pytest.mark.redis, pytest.mark.slow]  # server processes

N = 2_000
KILL_AT = 700
WINDOW = 200


@pytest.fixture
def nodes(redis_url: str, redis_prefix: str, tmp_path: Path) -> Iterator[list[Node]]:
    started = [Node(name, redis_prefix, redis_url, tmp_path).start() for name in ("a", "b")]
    yield started
    for node in started:
        node.kill(signal.SIGKILL)


def subscriber(urls: list[str], client_id: str) -> Client:
    return Client(urls, client_id=client_id, backoff_base=0.01, backoff_max=0.2, open_timeout=3)


async def collect(sub: Subscription, into: list[Publication]) -> None:
    async for pub in sub:
        into.append(pub)
        if len(into) == N:
            return


async def test_subscribers_get_every_message_once_when_a_node_dies(
    nodes: list[Node], redis_url: str, redis_prefix: str
) -> None:
    a, b = nodes
    # The publisher is a third node (this process) on the same Redis.
    publisher = Hub(
        HubConfig(backend="redis", redis_url=redis_url, redis_prefix=redis_prefix, node_id="pub")
    )
    async with (
        publisher,
        subscriber([a.ws, b.ws], "on-a") as first,
        subscriber([b.ws, a.ws], "on-b") as second,
        subscriber([a.ws], "only-a") as stranded,
        subscriber([b.ws], "watcher") as watcher,
    ):
        subs = [await first.subscribe("ticks"), await second.subscribe("ticks")]
        await stranded.subscribe("ticks")
        watching = await watcher.subscribe("ticks", presence=True)
        left: list[str] = []
        watching.on_leave(left.append)
        assert set(await publisher.presence("ticks")) == {"on-a", "on-b", "only-a", "watcher"}
        received: list[list[Publication]] = [[], []]
        consumers = [
            asyncio.create_task(collect(s, r)) for s, r in zip(subs, received, strict=True)
        ]
        for n in range(1, N + 1):
            result = await publisher.publish("ticks", {"n": n}, message_id=f"t{n}")
            assert result.status is PublishStatus.PUBLISHED and result.offset == n
            if n - min(len(r) for r in received) > WINDOW:
                floor = n - WINDOW // 2
                await until(lambda f=floor: min(len(r) for r in received) >= f, timeout=30)
            if n == KILL_AT:
                assert first.url == a.ws and first.state is ClientState.CONNECTED
                a.kill(signal.SIGKILL)  # the node serving "on-a" dies mid-stream
        done, _ = await asyncio.wait(consumers, timeout=60)
        assert len(done) == 2, [len(r) for r in received]
        for sub, got in zip(subs, received, strict=True):
            assert [p.offset for p in got] == list(range(1, N + 1))
            assert [p.data["n"] for p in got] == list(range(1, N + 1))
            assert sub.lost == 0
        assert first.url == b.ws and first.reconnects >= 1
        # Both are now served by b; "on-a" moved there. "only-a" can reach no node: the dead
        # node's entry for it expires (presence_ttl), nobody having removed it.
        members: dict[str, dict[str, object]] = {}

        async def poll() -> None:
            members.clear()
            members.update(await publisher.presence("ticks"))

        async with asyncio.timeout(30):
            await poll()
            while "only-a" in members:
                await asyncio.sleep(0.2)
                await poll()
        assert set(members) == {"on-a", "on-b", "watcher"}
        assert {info["node"] for info in members.values()} == {"b"}
        # The watcher on b was told: a leave for the stranded client (its entry expired).
        await until(lambda: "only-a" in left, timeout=30)
