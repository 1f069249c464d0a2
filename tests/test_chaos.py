"""Chaos: 5,000 critical messages reach a tether.Client exactly once, in order, across 27 cuts."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from websockets.asyncio.server import Server, serve

from conftest import MakeHub
from support import until
from tether import Hub, HubConfig
from tether.client import Client, ClientState, Message
from tether.transports import websockets as tw
from tether.transports.connection import Session

N = 5_000
SERVER_KILLS = 26
WINDOW = 100


@dataclass
class Served:
    url: str
    handler: tw.Handler
    server: Server


@contextlib.asynccontextmanager
async def ws_server(hub: Hub) -> AsyncIterator[Served]:
    handler = tw.handler(hub)
    async with serve(handler, "127.0.0.1", 0, **tw.server_options(hub)) as server:
        port = server.sockets[0].getsockname()[1]
        yield Served(f"ws://127.0.0.1:{port}", handler, server)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [20240601, 7, 1234])
async def test_5000_critical_messages_survive_server_kills_and_a_client_drop(seed: int) -> None:
    await chaos(Hub(HubConfig(max_queue_size=N, send_timeout=2.0)), seed)


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend_kind", ["redis", "redis-cluster", "redis-sentinel"], indirect=True
)
async def test_chaos_on_each_redis_topology(make_hub: MakeHub) -> None:
    """The same cuts with the stream in Redis: one server, a Cluster, Sentinel."""
    await chaos(make_hub(max_queue_size=N, send_timeout=2.0), 20240601)


@pytest.mark.slow
@pytest.mark.parametrize("backend_kind", ["sqlite"], indirect=True)
async def test_chaos_on_sqlite(make_hub: MakeHub) -> None:
    """The same cuts with the stream in a SQLite file (every message stored and committed
    before it is acknowledged, trimmed by each ack)."""
    await chaos(make_hub(max_queue_size=N, send_timeout=2.0), 20240601)


async def chaos(hub: Hub, seed: int) -> None:
    rng = random.Random(seed)
    points = rng.sample(range(20, N - 20), SERVER_KILLS + 1)
    server_kills = set(points[:SERVER_KILLS])
    client_drop = points[SERVER_KILLS]
    async with hub, ws_server(hub) as srv:
        client = Client(
            srv.url,
            client_id="chaos",
            backoff_base=0.001,
            backoff_max=0.01,
            ack_every=32,
            ack_interval=0.005,
            rng=random.Random(seed),
        )
        received: list[Message] = []

        async def consume() -> None:
            async for msg in client:
                received.append(msg)
                if len(received) == N:
                    return

        async with client:
            consumer = asyncio.create_task(consume())
            killed: list[Session] = []

            def live() -> Session | None:
                session = srv.handler.sessions.get("chaos")
                if session is None or session in killed or not hub.is_connected("chaos"):
                    return None
                return session

            for n in range(1, N + 1):
                await hub.send("chaos", {"n": n}, critical=True)
                # A producer that stays at most ~WINDOW messages ahead of the consumer,
                # yielding at random: kills then land with messages on the wire, received
                # but not yet acknowledged, and the resume must drop the re-sent ones.
                if n - len(received) > WINDOW:
                    caught_up = n - WINDOW // 2
                    await until(lambda k=caught_up: len(received) >= k, timeout=10)
                elif rng.random() < 0.2:
                    await asyncio.sleep(0)
                if n in server_kills:
                    # Wait for a live connection so that every kill really cuts one.
                    await until(lambda: live() is not None)
                    session = live()
                    assert session is not None
                    killed.append(session)
                    session.abort()  # drop the TCP connection, no close handshake
                if n == client_drop:
                    await until(
                        lambda: client.state is ClientState.CONNECTED and live() is not None
                    )
                    assert client.connection is not None
                    client.connection.transport.abort()
            done, _ = await asyncio.wait({consumer}, timeout=20)
            if not done:
                consumer.cancel()
                seqs = [m.seq for m in received]
                gap = next((i + 1 for i, s in enumerate(seqs) if s != i + 1), len(seqs) + 1)
                pytest.fail(f"received {len(seqs)} of {N}; seq {gap} never arrived in order")
            consumer.result()

        assert len(killed) == SERVER_KILLS
        seqs = [m.seq for m in received]
        assert seqs == list(range(1, N + 1)), "exactly 1..N, in order, no duplicates"
        assert [m.data["n"] for m in received] == seqs
        assert client.received == N and client.lost == 0
        assert client.reconnects >= SERVER_KILLS + 1
        await until(lambda: hub.pending("chaos") == 0)  # everything acknowledged
        assert hub.dead_letters("chaos") == []
