"""One regression test per bug the prototype shipped, so none of them can come back.

Tests taking `hub` or `make_hub` run on the memory backend and on Redis (tests/conftest.py);
the memory-only ones say why.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import tracemalloc
from collections.abc import Callable

import pytest

from tether import CircuitState, Hub, HubConfig, SendStatus
from tether.clock import ManualClock
from tether.protocol import Hello
from tether.testing import MockWebSocket, connect_mock_clients, drive_until

MakeHub = Callable[..., Hub]


@pytest.fixture
def hub(bhub: Hub) -> Hub:
    """The started hub of each test, on each backend."""
    return bhub


async def test_breaker_is_per_client_and_always_recovers(hub: Hub, clock: ManualClock) -> None:
    """Prototype: one global breaker, which never recovered."""
    mocks = await connect_mock_clients(hub, 3)
    mocks["client-0"].failure_rate = 1.0
    for _ in range(hub.config.failure_threshold):
        await hub.send("client-0", "x")
    assert hub.circuit_state("client-0") is CircuitState.OPEN
    # The others are untouched and still deliver.
    for other in ("client-1", "client-2"):
        assert hub.circuit_state(other) is CircuitState.CLOSED
        assert (await hub.send(other, "fine")).status is SendStatus.SENT
    # And the bad one recovers by itself once it behaves.
    mocks["client-0"].failure_rate = 0.0
    await hub.send("client-0", "queued-1", critical=True)
    await hub.send("client-0", "queued-2", critical=True)  # success_threshold (2) trials close it
    await drive_until(hub, clock, lambda: hub.circuit_state("client-0") is CircuitState.CLOSED)
    assert mocks["client-0"].sent == ["queued-1", "queued-2"]


async def test_dedup_records_only_accepted_messages(hub: Hub, mock_ws: MockWebSocket) -> None:
    """Prototype: recorded the id before sending, so a failed send could never be retried."""
    await hub.connect("amy", mock_ws)
    mock_ws.fail_next(1)
    first = await hub.send("amy", {"id": "order-7", "total": 3})
    assert first.status is SendStatus.DROPPED and first.reason == "send failed"
    retry = await hub.send("amy", {"id": "order-7", "total": 3})
    assert retry.status is SendStatus.SENT  # not DUPLICATE: the first was never accepted
    assert (await hub.send("amy", {"id": "order-7"})).status is SendStatus.DUPLICATE


async def test_dedup_ids_are_scoped_per_client(hub: Hub) -> None:
    """Prototype: ids were global, so a broadcast with an id reached only one client."""
    mocks = await connect_mock_clients(hub, 4)
    result = await hub.broadcast({"id": "news-1", "text": "hello"}, critical=True)
    assert result.sent == 4 and result.duplicate == 0
    for ws in mocks.values():
        assert ws.payloads == [{"id": "news-1", "text": "hello"}]
    for cid in mocks:
        assert (await hub.send(cid, {"id": "dm-1"})).status is SendStatus.SENT
    again = await hub.broadcast({"id": "news-1", "text": "hello"})
    assert again.duplicate == 4


async def test_retries_keep_their_count_and_the_queue_order(
    clock: ManualClock, make_hub: MakeHub
) -> None:
    """Prototype: a retry reset its own attempt counter and re-appended the message at
    the back of the queue, so order broke and a poison message retried forever."""
    hub = make_hub(
        HubConfig(max_retries=3, failure_threshold=1000, retry_base_delay=0.5, retry_max_delay=1)
    )
    ws = MockWebSocket()
    await hub.connect("ben", ws)
    ws.fail_next(2)
    for n in range(5):
        await hub.send("ben", n, critical=True, message_id=f"m{n}")
    await drive_until(hub, clock, lambda: hub.pending("ben") == 0)
    assert ws.payloads == [0, 1, 2, 3, 4]

    ws.failure_rate = 1.0
    await hub.send("ben", "poison", critical=True)
    await hub.send("ben", "after", critical=True)
    await drive_until(hub, clock, lambda: bool(hub.dead_letters("ben")))
    letter = hub.dead_letters("ben")[0]
    assert letter.data == "poison" and letter.attempts == hub.config.max_retries + 1
    ws.failure_rate = 0.0
    await drive_until(hub, clock, lambda: hub.pending("ben") == 0)
    assert ws.sent[-1] == "after"
    assert hub.metrics.snapshot().to_dict()["messages"]["dead_lettered"] == 1


async def test_expired_messages_leave_the_queue_cleanly(hub: Hub, clock: ManualClock) -> None:
    """Prototype: an expired message at the head crashed the dequeue."""
    await hub.send("cat", "short", critical=True, ttl=5)
    await hub.send("cat", "long", critical=True, ttl=500)
    await hub.send("cat", "short too", critical=True, ttl=5)
    clock.advance(6)
    await hub.retry_now()
    if not hub.backend.shared:  # on Redis the offline outbox is expired when it is loaded
        assert hub.pending("cat") == 1
    ws = MockWebSocket()
    await hub.connect("cat", ws)
    assert ws.sent == ["long"]
    assert hub.metrics.snapshot().to_dict()["messages"]["expired"] == 2


async def test_expiry_during_a_connected_flush(clock: ManualClock, make_hub: MakeHub) -> None:
    hub = make_hub(HubConfig(failure_threshold=1000))
    ws = MockWebSocket()
    await hub.connect("cat", ws)
    ws.fail_next(1)
    await hub.send("cat", "head", critical=True, ttl=1)  # fails, waits for a retry
    await hub.send("cat", "next", critical=True)
    clock.advance(2)
    await hub.retry_now()  # expires the head, then delivers the next
    assert ws.sent == ["next"]
    await hub.shutdown()


async def test_shutdown_never_loses_messages_silently(
    clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Prototype: shutdown dropped queued messages without a word."""
    # memory only: a durable backend persists them (test_redis_backend checks that)
    hub = Hub(HubConfig(), clock=clock)
    for n in range(7):
        await hub.send("dan", n, critical=True)
    with caplog.at_level(logging.WARNING, logger="tether"):
        stats = await hub.shutdown()
    assert stats.pending_messages_dropped == 7
    assert stats.pending_messages_flushed + stats.pending_messages_persisted == 0
    assert any("7 undelivered" in r.getMessage() for r in caplog.records)


