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
