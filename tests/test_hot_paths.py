"""The delivery hot paths over real sockets: frames written directly, acks settled as they
arrive, a broadcast's shared frame parts, and metrics that read exact despite batching."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect

from support import closed_with, hello, recv_json, until
from tether import Hub, HubConfig, ManualClock, protocol
from tether.session import DeliveryLock
from tether.transports.websockets import serve

V1 = ["tether.v1"]
# Without compression the adapter frames messages itself and writes them to the socket;
# with permessage-deflate negotiated (the `websockets` client's default) the library does.
RAW = {"compression": None}


@contextlib.asynccontextmanager
async def served(hub: Hub) -> AsyncIterator[str]:
    async with serve(hub, "127.0.0.1", 0) as server:
        yield f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"


def make_hub(**values: Any) -> Hub:
    values.setdefault("backend", "memory")
    return Hub(HubConfig(**values), clock=ManualClock())


@pytest.mark.parametrize("compression", [None, "deflate"])
async def test_frames_of_every_length_class_arrive_intact(compression: str | None) -> None:
    # 7-bit, 16-bit and 64-bit payload lengths, text and binary, one client and a
    # broadcast (whose frame is made once and written to every client).
    sizes = [0, 1, 125, 126, 127, 65_535, 65_536, 70_000]
    async with make_hub(max_message_size=100_000) as hub, served(hub) as url:
        options = {"compression": compression, "max_size": None}
        async with (
            connect(url + "/?client_id=a", **options) as a,
            connect(url + "/?client_id=b", **options) as b,
        ):
            await until(lambda: hub.is_connected("a") and hub.is_connected("b"))
            for size in sizes:
                text = "é" * (size // 2) + "x" * (size % 2)  # multi-byte UTF-8
                binary = bytes(range(256)) * (size // 256) + bytes(size % 256)
                assert (await hub.send("a", text)).status.value == "sent"
                assert await a.recv() == text
                result = await hub.broadcast(binary)
                assert result.sent == 2
                assert await a.recv() == binary
                assert await b.recv() == binary


async def test_v1_broadcast_frames_differ_only_by_seq() -> None:
    async with make_hub() as hub, served(hub) as url:
        clients: list[ClientConnection] = []
        async with contextlib.AsyncExitStack() as stack:
            for name in ("a", "b", "c"):
                ws = await stack.enter_async_context(connect(url, subprotocols=V1, **RAW))
                await hello(ws, name)
                clients.append(ws)
            await hub.send("b", "first", critical=True)  # b's seqs run one ahead
            assert (await recv_json(clients[1]))["seq"] == 1
            for n in range(3):
                await hub.broadcast({"n": n}, critical=True, message_id=f"m{n}")
                await hub.broadcast(b"\x00\xff", critical=True, message_id=f"bin{n}")
            for ws, first in zip(clients, (1, 2, 1), strict=True):
                frames = [await recv_json(ws) for _ in range(6)]
                assert [f["seq"] for f in frames] == list(range(first, first + 6))
                assert [f["id"] for f in frames] == ["m0", "bin0", "m1", "bin1", "m2", "bin2"]
                assert [f.get("enc") for f in frames] == [None, "base64"] * 3
                assert [f["data"] for f in frames[::2]] == [{"n": 0}, {"n": 1}, {"n": 2}]
                assert all(f["data"] == "AP8=" for f in frames[1::2])


async def test_acks_are_settled_as_they_arrive_and_counted() -> None:
    async with (
        make_hub() as hub,
        served(hub) as url,
        connect(url, subprotocols=V1, **RAW) as ws,
    ):
        await hello(ws, "carol")
        for n in range(5):
            await hub.send("carol", n, critical=True)
        assert [(await recv_json(ws))["seq"] for _ in range(5)] == [1, 2, 3, 4, 5]
        await ws.send(protocol.encode(protocol.Ack(2)))
        await until(lambda: hub.pending("carol") == 3)
        await ws.send(protocol.encode(protocol.Ack(2)))  # a repeat delivers nothing
        await ws.send(protocol.encode(protocol.Ack(5)))
        await until(lambda: hub.pending("carol") == 0)
        messages = hub.metrics.snapshot().to_dict()["messages"]
        assert messages["sent"] == 5 and messages["delivered"] == 5
        assert hub.metrics.snapshot().to_dict()["latency"]["count"] == 5
        # An ack beyond what was sent still gets its error and close code.
        await ws.send(protocol.encode(protocol.Ack(6)))
        error = await recv_json(ws)
        assert (error["type"], error["code"]) == ("error", "invalid_ack")
        assert await closed_with(ws) == 1002


async def test_acks_count_toward_the_inbound_rate() -> None:
    async with (
        make_hub(max_inbound_rate=5) as hub,
        served(hub) as url,
        connect(url, subprotocols=V1, **RAW) as ws,
    ):
        await hello(ws, "flooder")
        for _ in range(60):
            with contextlib.suppress(Exception):
                await ws.send(protocol.encode(protocol.Ack(0)))
        error = await recv_json(ws)
        assert (error["type"], error["code"]) == ("error", "rate_limited")
        assert await closed_with(ws) == 1008


async def test_acks_and_publishes_keep_their_order() -> None:
    # A publish whose handler is still running holds the connection's task; acks that
    # arrive meanwhile are settled at once, and publishes are handled in order.
    seen: list[tuple[int, int]] = []
    release = asyncio.Event()
    async with make_hub() as hub, served(hub) as url:

        @hub.on_message
        async def handler(client_id: str, data: Any) -> None:
            if data == 0:
                await release.wait()
            seen.append((data, hub.pending(client_id)))

        async with connect(url, subprotocols=V1, **RAW) as ws:
            await hello(ws, "dana")
            for n in range(4):
                await hub.send("dana", n, critical=True)
            assert [(await recv_json(ws))["seq"] for _ in range(4)] == [1, 2, 3, 4]
            await ws.send(orjson.dumps({"type": "publish", "data": 0}).decode())
            await until(lambda: hub.metrics.snapshot().to_dict()["messages"]["received"] == 1)
            await ws.send(protocol.encode(protocol.Ack(3)))
            await until(lambda: hub.pending("dana") == 1)  # settled while the handler waits
            await ws.send(orjson.dumps({"type": "publish", "data": 1}).decode())
            await ws.send(protocol.encode(protocol.Ack(4)))
            release.set()
            await until(lambda: len(seen) == 2)
            assert seen[0] == (0, 1)
            assert seen[1][0] == 1
            await until(lambda: hub.pending("dana") == 0)


async def test_totals_stay_exact_when_clients_are_forgotten() -> None:
    clock = ManualClock()
    async with Hub(HubConfig(client_ttl=10), clock=clock) as hub:
        for name in ("a", "b"):
            await hub.connect(name, _Sink())
            await hub.send(name, "x")
            await hub.send(name, "y", critical=True)
        await hub.broadcast("z")
        before = hub.metrics.snapshot()
        assert before.counter("messages_sent") == 6
        assert before.counter("messages_delivered") == 6
        await hub.disconnect("a")
        clock.advance(60)
        assert await hub.cleanup_now() == 1
        after = hub.metrics.snapshot()
        assert after.counter("messages_sent") == 6
        assert after.counter("messages_delivered") == 6
        assert after.diff(before).counter("messages_delivered") == 0
        text = _prometheus(hub)
        assert "tether_messages_delivered_total 6.0" in text
        assert "tether_latency_seconds_count 6.0" in text
        stats = await hub.shutdown()
        assert stats.metrics_cleaned == 1
    assert hub.metrics.snapshot().counter("messages_delivered") == 6


async def test_every_latency_sample_is_read_whatever_the_batching() -> None:
    async with Hub(HubConfig(max_queue_size=10_000)) as hub:
        for n in range(20):
            await hub.connect(f"c{n}", _Sink())
        for _ in range(30):
            await hub.broadcast({"t": 1})
            await hub.broadcast({"t": 2}, critical=True)
        for n in range(700):  # more than the sample buffer holds
            await hub.send(f"c{n % 20}", n, critical=n % 2 == 0)
        latency = hub.metrics.snapshot().to_dict()["latency"]
        assert latency["count"] == 30 * 20 * 2 + 700
        assert hub.metrics.snapshot().counter("messages_delivered") == latency["count"]
        assert "tether_latency_seconds_count 1900.0" in _prometheus(hub)


class _Sink:
    """A transport whose socket always takes the frame at once."""

    def __init__(self) -> None:
        self.frames: list[str | bytes] = []

    def try_send(self, data: str | bytes) -> bool:
        self.frames.append(data)
        return True

    async def send(self, data: str | bytes) -> None:
        self.frames.append(data)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        return None


def _prometheus(hub: Hub) -> str:
    from prometheus_client import generate_latest

    return generate_latest(hub.metrics.prometheus_registry).decode()


class _GatedTransport:
    """Takes frames at once unless `blocked`; an awaited write waits for `opened`."""

    def __init__(self) -> None:
        self.frames: list[str | bytes] = []
        self.blocked = True
        self.opened = asyncio.Event()

    def try_send(self, data: str | bytes) -> bool:
        if self.blocked:
            return False
        self.frames.append(data)
        return True

    async def send(self, data: str | bytes) -> None:
        await self.opened.wait()
        self.frames.append(data)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        pass


@pytest.mark.parametrize("critical", [False, True])
async def test_a_send_never_overtakes_one_waiting_for_the_clients_turn(critical: bool) -> None:
    # m1 is in an awaited write, m2 waits for the client's turn; when m1's write ends, a
    # send made before m2 resumes (the lock is free, its waiter not yet run) goes after m2.
    hub = make_hub()
    async with hub:
        ws = _GatedTransport()
        await hub.connect("c", ws)
        first = asyncio.create_task(hub.send("c", "m1", critical=critical))
        for _ in range(3):
            await asyncio.sleep(0)
        second = asyncio.create_task(hub.send("c", "m2", critical=critical))
        for _ in range(3):
            await asyncio.sleep(0)

        async def third() -> Any:
            await ws.opened.wait()  # woken right after m1's write, before m2's turn
            return await hub.send("c", "m3", critical=critical)

        late = asyncio.create_task(third())
        await asyncio.sleep(0)
        ws.blocked = False
        ws.opened.set()
        await asyncio.gather(first, second, late)
        assert ws.frames == ["m1", "m2", "m3"]


async def test_a_delivery_lock_is_taken_without_a_coroutine_only_when_acquire_would_not_wait() -> (
    None
):
    """`take_if_free` agrees with `acquire`: it takes a free lock, never one that is held or
    that someone waits for (the waiter is served first, in order)."""
    lock = DeliveryLock()
    assert lock.take_if_free() and lock.locked()
    assert not lock.take_if_free()  # held
    order: list[str] = []

    async def waiter() -> None:
        async with lock:
            order.append("waiter")

    task = asyncio.ensure_future(waiter())
    await asyncio.sleep(0)  # it waits in line
    lock.release()
    assert not lock.locked()
    assert not lock.take_if_free()  # released, but the waiter is next
    await task
    assert order == ["waiter"]
    assert lock.take_if_free()  # free again, nobody waiting
    lock.release()
