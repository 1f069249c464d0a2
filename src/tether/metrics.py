"""Delivery metrics in fixed memory: counters, per-client stats, a latency histogram, snapshots,
and a Prometheus collector for the aggregate."""

from __future__ import annotations

import bisect
import math
import os
import resource
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from .clock import Clock

if TYPE_CHECKING:
    from .messages import Envelope

# Latency buckets grow by 5 % from 10 µs to ~10 min: about 370 integers whatever the
# number of events, and any percentile is within 5 % of the true value.
_LAT_MIN = 1e-5
_LAT_GROWTH = 1.05
_LAT_LOG = math.log(_LAT_GROWTH)
LATENCY_BUCKETS = int(math.log(600.0 / _LAT_MIN) / _LAT_LOG) + 2
_PROM_BOUNDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _bucket_upper(index: int) -> float:
    return _LAT_MIN * _LAT_GROWTH ** (index + 1)


# Upper bound of every bucket but the last (which is open-ended): bucket i holds
# bounds[i-1] <= seconds < bounds[i], so its index is how many bounds are <= seconds.
_UPPER_BOUNDS = tuple(_bucket_upper(i) for i in range(LATENCY_BUCKETS - 1))
_bucket_of = bisect.bisect_right


class LatencyHistogram:
    """Log-scale histogram of seconds; memory is fixed.

    Recording appends the sample to a short buffer (a list append on the delivery path);
    the buffer is binned in batches — when it fills, and before anything reads the
    histogram (`fold`, which snapshots call) — so readers always see every sample.

    Deliveries under the first bucket's bound are not recorded here at all:
    `ClientStats.delivered_at_once` counts them, and snapshots add them to the first bucket.
    """

    __slots__ = ("_folding", "buckets", "count", "pending", "total")

    def __init__(self) -> None:
        self.buckets = [0] * LATENCY_BUCKETS
        self.count = 0
        self.total = 0.0
        self.pending: list[float] = []
        # Folds may run on another thread (a Prometheus exporter's scrape) while the event
        # loop appends and folds: one fold at a time, and only what it copied is removed.
        self._folding = threading.Lock()

    def record(self, seconds: float) -> None:
        pending = self.pending
        pending.append(seconds)
        if len(pending) >= PENDING_SAMPLES:
            self.fold()

    def record_many(self, seconds: float, count: int) -> None:
        """`count` samples of the same latency (the writes of one fan-out): binned now."""
        with self._folding:
            self.buckets[_bucket_of(_UPPER_BOUNDS, seconds)] += count
            self.count += count
            self.total += seconds * count

    def record_ages(self, now: float, envelopes: Iterable[Envelope]) -> None:
        """Record `now - created_at` of each envelope (what one ack delivered)."""
        pending = self.pending
        pending += [now - envelope.created_at for envelope in envelopes]
        if len(pending) >= PENDING_SAMPLES:
            self.fold()

    def fold(self) -> None:
        """Bin the buffered samples. Sorted first: then each bucket they touch costs one
        binary search, however many samples fall in it (deliveries come in bursts of
        similar latency)."""
        if not self.pending:
            return
        with self._folding:
            self._fold_locked()

    def _fold_locked(self) -> None:
        buffered = self.pending  # the same list: `Accounting` appends to it directly
        size = len(buffered)
        if not size:  # another thread folded them while this one waited for the lock
            return
        batch = buffered[:size]
        del buffered[:size]  # samples appended meanwhile (another thread) stay
        batch.sort()  # in place: the copy above is the only one
        buckets, bounds = self.buckets, _UPPER_BOUNDS
        last = len(bounds)
        # Walk the bucket bounds upwards, one binary search of the sorted batch per
        # bucket that holds samples; a run of empty buckets is skipped with one search
        # of the bounds.
        i = 0
        index = _bucket_of(bounds, batch[0])
        while index < last:
            j = _first_at_or_above(batch, bounds[index], i)
            buckets[index] += j - i
            if j == size:
                break
            i = j
            index += 1
            if index < last and batch[i] >= bounds[index]:
                index = _bucket_of(bounds, batch[i], index)
        else:  # the open-ended last bucket takes the rest
            buckets[last] += size - i
        self.count += size
        self.total += sum(batch)


# Samples buffered before binning: 512 floats (~16 KiB) at most, whatever the traffic.
PENDING_SAMPLES = 512
# A latency under the first bucket's upper bound (10.5 µs) lands in bucket 0 whatever it
# is: such a delivery (a message written by the call that sent it) is only counted.
INSTANT = _UPPER_BOUNDS[0]
_first_at_or_above = bisect.bisect_left


