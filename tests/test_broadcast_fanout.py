"""Broadcast fan-out without a task per client: every outcome of the direct path is right."""

from __future__ import annotations

import asyncio

from tether import Hub, HubConfig, SendStatus
from tether.clock import ManualClock
from tether.testing import drive_until


class FastTransport:
    """A transport with a synchronous `try_send`, like the websockets adapter's."""

    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode  # ok | busy (socket full: use send) | fail (the write raises)
        self.sent: list[str | bytes] = []
        self.via_send = 0

    def try_send(self, data: str | bytes) -> bool:
        if self.mode == "busy":
            return False
        if self.mode == "fail":
            raise ConnectionError("write failed")
        self.sent.append(data)
        return True

    async def send(self, data: str | bytes) -> None:
        await asyncio.sleep(0)
        self.via_send += 1
        self.sent.append(data)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        return None


async def test_critical_broadcast_outcomes(clock: ManualClock) -> None:
    hub = Hub(
        HubConfig(failure_threshold=100, retry_base_delay=0.1, retry_max_delay=0.1), clock=clock
    )
    ok, busy, bad = FastTransport(), FastTransport("busy"), FastTransport("fail")
    for cid, transport in (("ok", ok), ("busy", busy), ("bad", bad)):
        await hub.connect(cid, transport)
    await hub.disconnect("bad")  # reconnect below, after an offline message queued
    await hub.send("bad", "first", critical=True)
    await hub.connect("bad", bad)  # the flush fails: "first" stays queued
    result = await hub.broadcast("news", critical=True, message_id="n1")
    # ok: written directly; busy: stored, then flushed when the socket drains; bad: queued
    assert (result.sent, result.queued) == (1, 2)
    assert result.reasons["waiting for the connection to drain"] == 1
    assert ok.sent == ["news"] and ok.via_send == 0
    async with asyncio.timeout(2):
        while hub.pending("busy"):
            await asyncio.sleep(0.001)
    assert busy.sent == ["news"] and busy.via_send == 1
    assert hub.pending("bad") == 2
    again = await hub.broadcast("news", critical=True, message_id="n1")
    assert again.duplicate == 3  # recorded for every client that accepted it
    bad.mode = "ok"
    await drive_until(hub, clock, lambda: hub.pending("bad") == 0, step=0.1)
    assert bad.sent == ["first", "news"]  # order kept behind the earlier message
    await hub.shutdown()


async def test_a_fanned_out_message_the_socket_cannot_take_yet_keeps_its_place() -> None:
    hub = Hub(HubConfig())
    transport = FastTransport("busy")
    await hub.connect("c", transport)
    first = await hub.broadcast("one", critical=True)
    assert first.queued == 1  # stored; flushed in the background when the socket drains
    second = await hub.send("c", "two", critical=True)
    assert second.status is SendStatus.QUEUED
    async with asyncio.timeout(2):
        while hub.pending("c"):
            await asyncio.sleep(0.001)
    assert transport.sent == ["one", "two"]
    await hub.shutdown()


async def test_best_effort_broadcast_direct_and_awaited(clock: ManualClock) -> None:
    hub = Hub(HubConfig(), clock=clock)
    ok, busy, bad = FastTransport(), FastTransport("busy"), FastTransport("fail")
    for cid, transport in (("ok", ok), ("busy", busy), ("bad", bad)):
        await hub.connect(cid, transport)
    result = await hub.broadcast({"x": 1})
    assert (result.sent, result.dropped) == (2, 1)
    assert result.reasons == {"send failed": 1}
    assert ok.sent == busy.sent == ['{"x":1}']
    data = hub.metrics.snapshot().to_dict()["messages"]
    assert (data["sent"], data["delivered"], data["dropped"], data["failed"]) == (2, 2, 1, 1)
    await hub.shutdown()
