"""The seed report's twenty hub scenarios, through the public API on a manual clock.

Every test that takes `hub` or `make_hub` runs twice: on the memory backend and on
Redis (see tests/conftest.py). The few that stay memory-only say why: a ManualClock
cannot drive Redis' own PX expiry (dedup windows), and a shared backend keeps an
offline client's outbox in Redis rather than on the node (shutdown/cleanup accounting).
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import random
from collections.abc import Callable

import pytest

from tether import CircuitState, Hub, HubConfig, SendStatus
from tether.clock import ManualClock
from tether.testing import (
    MockWebSocket,
    assert_backoff_schedule,
    assert_metrics_delta,
    connect_mock_clients,
    drive_until,
    wait_for_circuit_state,
)


def counters(hub: Hub) -> dict[str, dict[str, object]]:
    return hub.metrics.snapshot().to_dict()


MakeHub = Callable[..., Hub]


@pytest.fixture
def hub(bhub: Hub) -> Hub:
    """The started hub of each test, on each backend."""
    return bhub


async def stored_pending(hub: Hub, client_id: str) -> int:
    """Messages waiting for a client: with a shared backend an offline client's outbox
    is in the store, not on the node."""
    if hub.backend.shared and not hub.is_connected(client_id):
        return int(await hub.backend.pending_count(client_id) or 0)
    return hub.pending(client_id)


# 1
async def test_single_client_lifecycle_exact_counts(hub: Hub, mock_ws: MockWebSocket) -> None:
    before = hub.metrics.snapshot()
    await hub.connect("alice", mock_ws)
    assert (
        await hub.send("alice", {"id": "m1", "text": "hi"}, critical=True)
    ).status is SendStatus.SENT
    assert (await hub.send("alice", "best effort")).status is SendStatus.SENT
    await hub.disconnect("alice")
    queued = await hub.send("alice", {"text": "while away"}, critical=True)
    assert queued.status is SendStatus.QUEUED and queued.reason == "client not connected"
    dropped = await hub.send("alice", "ephemeral")
    assert dropped.status is SendStatus.DROPPED and dropped.reason == "client not connected"
    again = MockWebSocket()
    await hub.connect("alice", again)
    assert again.payloads == [{"text": "while away"}]
    assert_metrics_delta(
        before,
        hub.metrics.snapshot(),
        connections_total=2,
        connections_reconnections=1,
        messages_sent=3,
        messages_delivered=3,
        messages_queued=1,
        messages_dropped=1,
        messages_failed=0,
    )
    data = counters(hub)
    assert data["connections"]["active"] == 1
    assert mock_ws.close_code == 1000


# 2
async def test_ten_concurrent_lifecycles_exact_counts(hub: Hub) -> None:
    async def lifecycle(i: int) -> MockWebSocket:
        ws = MockWebSocket(name=f"c{i}")
        await hub.connect(f"c{i}", ws)
        for n in range(5):
            await hub.send(f"c{i}", {"n": n}, critical=n % 2 == 0)
        await hub.disconnect(f"c{i}")
        await hub.send(f"c{i}", {"n": "late"}, critical=True)
        return ws

    mocks = await asyncio.gather(*(lifecycle(i) for i in range(10)))
    for ws in mocks:
        assert ws.payloads == [{"n": n} for n in range(5)]
    data = counters(hub)
    assert data["connections"] == {
        "total": 10,
        "active": 0,
        "failed": 0,
        "reconnections": 0,
        "timeouts": 0,
    }
    assert data["messages"]["sent"] == 50
    assert data["messages"]["delivered"] == 50
    assert data["messages"]["queued"] == 10
    # On a shared backend the late messages of offline clients live in Redis only.
    assert data["queue"]["current_size"] == (0 if hub.backend.shared else 10)
    assert sum([await stored_pending(hub, f"c{i}") for i in range(10)]) == 10
    assert data["memory"]["tracked_clients"] == 10


# 3
async def test_shutdown_during_active_connections_exact_stats(clock: ManualClock) -> None:
    # memory only: the offline client's messages are dropped here; on Redis they were
    # never on the node (see test_redis_backend for the durable accounting)
    hub = Hub(HubConfig(), clock=clock)
    mocks = await connect_mock_clients(hub, 3)
    await hub.disconnect("client-2")
    for i in range(4):
        await hub.send("client-2", {"i": i}, critical=True)  # offline: stays queued
    mocks["client-1"].fail_next(1)
    await hub.send("client-1", "retry me", critical=True)  # failed once, waits for retry
    stats = await hub.shutdown(timeout=1.0)
    assert stats.pending_messages_flushed == 1  # client-1's message, written during shutdown
    assert (
        stats.pending_messages_dropped == 4
    )  # client-2 was offline; memory backend cannot keep them
    assert stats.pending_messages_persisted == 0
    assert stats.connections_closed == 2
    assert stats.background_tasks_stopped == 2
    assert stats.metrics_cleaned == 3
    assert mocks["client-0"].close_code == 1001 and mocks["client-1"].close_code == 1001
    assert mocks["client-1"].payloads == ["retry me"]
    late = await hub.send("client-0", "too late")
    assert late.status is SendStatus.REJECTED and late.reason == "shutting down"


# 4, 5, 8
async def test_breaker_opens_after_five_failures_queues_critical_and_fails_fast(
    hub: Hub, mock_ws: MockWebSocket
) -> None:
    await hub.connect("bob", mock_ws)
    mock_ws.failure_rate = 1.0
    for i in range(5):
        await hub.send("bob", f"nc{i}")  # best-effort: each attempt fails and is dropped
    assert hub.circuit_state("bob") is CircuitState.OPEN
    attempts = mock_ws.attempts
    critical = await hub.send("bob", "important", critical=True)
    assert critical.status is SendStatus.QUEUED and critical.reason == "circuit open"
    other = await hub.send("bob", "chatter")
    assert (
        other.status is SendStatus.DROPPED
        and other.reason == "behind undelivered critical messages"
    )
    assert mock_ws.attempts == attempts  # fail fast: no transport call while OPEN
    assert hub.pending("bob") == 1


# 6, 7
async def test_breaker_recovers_open_half_open_closed_and_counts(
    hub: Hub, clock: ManualClock, mock_ws: MockWebSocket
) -> None:
    await hub.connect("bob", mock_ws)
    mock_ws.fail_next(5)
    for i in range(5):
        await hub.send("bob", f"x{i}")
    assert hub.circuit_state("bob") is CircuitState.OPEN
    await hub.send("bob", "a", critical=True)
    await hub.send("bob", "b", critical=True)
    clock.advance(hub.config.recovery_timeout)
    assert hub.circuit_state("bob") is CircuitState.HALF_OPEN
    await wait_for_circuit_state(hub, "bob", CircuitState.CLOSED, clock=clock)
    assert mock_ws.sent == ["a", "b"]
    cb = counters(hub)["circuit_breaker"]
    assert (cb["opens"], cb["half_opens"], cb["closes"]) == (1, 1, 1)
    assert (cb["closed"], cb["open"], cb["half_open"]) == (1, 0, 0)


# 9, 14
async def test_metrics_and_per_client_accuracy(hub: Hub) -> None:
    mocks = await connect_mock_clients(hub, 3)
    for _ in range(7):
        await hub.send("client-0", "x", critical=True)
    for _ in range(2):
        await hub.send("client-1", "y")
    mocks["client-2"].fail_next(1)
    await hub.send("client-2", "z")
    data = counters(hub)
    assert data["messages"]["sent"] == 9 and data["messages"]["failed"] == 1
    assert data["messages"]["dropped"] == 1
    per = {cid: hub.metrics.client_dict(cid) for cid in mocks}
    assert per["client-0"]["messages_sent"] == 7 and per["client-0"]["messages_delivered"] == 7
    assert per["client-1"]["messages_sent"] == 2
    assert per["client-2"]["messages_failed"] == 1 and per["client-2"]["messages_dropped"] == 1
    assert per["client-0"]["state"] == "closed" and per["client-0"]["pending"] == 0
    assert per["client-0"]["last_activity"] == pytest.approx(hub.clock.wall())


# 10
async def test_snapshot_diff_covers_only_the_interval(hub: Hub, clock: ManualClock) -> None:
    await connect_mock_clients(hub, 1)
    for _ in range(3):
        await hub.send("client-0", "a")
    first = hub.metrics.snapshot()
    clock.advance(10)
    for _ in range(4):
        await hub.send("client-0", "b")
    delta = hub.metrics.snapshot().diff(first).to_dict()
    assert delta["messages"]["sent"] == 4
    assert delta["uptime_seconds"] == pytest.approx(10)
    assert delta["latency"]["count"] == 4
    assert delta["interval"] is True


# 11
async def test_ttl_cleanup_of_inactive_clients(clock: ManualClock) -> None:
    # memory only: on a shared backend the pending message of client-1 is in Redis, so
    # the node may forget the idle client (it is rebuilt from Redis on reconnect)
    hub = Hub(HubConfig(client_ttl=100, cleanup_interval=10), clock=clock)
    await hub.start()
    await asyncio.sleep(0)  # let the background loops start waiting on the manual clock
    mocks = await connect_mock_clients(hub, 3)
    await hub.disconnect("client-0")
    await hub.disconnect("client-1")
    await hub.send("client-1", "keep", critical=True)  # pending: must not be evicted
    clock.advance(99)
    assert await hub.cleanup_now() == 0
    clock.advance(1)
    assert await hub.cleanup_now() == 1
    assert set(hub.clients()) == {"client-1", "client-2"}
    assert "client-0" not in hub.metrics.clients
    # The background loop evicts too, on the manual clock.
    await hub.connect("client-1", mocks["client-1"])
    await hub.disconnect("client-1")
    clock.advance(200)
    for _ in range(5):
        await asyncio.sleep(0)
    assert hub.clients() == ["client-2"]
    await hub.shutdown()


# 12
async def test_memory_for_100_clients_is_released(clock: ManualClock) -> None:
    # memory only: measures the node's own structures
    import tracemalloc

    hub = Hub(HubConfig(client_ttl=1), clock=clock)
    await hub.start()
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.take_snapshot()
        mocks = await connect_mock_clients(hub, 100)
        for cid in mocks:
            await hub.send(cid, {"hello": cid}, critical=True, message_id=f"{cid}-1")
            await hub.disconnect(cid)
        held = tracemalloc.take_snapshot()
        clock.advance(2)
        assert await hub.cleanup_now() == 100
        del mocks
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()

    def grown(snapshot: tracemalloc.Snapshot) -> int:
        return sum(s.size_diff for s in snapshot.compare_to(base, "filename") if "tether" in str(s))

    assert grown(held) > 100 * 1000  # the clients really held memory…
    assert grown(after) < grown(held) * 0.1  # …and it went away with them
    assert hub.metrics.snapshot().to_dict()["memory"]["tracked_clients"] == 0
    await hub.shutdown()


# 13
async def test_to_dict_export_has_every_contract_section(hub: Hub) -> None:
    data = counters(hub)
    expected = {
        "connections": {"total", "active", "failed", "reconnections", "timeouts"},
        "messages": {
            "sent",
            "queued",
            "delivered",
            "failed",
            "expired",
            "deduplicated",
            "dropped",
            "rejected",
            "dead_lettered",
        },
        "queue": {"current_size", "max_size", "overflows"},
        "retry": {"attempts", "successes", "failures", "success_rate"},
        "circuit_breaker": {"closed", "open", "half_open", "opens", "half_opens", "closes"},
        "latency": {"p50_ms", "p95_ms", "p99_ms", "average_ms"},
        "memory": {"rss_bytes", "tracked_clients"},
    }
    for section, keys in expected.items():
        assert keys <= set(data[section]), section
    assert data["memory"]["rss_bytes"] > 1_000_000
    assert isinstance(data["uptime_seconds"], float)
    import orjson

    assert orjson.loads(orjson.dumps(data)) == data  # JSON-safe


# 15, 16
async def test_failure_recovery_queue_and_retry(
    hub: Hub, clock: ManualClock, mock_ws: MockWebSocket
) -> None:
    await hub.connect("carol", mock_ws)
    mock_ws.fail_next(2)
    first = await hub.send("carol", "one", critical=True)
    assert first.status is SendStatus.QUEUED and first.reason == "send failed; will retry"
    second = await hub.send("carol", "two", critical=True)
    assert (
        second.status is SendStatus.QUEUED
        and second.reason == "behind earlier undelivered messages"
    )
    await drive_until(hub, clock, lambda: hub.pending("carol") == 0)
    assert mock_ws.sent == ["one", "two"]
    retry = counters(hub)["retry"]
    assert retry["attempts"] == 2 and retry["successes"] == 1 and retry["failures"] == 1


# 17
async def test_dedup_by_id_and_by_content(clock: ManualClock) -> None:
    # memory only: the window is advanced on a ManualClock, which cannot drive Redis' PX
    hub = Hub(HubConfig(dedup_window=60), clock=clock)
    ws = MockWebSocket()
    await hub.connect("dave", ws)
    assert (await hub.send("dave", {"id": "a", "v": 1})).status is SendStatus.SENT
    assert (await hub.send("dave", {"id": "a", "v": 2})).status is SendStatus.DUPLICATE
    assert (await hub.send("dave", "x", message_id="a")).status is SendStatus.DUPLICATE
    assert (
        await hub.send("dave", {"v": 3})
    ).status is SendStatus.SENT  # no id: no dedup in id mode
    clock.advance(60)
    assert (await hub.send("dave", {"id": "a", "v": 4})).status is SendStatus.SENT  # window passed
    assert counters(hub)["messages"]["deduplicated"] == 2
    await hub.shutdown()

    content = Hub(HubConfig(dedup_mode="content"), clock=clock)
    ws2 = MockWebSocket()
    await content.connect("dave", ws2)
    assert (await content.send("dave", {"v": 1})).status is SendStatus.SENT
    assert (await content.send("dave", {"v": 1})).status is SendStatus.DUPLICATE
    assert (await content.send("dave", {"v": 2})).status is SendStatus.SENT
    await content.shutdown()

    off = Hub(HubConfig(dedup_mode="off"), clock=clock)
    ws3 = MockWebSocket()
    await off.connect("dave", ws3)
    assert (await off.send("dave", {"id": "a"})).status is SendStatus.SENT
    assert (await off.send("dave", {"id": "a"})).status is SendStatus.SENT
    await off.shutdown()


# 18
async def test_exponential_backoff_schedule(clock: ManualClock, make_hub: MakeHub) -> None:
    hub = make_hub(
        HubConfig(
            retry_base_delay=1,
            retry_max_delay=8,
            max_retries=6,
            failure_threshold=100,
            retry_interval=0.01,
        ),
        clock=clock,
        rng=random.Random(3),
    )
    ws = MockWebSocket(clock=clock)
    await hub.connect("erin", ws)
    ws.failure_rate = 1.0
    await hub.send("erin", "doomed", critical=True)
    attempt_times: list[float] = []
    last = ws.attempts
    attempt_times.append(clock.now())
    while hub.pending("erin"):
        clock.advance(0.01)
        await hub.retry_now()
        if ws.attempts != last:
            last = ws.attempts
            attempt_times.append(clock.now())
    gaps = [b - a for a, b in itertools.pairwise(attempt_times)]
    assert len(gaps) == 6  # max_retries retries after the first attempt
    assert_backoff_schedule([max(0.0, g - 0.01) for g in gaps], hub._retry)
    assert [dl.attempts for dl in hub.dead_letters("erin")] == [7]
    await hub.shutdown()


# 19
async def test_overflow_of_150_messages_into_a_queue_of_100(make_hub: MakeHub) -> None:
    hub = make_hub(HubConfig(max_queue_size=100))
    results = [await hub.send("frank", {"n": n}, critical=True) for n in range(150)]
    assert all(r.status is SendStatus.QUEUED for r in results)
    assert await stored_pending(hub, "frank") == 100
    data = counters(hub)
    assert data["queue"]["overflows"] == 50 and data["messages"]["dropped"] == 50
    ws = MockWebSocket()
    await hub.connect("frank", ws)
    assert ws.payloads == [{"n": n} for n in range(50, 150)]  # the newest 100, in order

    for policy, status in (("reject", SendStatus.REJECTED), ("drop_newest", SendStatus.DROPPED)):
        strict = make_hub(HubConfig(max_queue_size=100, overflow_policy=policy))
        cid = f"g-{policy}"  # hubs on one Redis prefix share their clients: one id each
        statuses = [(await strict.send(cid, n, critical=True)).status for n in range(150)]
        assert statuses[:100] == [SendStatus.QUEUED] * 100
        assert statuses[100:] == [status] * 50
        assert await stored_pending(strict, cid) == 100
        await strict.shutdown()
    await hub.shutdown()


# 20
async def test_retry_success_rate_with_thirty_percent_failures(
    clock: ManualClock, make_hub: MakeHub
) -> None:
    hub = make_hub(
        HubConfig(
            failure_threshold=1000, max_retries=50, retry_base_delay=0.1, retry_max_delay=0.5
        ),
        clock=clock,
        rng=random.Random(1),
    )
    ws = MockWebSocket(failure_rate=0.3, seed=42)
    await hub.connect("gina", ws)
    for n in range(200):
        await hub.send("gina", {"n": n}, critical=True)
    await drive_until(hub, clock, lambda: hub.pending("gina") == 0, step=0.1)
    assert ws.payloads == [{"n": n} for n in range(200)]  # all of them, in order
    retry = counters(hub)["retry"]
    assert retry["attempts"] == retry["successes"] + retry["failures"]
    # Each retry fails with p=0.3, so about 70 % succeed.
    assert 0.55 < retry["success_rate"] < 0.85
    assert counters(hub)["messages"]["dead_lettered"] == 0
    await hub.shutdown()


def test_hub_built_outside_a_loop_starts_its_loops_with_the_first_connection() -> None:
    """A module-level `hub = Hub()` has no running loop; cleanup must still run."""
    clock = ManualClock()
    hub = Hub(HubConfig(client_ttl=10, cleanup_interval=5), clock=clock)  # no loop here

    async def scenario() -> list[str]:
        await hub.connect("late", MockWebSocket())  # starts retry and cleanup loops
        await hub.disconnect("late")
        await asyncio.sleep(0)  # the loops now wait on the manual clock
        clock.advance(20)
        for _ in range(3):
            await asyncio.sleep(0)
        remaining = hub.clients()
        await hub.shutdown()
        return remaining

    assert asyncio.run(scenario()) == []