def percentile(buckets: Iterable[int], count: int, q: float) -> float:
    """The q-quantile (0..1) in seconds from histogram buckets; 0.0 when empty."""
    if count <= 0:
        return 0.0
    rank = max(1, math.ceil(q * count))
    seen = 0
    for index, n in enumerate(buckets):
        seen += n
        if seen >= rank:
            return _bucket_upper(index)
    return _bucket_upper(LATENCY_BUCKETS - 1)


def _counter_fields() -> tuple[str, ...]:
    return tuple(f.name for f in fields(Counters))


@dataclass(slots=True)
class Counters:
    """Event counts, hub-wide or for one client. Plain ints: incrementing is a field add."""

    connections_total: int = 0
    connections_failed: int = 0
    connections_reconnections: int = 0
    connections_timeouts: int = 0
    messages_sent: int = 0
    messages_queued: int = 0
    messages_delivered: int = 0
    messages_failed: int = 0
    messages_expired: int = 0
    messages_deduplicated: int = 0
    messages_dropped: int = 0
    messages_rejected: int = 0
    messages_dead_lettered: int = 0
    messages_received: int = 0
    queue_overflows: int = 0
    retry_attempts: int = 0
    retry_successes: int = 0
    retry_failures: int = 0
    circuit_breaker_opens: int = 0
    circuit_breaker_half_opens: int = 0
    circuit_breaker_closes: int = 0
    streams_resets: int = 0  # resumes answered with a reset: the stream was not vouched for
    streams_lost: int = 0  # seqs reported lost to tether.v1 clients in welcomes
    streams_unknown: int = 0  # critical sends whose store write got no reply (UNKNOWN)

    def as_tuple(self) -> tuple[int, ...]:
        return tuple(getattr(self, name) for name in COUNTER_FIELDS)


COUNTER_FIELDS = _counter_fields()
# Counted per client only (one integer add per delivery); the hub-wide value is the sum
# over tracked clients plus what forgotten clients left in `HubMetrics.counters`.
PER_CLIENT_ONLY = frozenset({"messages_sent", "messages_delivered", "messages_queued"})
_SENT = COUNTER_FIELDS.index("messages_sent")
_DELIVERED = COUNTER_FIELDS.index("messages_delivered")
_QUEUED = COUNTER_FIELDS.index("messages_queued")


@dataclass(slots=True)
class ClientStats:
    """One client's counters (its live state is read from the hub when asked)."""

    counters: Counters = field(default_factory=Counters)
    # Deliveries timed under `INSTANT` (metrics on): part of `messages_delivered` (added
    # when read) and of the latency histogram's first bucket (added at snapshot time), so
    # that such a delivery costs one integer add, as with metrics off.
    delivered_at_once: int = 0


@dataclass(frozen=True, slots=True)
class Gauges:
    """Values that are read, not counted, at snapshot time."""

    connections_active: int = 0
    queue_current_size: int = 0
    queue_max_size: int = 0
    circuit_closed: int = 0
    circuit_open: int = 0
    circuit_half_open: int = 0
    tracked_clients: int = 0
    dead_letters: int = 0
    oldest_pending_age: float = 0.0
    backend_errors: int = 0


GaugeReader = Callable[[], Gauges]


