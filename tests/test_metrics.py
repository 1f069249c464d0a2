"""The latency histogram under a scrape on another thread (a Prometheus exporter's)."""

from __future__ import annotations

import itertools


def test_folds_on_another_thread_lose_and_double_no_latency_sample() -> None:
    """A Prometheus exporter thread scrapes (folds) while the loop records and folds."""
    import sys
    import threading

    from tether.metrics import LatencyHistogram

    histogram = LatencyHistogram()
    done = threading.Event()

    def scrape() -> None:
        while not done.is_set():
            histogram.fold()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    scraper = threading.Thread(target=scrape)
    scraper.start()
    try:
        for n in range(200_000):
            histogram.record(0.001 * (n % 7 + 1))
            if n % 1000 == 0:
                histogram.record_many(0.002, 3)
    finally:
        done.set()
        scraper.join()
        sys.setswitchinterval(interval)
    histogram.fold()
    assert histogram.count == 200_000 + 200 * 3
    assert sum(histogram.buckets) == histogram.count


def test_fold_bins_each_sample_where_a_search_of_the_bounds_puts_it() -> None:
    """Batched binning (sorted, one search per bucket) equals binning one by one: samples
    on bucket bounds, below the first, past the last, in runs, gaps and bursts."""
    import bisect
    import random

    from tether.metrics import _UPPER_BOUNDS, LATENCY_BUCKETS, PENDING_SAMPLES, LatencyHistogram

    rng = random.Random(7)
    samples = [0.0, 1e-7, _UPPER_BOUNDS[0], _UPPER_BOUNDS[-1], 1e6]
    samples += [rng.choice(_UPPER_BOUNDS) for _ in range(300)]
    samples += [rng.lognormvariate(-7, 3) for _ in range(3000)]
    samples += [0.004 + rng.random() * 1e-6 for _ in range(1000)]  # one dense bucket
    histogram = LatencyHistogram()
    expected = [0] * LATENCY_BUCKETS
    for seconds in samples:
        histogram.record(seconds)
        expected[bisect.bisect_right(_UPPER_BOUNDS, seconds)] += 1
    assert len(histogram.pending) < PENDING_SAMPLES  # bounded while recording
    histogram.fold()
    assert histogram.buckets == expected
    assert histogram.count == len(samples)
    assert histogram.pending == []


class _Socket:
    """A transport that takes every frame at once (as the websockets adapter's try_send)."""

    def __init__(self) -> None:
        self.frames: list[str | bytes] = []

    async def send(self, data: str | bytes) -> None:
        self.frames.append(data)

    def try_send(self, data: str | bytes) -> bool:
        self.frames.append(data)
        return True

    async def close(self, code: int = 1000, reason: str = "") -> None:
        pass


def _binned(ages: list[float]) -> list[int]:
    """Each age binned alone, by a search of the bucket bounds."""
    import bisect

    from tether.metrics import _UPPER_BOUNDS, LATENCY_BUCKETS

    expected = [0] * LATENCY_BUCKETS
    for age in ages:
        expected[bisect.bisect_right(_UPPER_BOUNDS, age)] += 1
    return expected


async def test_an_ack_records_exactly_the_ages_of_the_messages_it_delivers() -> None:
    """tether.v1: each acked message's age at the ack (clock read once for the ack), no
    more, no fewer; a repeated ack records nothing."""
    from tether import Hub, HubConfig, ManualClock, protocol

    clock = ManualClock()
    hub = Hub(HubConfig(backend="memory"), clock=clock)
    async with hub:
        await hub.connect("a", _Socket(), hello=protocol.Hello("a", 0))
        created = []
        seqs = []
        for step in (0.0, 0.003, 0.04, 0.5):
            clock.advance(step)
            created.append(clock.now())
            seqs.append((await hub.send("a", {"n": step}, critical=True)).seq)
        clock.advance(0.25)
        await hub.ack("a", seqs[2])  # the first three
        first_ack = clock.now()
        clock.advance(1.0)
        await hub.ack("a", seqs[3])
        await hub.ack("a", seqs[3])  # a repeat delivers nothing
        ages = [first_ack - c for c in created[:3]] + [clock.now() - created[3]]
        histogram = hub.metrics.latency
        hub.metrics.snapshot()  # folds
        assert histogram.count == 4
        assert histogram.buckets == _binned(ages)
        assert histogram.total == sum(sorted(ages))


