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