def rss_bytes() -> int:
    """Resident set size of this process, in bytes."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    """Metrics at one instant (or, from `diff`, over an interval).

    `diff(older)` returns a snapshot whose counters are the increase since `older`, whose
    latency percentiles cover only the events of that interval, and whose
    `uptime_seconds` is the interval's length.
    """

    taken_at: float  # wall-clock seconds
    uptime_seconds: float
    counters: tuple[int, ...]
    gauges: Gauges
    latency_buckets: tuple[int, ...]
    latency_count: int
    latency_total: float
    rss_bytes: int
    clients: dict[str, dict[str, Any]] | None = None
    is_interval: bool = False
    # Sections contributed by other parts (`HubMetrics.add_section`): (name, values, the
    # names among them that are counters).
    sections: tuple[tuple[str, dict[str, Any], frozenset[str]], ...] = ()

    def counter(self, name: str) -> int:
        """A counter by its field name, e.g. `"messages_sent"`."""
        return self.counters[COUNTER_FIELDS.index(name)]

    def __getitem__(self, section: str) -> Any:
        return self.to_dict()[section]

    def diff(self, older: MetricsSnapshot) -> MetricsSnapshot:
        return MetricsSnapshot(
            taken_at=self.taken_at,
            uptime_seconds=max(0.0, self.uptime_seconds - older.uptime_seconds),
            counters=tuple(a - b for a, b in zip(self.counters, older.counters, strict=True)),
            gauges=self.gauges,
            latency_buckets=tuple(
                a - b for a, b in zip(self.latency_buckets, older.latency_buckets, strict=True)
            ),
            latency_count=self.latency_count - older.latency_count,
            latency_total=self.latency_total - older.latency_total,
            rss_bytes=self.rss_bytes,
            is_interval=True,
            sections=tuple(_section_diff(section, older.sections) for section in self.sections),
        )

    def to_dict(self) -> dict[str, Any]:
        c = dict(zip(COUNTER_FIELDS, self.counters, strict=True))
        g = self.gauges
        attempts = c["retry_attempts"]
        count = self.latency_count
        data: dict[str, Any] = {
            "connections": {
                "total": c["connections_total"],
                "active": g.connections_active,
                "failed": c["connections_failed"],
                "reconnections": c["connections_reconnections"],
                "timeouts": c["connections_timeouts"],
            },
            "messages": {
                name: c["messages_" + name]
                for name in (
                    "sent",
                    "queued",
                    "delivered",
                    "failed",
                    "expired",
                    "deduplicated",
                    "dropped",
                    "rejected",
                    "dead_lettered",
                    "received",
                )
            },
            "queue": {
                "current_size": g.queue_current_size,
                "max_size": g.queue_max_size,
                "overflows": c["queue_overflows"],
                "oldest_pending_age_seconds": round(g.oldest_pending_age, 3),
                "dead_letters": g.dead_letters,
            },
            "retry": {
                "attempts": attempts,
                "successes": c["retry_successes"],
                "failures": c["retry_failures"],
                "success_rate": round(c["retry_successes"] / attempts, 4) if attempts else 1.0,
            },
            "circuit_breaker": {
                "closed": g.circuit_closed,
                "open": g.circuit_open,
                "half_open": g.circuit_half_open,
                "opens": c["circuit_breaker_opens"],
                "half_opens": c["circuit_breaker_half_opens"],
                "closes": c["circuit_breaker_closes"],
            },
            "latency": {
                "p50_ms": round(percentile(self.latency_buckets, count, 0.50) * 1000, 3),
                "p95_ms": round(percentile(self.latency_buckets, count, 0.95) * 1000, 3),
                "p99_ms": round(percentile(self.latency_buckets, count, 0.99) * 1000, 3),
                "average_ms": round(self.latency_total / count * 1000, 3) if count else 0.0,
                "count": count,
            },
            "streams": {
                "resets": c["streams_resets"],
                "lost": c["streams_lost"],
                "unknown": c["streams_unknown"],
            },
            **{name: dict(values) for name, values, _ in self.sections},
            "memory": {"rss_bytes": self.rss_bytes, "tracked_clients": g.tracked_clients},
            "backend": {"errors": g.backend_errors},
            "uptime_seconds": round(self.uptime_seconds, 3),
            "taken_at": self.taken_at,
        }
        if self.is_interval:
            data["interval"] = True
        if self.clients is not None:
            data["clients"] = self.clients
        return data


def _section_diff(
    section: tuple[str, dict[str, Any], frozenset[str]],
    older: tuple[tuple[str, dict[str, Any], frozenset[str]], ...],
) -> tuple[str, dict[str, Any], frozenset[str]]:
    """A section's counters minus those of the same section in `older`; gauges as is."""
    name, values, counters = section
    before = next((v for n, v, _ in older if n == name), {})
    return (
        name,
        {k: v - before.get(k, 0) if k in counters else v for k, v in values.items()},
        counters,
    )


SectionReader = Callable[[], dict[str, Any]]


def client_counters_dict(stats: ClientStats) -> dict[str, int]:
    data = dict(zip(COUNTER_FIELDS, stats.counters.as_tuple(), strict=True))
    data["messages_delivered"] += stats.delivered_at_once
    return data


