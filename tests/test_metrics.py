"""The latency histogram under a scrape on another thread (a Prometheus exporter's)."""

from __future__ import annotations


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


def test_a_large_ack_is_timed_by_runs_never_under_its_ages_and_counted_exactly() -> None:
    """An ack of GROUPED_FROM or more messages: each run of GROUP consecutive messages is
    timed by its oldest; the count is exact and no message's latency is read as lower
    than it was, nor higher than its run's oldest."""
    import bisect
    import random

    from tether.messages import Envelope
    from tether.metrics import _UPPER_BOUNDS, GROUP, GROUPED_FROM, LatencyHistogram

    rng = random.Random(3)
    histogram = LatencyHistogram()
    now = 100.0
    recorded_total = 0
    for size in (1, GROUPED_FROM - 1, GROUPED_FROM, GROUPED_FROM + 3, 64, 200):
        before = list(histogram.buckets)
        created = sorted(now - rng.uniform(0.0005, 0.2) for _ in range(size))  # oldest first
        envelopes = [
            Envelope("m", "x", None, True, c, c + 60, None, None, 0, 0.0, None) for c in created
        ]
        histogram.record_ages(now, envelopes)
        histogram.fold()
        got = [a - b for a, b in zip(histogram.buckets, before, strict=True)]
        assert sum(got) == size
        recorded_total += size
        ages = [now - c for c in created]
        low = [bisect.bisect_right(_UPPER_BOUNDS, a) for a in ages]
        if size < GROUPED_FROM:
            assert got == [low.count(i) for i in range(len(got))]
            continue
        # Each message is binned where its run's oldest is: never below its own bucket.
        single = size % GROUP
        high = low[:single] + [
            low[single + (i - single) // GROUP * GROUP] for i in range(single, size)
        ]
        assert all(h >= own for h, own in zip(high, low, strict=True))
        assert got == [high.count(i) for i in range(len(got))]
    assert histogram.count == recorded_total
