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
        hub.metrics.snapshot()
        ages = [0.0] + [written_at - t for t in queued_at]
        assert hub.metrics.latency.count == 3 == hub.metrics.total("messages_delivered")
        assert hub.metrics.latency.buckets == _binned(ages)
        assert hub.metrics.latency.total == sum(sorted(ages))