async def test_metrics_memory_is_flat_in_the_number_of_events(hub: Hub) -> None:
    """Prototype: 3.5 MB per 10,000 events. Ours stays flat: fixed histogram, counters."""
    ws = MockWebSocket()
    await hub.connect("eve", ws)
    ws.sent = _Discard()  # type: ignore[assignment]
    for _ in range(1000):  # warm up every code path
        await hub.send("eve", "x")
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.take_snapshot()
        for _ in range(10_000):
            await hub.send("eve", "x")
            hub.metrics.record_latency(0.001)
        after_10k = tracemalloc.take_snapshot()
        for _ in range(40_000):
            hub.metrics.record_latency(0.002)
            await hub.send("eve", "x")
        after_50k = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()

    def grown(snapshot: tracemalloc.Snapshot) -> int:
        return sum(
            s.size_diff for s in snapshot.compare_to(base, "filename") if "metrics" in str(s)
        )

    assert grown(after_10k) < 100 * 1024
    assert grown(after_50k) < 100 * 1024


async def test_a_message_id_with_a_lone_surrogate_is_refused_alone(bhub: Hub) -> None:
    # Python strings may hold lone surrogates; no store or wire can. Refused up front with
    # a reason, the sends sharing its event-loop turn (one store round trip) unharmed.
    bad, good = "a\ud800b", "ok-1"
    results = await asyncio.gather(
        bhub.send("offline-1", "x", critical=True, message_id=bad),
        bhub.send("offline-2", "y", critical=True, message_id=good),
        bhub.send("offline-3", "z", critical=True),
    )
    assert results[0].status is SendStatus.REJECTED
    assert "message_id" in (results[0].reason or "")
    assert [r.status for r in results[1:]] == [SendStatus.QUEUED, SendStatus.QUEUED]
    ws = MockWebSocket()
    await bhub.connect("offline-2", ws, hello=Hello("offline-2", 0))
    assert [f["id"] for f in ws.frames if f.get("type") == "msg"] == [good]
    channel = await bhub.publish("room", "p", message_id=bad)
    assert channel.status.value == "rejected"
    assert "message_id" in (channel.reason or "")


class _Discard(list[object]):
    def append(self, _item: object) -> None:
        pass
