"""Exact counts over real sockets: evicted in-flight messages, and ids that move between
plain mode and tether.v1 (issue 12, items 5 and 7)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import serve
from websockets.typing import Subprotocol

from support import hello, recv_json, until
from tether import Client, Hub, HubConfig, ManualClock
from tether.transports import websockets as tw

FAST = {"backoff_base": 0.005, "backoff_max": 0.02}


@contextlib.asynccontextmanager
async def served(hub: Hub) -> AsyncIterator[tuple[str, tw.Handler]]:
    handler = tw.handler(hub)
    async with serve(handler, "127.0.0.1", 0, **tw.server_options(hub)) as server:
        port = server.sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}", handler


def small_hub(size: int, clock: ManualClock | None = None) -> Hub:
    config = HubConfig(max_queue_size=size, overflow_policy="drop_oldest", message_ttl=300)
    return Hub(config, clock=clock or ManualClock())


def counted(hub: Hub) -> tuple[int, int]:
    """(delivered, dropped) as the hub counts them."""
    messages = hub.metrics.snapshot().to_dict()["messages"]
    return messages["delivered"], messages["dropped"]


async def v1(url: str) -> ClientConnection:
    return await connect(url, subprotocols=[Subprotocol("tether.v1")])


async def recv_msgs(ws: ClientConnection, n: int) -> list[int]:
    seqs = []
    for _ in range(n):
        frame = await recv_json(ws)
        assert frame["type"] == "msg", frame
        seqs.append(frame["seq"])
    return seqs


# ------------------------------------------------------------------ item 5: evicted in flight


async def test_evicted_in_flight_messages_count_as_delivered_when_acked_later() -> None:
    hub = small_hub(3)
    async with hub, served(hub) as (url, _):
        ws = await v1(url)
        await hello(ws, "eve")
        for n in range(1, 9):  # 1..5 are pushed out while in flight, 6..8 stay
            await hub.send("eve", n, critical=True)
        assert await recv_msgs(ws, 8) == list(range(1, 9))
        assert hub.metrics.snapshot().to_dict()["queue"]["overflows"] == 5
        assert counted(hub) == (0, 0)  # nothing decided yet: no ack, connection open
        await ws.send(orjson.dumps({"type": "ack", "seq": 4}).decode())
        await until(lambda: counted(hub) == (4, 0))
        await ws.close()
        await until(lambda: not hub.is_connected("eve"))
        # The application kept only up to 4: seq 5 (pushed out) never reached it.
        ws = await v1(url)
        welcome = await hello(ws, "eve", last_seq=4)
        assert welcome["lost"] == 1 and welcome["lost_ranges"] == [[5, 5]]
        assert counted(hub) == (4, 1)
        assert await recv_msgs(ws, 3) == [6, 7, 8]
        await ws.send(orjson.dumps({"type": "ack", "seq": 8}).decode())
        await until(lambda: counted(hub) == (7, 1))
        await ws.close()


async def test_evicted_in_flight_messages_covered_by_the_resuming_hello_are_delivered() -> None:
    hub = small_hub(2)
    async with hub, served(hub) as (url, _):
        ws = await v1(url)
        await hello(ws, "fay")
        for n in range(1, 6):
            await hub.send("fay", n, critical=True)
        assert await recv_msgs(ws, 5) == [1, 2, 3, 4, 5]
        await ws.close()  # no ack: the connection ended first
        await until(lambda: not hub.is_connected("fay"))
        ws = await v1(url)
        welcome = await hello(ws, "fay", last_seq=5)
        assert welcome["lost"] == 0 and welcome["resumed"] is True
        assert counted(hub) == (5, 0)
        await ws.close()


async def test_a_session_forgotten_with_evicted_unacked_messages_counts_them_dropped() -> None:
    clock = ManualClock()
    hub = Hub(
        HubConfig(max_queue_size=2, overflow_policy="drop_oldest", client_ttl=60),
        clock=clock,
    )
    async with hub, served(hub) as (url, _):
        ws = await v1(url)
        await hello(ws, "gus")
        for n in range(1, 5):
            await hub.send("gus", n, critical=True)
        await recv_msgs(ws, 4)
        await ws.send(orjson.dumps({"type": "ack", "seq": 4}).decode())
        await until(lambda: counted(hub) == (4, 0))
        for n in range(5, 9):  # 5, 6 pushed out in flight; 7, 8 acked by nobody
            await hub.send("gus", n, critical=True)
        await recv_msgs(ws, 4)
        await ws.close()
        await until(lambda: not hub.is_connected("gus"))
        assert counted(hub) == (4, 0)
        # A plain-mode connection cannot acknowledge anything: 5, 6 are dropped.
        async with connect(url + "/?client_id=gus") as plain:
            assert [orjson.loads(await plain.recv()) for _ in range(2)] == [7, 8]
            await until(lambda: counted(hub) == (6, 2))


async def test_counts_match_what_a_resumable_client_received_and_was_told_it_lost() -> None:
    total, bursts = 400, 8
    hub = small_hub(4)
    async with hub, served(hub) as (url, handler):
        client = Client(url, client_id="hal", ack_every=16, ack_interval=0.01, **FAST)
        received: list[int] = []

        async def consume() -> None:
            async for msg in client:
                received.append(msg.seq)

        async with client:
            consumer = asyncio.create_task(consume())
            per_burst = total // bursts
            for burst in range(bursts):
                for n in range(per_burst):
                    await hub.send("hal", burst * per_burst + n, critical=True)
                nearly = (burst + 1) * per_burst - 10
                await until(lambda: client.last_seq >= nearly)  # noqa: B023 (awaited here)
                if burst % 2:  # cut it while acks (and maybe messages) are on the way
                    handler.sessions["hal"].abort()
            await until(lambda: client.last_seq >= total)
            await until(lambda: sum(counted(hub)) == total)
            delivered, dropped = counted(hub)
            overflows = hub.metrics.snapshot().to_dict()["queue"]["overflows"]
            assert len(received) == len(set(received)) == client.received
            assert delivered == client.received
            assert dropped == client.lost
            assert client.received + client.lost == total
            assert overflows > dropped  # evicted in flight, then acknowledged: delivered
            consumer.cancel()


# ------------------------------------------------------------------ item 7: plain, then tether.v1


def backend_config(request: pytest.FixtureRequest, tmp_path: Path, kind: str) -> dict[str, Any]:
    if kind == "sqlite":
        return {"backend": "sqlite", "sqlite_path": str(tmp_path / "tether.db")}
    if kind == "redis":
        return {
            "backend": "redis",
            "redis_url": request.getfixturevalue("redis_url"),
            "redis_prefix": request.getfixturevalue("redis_prefix"),
        }
    return {}


@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis"])
@pytest.mark.parametrize("expire", [True, False])
async def test_plain_mode_writes_are_deliveries_a_later_hello_starts_after(
    request: pytest.FixtureRequest, tmp_path: Path, kind: str, expire: bool
) -> None:
    clock = ManualClock()
    hub = Hub(HubConfig(message_ttl=300, **backend_config(request, tmp_path, kind)), clock=clock)
    async with hub, served(hub) as (url, _):
        async with connect(url + "/?client_id=ivy") as plain:
            await hub.send("ivy", "q1", critical=True)
            assert await plain.recv() == "q1"
        await until(lambda: not hub.is_connected("ivy"))
        await hub.send("ivy", "q2", critical=True, ttl=5)
        await hub.send("ivy", "q3", critical=True)
        if expire:
            clock.advance(10)
            await hub.retry_now()
        ws = await v1(url)
        welcome = await hello(ws, "ivy", last_seq=0)
        # q1 is behind the acknowledged position: numbered 1 and acked by its plain-mode
        # write, or (a shared or durable store with nothing held for the client) written
        # directly without being numbered.
        q2 = welcome["acked"] + 1
        assert q2 == 2 if kind == "memory" else q2 in (1, 2), welcome
        if expire:  # exactly the seq nobody received and nobody holds
            assert welcome["lost"] == 1 and welcome["lost_ranges"] == [[q2, q2]], welcome
            assert [(m["seq"], m["data"]) for m in [await recv_json(ws)]] == [(q2 + 1, "q3")]
        else:  # nothing lost: q1 is not re-sent, q2 and q3 follow
            assert welcome["lost"] == 0 and welcome["resumed"] is True, welcome
            frames = [await recv_json(ws) for _ in range(2)]
            assert [(m["seq"], m["data"]) for m in frames] == [(q2, "q2"), (q2 + 1, "q3")]
        await ws.send(orjson.dumps({"type": "ack", "seq": q2 + 1}).decode())
        await until(lambda: hub.pending("ivy") == 0)
        await ws.close()
        messages = hub.metrics.snapshot().to_dict()["messages"]
        assert messages["delivered"] == (2 if expire else 3)
        assert messages["expired"] == (1 if expire else 0)