async def test_a_plain_send_is_timed_once_written_whether_at_once_or_after_a_reconnect() -> None:
    """Plain mode: a write at once is timed by the reading the send took with the lock
    (no time passes on a manual clock); queued messages are timed when the reconnect
    writes them."""
    from tether import Hub, HubConfig, ManualClock

    clock = ManualClock()
    hub = Hub(HubConfig(backend="memory"), clock=clock)
    async with hub:
        await hub.connect("p", _Socket())
        assert (await hub.send("p", "now", critical=True)).status.value == "sent"
        await hub.disconnect("p")
        queued_at = []
        for _ in range(2):
            queued_at.append(clock.now())
            assert (await hub.send("p", "later", critical=True)).status.value == "queued"
            clock.advance(0.125)
        await hub.connect("p", _Socket())
        written_at = clock.now()
        snap = hub.metrics.snapshot()
        ages = [0.0] + [written_at - t for t in queued_at]
        assert snap.latency_count == 3 == hub.metrics.total("messages_delivered")
        assert list(snap.latency_buckets) == _binned(ages)
        assert snap.latency_total == sum(sorted(ages))


async def test_deliveries_at_once_stay_counted_and_timed_after_their_client_is_forgotten() -> None:
    """A write under the first bucket's bound is counted on the client, not buffered: it
    is in `messages_delivered`, the per-client counters, the snapshot's first bucket and
    the Prometheus histogram, before and after the client is forgotten."""
    from prometheus_client import generate_latest

    from tether import Hub, HubConfig, ManualClock

    clock = ManualClock()
    hub = Hub(HubConfig(backend="memory"), clock=clock)
    async with hub:
        await hub.connect("p", _Socket())
        for _ in range(5):
            assert (await hub.send("p", "now", critical=True)).status.value == "sent"
        assert (await hub.send("p", "fast")).status.value == "sent"  # best-effort
        await hub.disconnect("p")
        assert (await hub.send("p", "later", critical=True)).status.value == "queued"
        clock.advance(0.5)
        await hub.connect("p", _Socket())
        assert hub.metrics.client_dict("p")["messages_delivered"] == 7
        for forget in (False, True):
            if forget:
                assert hub.metrics.forget("p")
            snap = hub.metrics.snapshot()
            assert (
                hub.metrics.total("messages_delivered") == 7 == snap.counter("messages_delivered")
            )
            assert snap.latency_count == 7
            assert list(snap.latency_buckets) == _binned([0.0] * 6 + [0.5])
            assert snap.latency_total == 0.5
            text = generate_latest(hub.metrics.prometheus_registry).decode()
            assert "tether_latency_seconds_count 7.0" in text


def test_a_snapshot_on_another_thread_never_sees_a_count_go_back_across_forget() -> None:
    """An exporter thread snapshots while the loop forgets clients whose deliveries were
    counted at once: the delivered total and the latency count never decrease."""
    import sys
    import threading

    from tether import ManualClock
    from tether.metrics import HubMetrics

    metrics = HubMetrics(ManualClock())
    done = threading.Event()
    seen: list[tuple[int, int, int]] = []

    def scrape() -> None:
        while not done.is_set():
            snap = metrics.snapshot()
            seen.append(
                (snap.counter("messages_delivered"), snap.latency_count, snap.latency_buckets[0])
            )

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    scraper = threading.Thread(target=scrape)
    scraper.start()
    try:
        n = 0
        while n < 3000 or len(seen) < 50:  # until the scraper has taken enough snapshots
            stats = metrics.client(f"c{n % 50}")
            stats.delivered_at_once += 3
            if n % 7 == 0:
                metrics.forget(f"c{(n * 13) % 50}")
            if n % 997 == 0:
                metrics.forget_all()
            n += 1
    finally:
        done.set()
        scraper.join()
        sys.setswitchinterval(interval)
    final = metrics.snapshot()
    assert final.counter("messages_delivered") == 3 * n == final.latency_count
    for earlier, later in itertools.pairwise(seen):
        assert all(b >= a for a, b in zip(earlier, later, strict=True)), (earlier, later)


def test_a_snapshot_taken_in_the_middle_of_forget_waits_for_it() -> None:
    """A snapshot on another thread that starts while `forget` moves a client's counts
    into the totals sees them once: before the move or after it, never half-way."""
    import threading

    from tether import ManualClock
    from tether.metrics import HubMetrics

    metrics = HubMetrics(ManualClock())
    metrics.client("gone").delivered_at_once = 100
    retire = metrics._retire
    seen: list[tuple[int, int]] = []

    def snapshot() -> None:
        snap = metrics.snapshot()
        seen.append((snap.counter("messages_delivered"), snap.latency_count))

    scraper = threading.Thread(target=snapshot)

    def retire_with_a_scrape(stats: object) -> None:
        scraper.start()
        scraper.join(0.2)  # with the move locked it cannot finish until `forget` has
        retire(stats)  # type: ignore[arg-type]

    metrics._retire = retire_with_a_scrape  # type: ignore[method-assign]
    assert metrics.forget("gone")
    scraper.join()
    assert seen == [(100, 100)]