class HubMetrics:
    """The metrics of one hub.

    Counting is always on (hub results depend on it and it costs a field add); with
    `enabled=False` the latency histogram and most per-client counters are not recorded.
    The per-delivery counters (`PER_CLIENT_ONLY`: sent, delivered, queued) are counted
    once, on the client's stats, in both modes; hub-wide values are summed when read
    (`total`, `totals`, snapshots), so a delivery costs one integer add either way.
    """

    def __init__(self, clock: Clock, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self.clock = clock
        self.counters = Counters()
        self.latency = LatencyHistogram()
        self.clients: dict[str, ClientStats] = {}
        # `delivered_at_once` of forgotten clients (still in the histogram's first bucket).
        self._retired_at_once = 0
        # Forgetting a client moves its counts into the totals in two steps; a snapshot on
        # another thread (a Prometheus exporter's) must not run between them (it would
        # miss them, or count them twice, and a histogram count must never go back). Both
        # sides are rare: nothing per delivery takes this lock.
        self._moving = threading.Lock()
        self._started = clock.now()
        self._gauges: GaugeReader = Gauges
        self._client_extras: Callable[[str], dict[str, Any]] = lambda _cid: {}
        self._sections: dict[str, tuple[SectionReader, frozenset[str]]] = {}
        self.prometheus_registry = CollectorRegistry(auto_describe=True)
        self.prometheus_registry.register(PrometheusCollector(self))

    def bind(self, gauges: GaugeReader, client_extras: Callable[[str], dict[str, Any]]) -> None:
        """Let the hub supply live gauges and per-client state at snapshot time."""
        self._gauges = gauges
        self._client_extras = client_extras

    def add_section(self, name: str, read: SectionReader, counters: Iterable[str]) -> None:
        """Add a `to_dict()` section (and `tether_<name>_<field>` Prometheus series) whose
        values `read()` returns at snapshot time; `counters` names the monotonic ones
        (subtracted by `diff`), the rest are gauges."""
        self._sections[name] = (read, frozenset(counters))

    def client(self, client_id: str) -> ClientStats:
        stats = self.clients.get(client_id)
        if stats is None:
            stats = self.clients[client_id] = ClientStats()
        return stats

    def forget(self, client_id: str) -> bool:
        with self._moving:
            stats = self.clients.pop(client_id, None)
            if stats is None:
                return False
            self._retire(stats)
            return True

    def forget_all(self) -> int:
        """Forget every client's stats (their counts stay in the totals)."""
        with self._moving:
            for stats in self.clients.values():
                self._retire(stats)
            count = len(self.clients)
            self.clients.clear()
            return count

    def _retire(self, stats: ClientStats) -> None:
        """A forgotten client's share of the per-client-only counters joins `counters`."""
        mine, totals = stats.counters, self.counters
        totals.messages_sent += mine.messages_sent
        totals.messages_delivered += mine.messages_delivered + stats.delivered_at_once
        self._retired_at_once += stats.delivered_at_once
        totals.messages_queued += mine.messages_queued

    def total(self, name: str) -> int:
        """A hub-wide counter by field name, exact now (per-client-only ones summed)."""
        if name not in PER_CLIENT_ONLY:
            value: int = getattr(self.counters, name)
            return value
        return self._summed()[0][COUNTER_FIELDS.index(name)]

    def totals(self) -> tuple[int, ...]:
        """Every hub-wide counter, in `COUNTER_FIELDS` order, exact now."""
        return self._summed()[0]

    def _summed(self) -> tuple[tuple[int, ...], int]:
        """(`totals`, deliveries timed under `INSTANT` hub-wide), read together."""
        sent = delivered = queued = at_once = 0
        with self._moving:  # not between the two steps of a `forget`
            for stats in list(self.clients.values()):  # a scrape may run on another thread
                mine = stats.counters
                sent += mine.messages_sent
                delivered += mine.messages_delivered
                queued += mine.messages_queued
                at_once += stats.delivered_at_once
            # A forgotten client's at-once deliveries are in `counters` already.
            values = list(self.counters.as_tuple())
            retired_at_once = self._retired_at_once
        values[_SENT] += sent
        values[_DELIVERED] += delivered + at_once
        values[_QUEUED] += queued
        return tuple(values), at_once + retired_at_once

    def record_latency(self, seconds: float) -> None:
        if self.enabled:
            self.latency.record(seconds)

    @property
    def uptime(self) -> float:
        return self.clock.now() - self._started

    def snapshot(self, *, include_clients: bool = False) -> MetricsSnapshot:
        latency = self.latency
        latency.fold()  # readers see every sample recorded so far
        counters, at_once = self._summed()
        buckets = list(latency.buckets)
        buckets[0] += at_once  # a latency of 0 in the total: under 10.5 µs each
        clients = None
        if include_clients:
            clients = {cid: self.client_dict(cid) for cid in list(self.clients)}
        return MetricsSnapshot(
            taken_at=self.clock.wall(),
            uptime_seconds=self.uptime,
            counters=counters,
            gauges=self._gauges(),
            latency_buckets=tuple(buckets),
            latency_count=latency.count + at_once,
            latency_total=latency.total,
            rss_bytes=rss_bytes(),
            clients=clients,
            sections=tuple(
                (name, read(), counters) for name, (read, counters) in self._sections.items()
            ),
        )

    def to_dict(self) -> dict[str, Any]:
        return self.snapshot().to_dict()

    def client_dict(self, client_id: str) -> dict[str, Any]:
        """Per-client counters plus `state`, `pending` and `last_activity`."""
        stats = self.clients.get(client_id)
        data: dict[str, Any] = client_counters_dict(stats) if stats else {}
        data.update(self._client_extras(client_id))
        return data


class PrometheusCollector(Collector):
    """Exposes the aggregate as `tether_<section>_<name>`; never a per-client label."""

    def __init__(self, metrics: HubMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        snap = self._metrics.snapshot()
        data = snap.to_dict()
        for name in COUNTER_FIELDS:
            yield CounterMetricFamily(
                f"tether_{name}", f"Tether {name.replace('_', ' ')}", value=snap.counter(name)
            )
        gauges: dict[str, tuple[float, str]] = {
            "tether_connections_active": (data["connections"]["active"], "Open connections"),
            "tether_queue_current_size": (data["queue"]["current_size"], "Messages in outboxes"),
            "tether_queue_max_size": (data["queue"]["max_size"], "Outbox bound per client"),
            "tether_queue_oldest_pending_age_seconds": (
                data["queue"]["oldest_pending_age_seconds"],
                "Age of the oldest pending message",
            ),
            "tether_queue_dead_letters": (data["queue"]["dead_letters"], "Dead letters held"),
            "tether_retry_success_rate": (data["retry"]["success_rate"], "Retry success ratio"),
            "tether_circuit_breaker_closed": (data["circuit_breaker"]["closed"], "Clients CLOSED"),
            "tether_circuit_breaker_open": (data["circuit_breaker"]["open"], "Clients OPEN"),
            "tether_circuit_breaker_half_open": (
                data["circuit_breaker"]["half_open"],
                "Clients HALF_OPEN",
            ),
            "tether_latency_p50_ms": (data["latency"]["p50_ms"], "Delivery latency p50"),
            "tether_latency_p95_ms": (data["latency"]["p95_ms"], "Delivery latency p95"),
            "tether_latency_p99_ms": (data["latency"]["p99_ms"], "Delivery latency p99"),
            "tether_latency_average_ms": (data["latency"]["average_ms"], "Mean delivery latency"),
            "tether_memory_rss_bytes": (data["memory"]["rss_bytes"], "Resident memory"),
            "tether_memory_tracked_clients": (
                data["memory"]["tracked_clients"],
                "Client ids with state",
            ),
            "tether_backend_errors": (data["backend"]["errors"], "Backend errors"),
            "tether_uptime_seconds": (data["uptime_seconds"], "Seconds since the hub started"),
        }
        for name, (value, doc) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
        for section, values, counters in snap.sections:
            for field_name, value in values.items():
                if not isinstance(value, int | float) or isinstance(value, bool):
                    continue
                metric = f"tether_{section}_{field_name}"
                doc = f"Tether {section} {field_name.replace('_', ' ')}"
                if field_name in counters:
                    yield CounterMetricFamily(metric, doc, value=value)
                else:
                    yield GaugeMetricFamily(metric, doc, value=value)
        yield HistogramMetricFamily(
            "tether_latency_seconds",
            "Delivery latency: accepted to delivered (written, or acked in tether.v1)",
            buckets=self._cumulative(snap),
            sum_value=snap.latency_total,
        )

    @staticmethod
    def _cumulative(snap: MetricsSnapshot) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        seen = 0
        index = 0
        buckets = snap.latency_buckets
        for bound in _PROM_BOUNDS:
            while index < len(buckets) and _bucket_upper(index) <= bound:
                seen += buckets[index]
                index += 1
            out.append((str(bound), float(seen)))
        out.append(("+Inf", float(snap.latency_count)))
        return out
