"""SampleHistory: the hub's recent metrics in fixed-size rings at two cadences, for the dashboard.

A background task owned by the monitoring app (not by the hub) takes one sample per
second whether or not a dashboard is open, so a dashboard opened now shows the last
15 minutes at 1 s and the last 24 hours at 60 s. Each ring is one preallocated array of
floats: memory is fixed by the ring sizes (about 20 KB per 1,000 samples), whatever the
traffic or uptime.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..hub import Hub
from ..metrics import MetricsSnapshot

log = logging.getLogger("tether.monitoring")

# One sample: what the dashboard's charts and header show. Rates and latency cover the
# interval since the previous sample of the same ring; the rest is the value at `ts`.
FIELDS: tuple[str, ...] = (
    "ts",  # wall-clock seconds at the end of the interval
    "interval_seconds",
    "p50_ms",  # latency percentiles of the deliveries in the interval; null when none
    "p95_ms",
    "p99_ms",
    "deliveries",  # how many deliveries the percentiles are over
    "delivered_per_s",
    "queued_per_s",
    "failed_per_s",
    "dropped_per_s",
    "rss_bytes",
    "tracked_clients",
    "connected",
    "breakers_open",
    "breakers_half_open",
    "pending",
    "oldest_pending_seconds",
)
_WIDTH = len(FIELDS)
_TS = 0


@dataclass(frozen=True, slots=True)
class Cadence:
    """One ring: a sample every `step` seconds, the newest `keep` of them."""

    name: str
    step: float
    keep: int

    @property
    def span_seconds(self) -> float:
        return self.step * self.keep


FINE = Cadence("fine", 1.0, 900)  # 15 minutes at 1 s
COARSE = Cadence("coarse", 60.0, 1440)  # 24 hours at 60 s


class Ring:
    """The newest `keep` samples of one cadence, in one preallocated array of floats."""

    __slots__ = ("_count", "_data", "_head", "cadence")

    def __init__(self, cadence: Cadence) -> None:
        if cadence.keep < 1 or not cadence.step > 0:
            raise ValueError("a ring needs keep >= 1 and step > 0")
        self.cadence = cadence
        self._data = array("d", bytes(8 * _WIDTH * cadence.keep))
        self._head = 0  # where the next sample goes
        self._count = 0

    def __len__(self) -> int:
        return self._count

    @property
    def nbytes(self) -> int:
        return self._data.itemsize * len(self._data)

    def append(self, values: tuple[float, ...]) -> None:
        start = self._head * _WIDTH
        self._data[start : start + _WIDTH] = array("d", values)
        self._head = (self._head + 1) % self.cadence.keep
        self._count = min(self._count + 1, self.cadence.keep)

    def _rows(self) -> Iterator[int]:
        first = (self._head - self._count) % self.cadence.keep
        for i in range(self._count):
            yield ((first + i) % self.cadence.keep) * _WIDTH

    def last_ts(self) -> float | None:
        if not self._count:
            return None
        return self._data[((self._head - 1) % self.cadence.keep) * _WIDTH + _TS]

    def rows(self, since: float | None = None) -> list[list[float | None]]:
        """Samples oldest first (only those after `since`), NaN as None for JSON."""
        out: list[list[float | None]] = []
        data = self._data
        for start in self._rows():
            if since is not None and data[start + _TS] <= since:
                continue
            out.append(
                [None if math.isnan(v) else round(v, 3) for v in data[start : start + _WIDTH]]
            )
        return out


def _sample(now: MetricsSnapshot, base: MetricsSnapshot) -> tuple[float, ...]:
    interval = now.diff(base)
    seconds = interval.uptime_seconds
    d = interval.to_dict()
    rate = d["messages"]
    count = d["latency"]["count"]
    lat = d["latency"]
    nan = math.nan
    g = now.gauges
    return (
        now.taken_at,
        seconds,
        lat["p50_ms"] if count else nan,
        lat["p95_ms"] if count else nan,
        lat["p99_ms"] if count else nan,
        float(count),
        rate["delivered"] / seconds,
        rate["queued"] / seconds,
        rate["failed"] / seconds,
        rate["dropped"] / seconds,
        float(now.rss_bytes),
        float(g.tracked_clients),
        float(g.connections_active),
        float(g.circuit_open),
        float(g.circuit_half_open),
        float(g.queue_current_size),
        g.oldest_pending_age,
    )


class SampleHistory:
    """Samples `hub.metrics` into a fine and a coarse ring; `run()` is the sampling loop.

    Time comes from the hub's clock, so a test drives the sampler with a `ManualClock`.
    A counter reset (a new hub behind the same history) starts the intervals afresh
    instead of recording negative rates.
    """

    def __init__(self, hub: Hub, fine: Cadence = FINE, coarse: Cadence = COARSE) -> None:
        if coarse.step < fine.step:
            raise ValueError("the coarse cadence must not be finer than the fine one")
        self.hub = hub
        self.rings = {fine.name: Ring(fine), coarse.name: Ring(coarse)}
        self.fine = self.rings[fine.name]
        self.coarse = self.rings[coarse.name]
        self._fine_base: MetricsSnapshot | None = None
        self._coarse_base: MetricsSnapshot | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def nbytes(self) -> int:
        """Bytes held by the rings: fixed at construction."""
        return self.fine.nbytes + self.coarse.nbytes

    def record(self, snapshot: MetricsSnapshot | None = None) -> bool:
        """Take one fine sample now (and a coarse one when its step has passed).

        Returns False when there was nothing to record: the first call (no interval yet),
        no time passed, or the counters went back (a new hub): that call becomes the base.
        """
        snap = snapshot if snapshot is not None else self.hub.metrics.snapshot()
        base = self._fine_base
        self._fine_base = snap
        if base is None or snap.uptime_seconds < base.uptime_seconds:
            self._coarse_base = snap
            return False
        if snap.uptime_seconds - base.uptime_seconds <= 0:
            return False
        self.fine.append(_sample(snap, base))
        coarse_base = self._coarse_base
        if coarse_base is None:
            self._coarse_base = snap
        elif snap.uptime_seconds - coarse_base.uptime_seconds >= self.coarse.cadence.step - 1e-6:
            self.coarse.append(_sample(snap, coarse_base))
            self._coarse_base = snap
        return True

    def to_dict(self, cadence: str = FINE.name, since: float | None = None) -> dict[str, Any]:
        """One ring as JSON: `fields`, then `rows` (oldest first), each a list in that order.

        Raises `KeyError` for an unknown cadence name.
        """
        ring = self.rings[cadence]
        return {
            "cadence": cadence,
            "step_seconds": ring.cadence.step,
            "keep": ring.cadence.keep,
            "session": self.hub.session_id,
            "fields": list(FIELDS),
            "rows": ring.rows(since),
        }

    # ---- the sampling task

    async def run(self) -> None:
        clock = self.hub.clock
        step = self.fine.cadence.step
        self.record()
        while True:
            await clock.sleep(step)
            try:
                self.record()
            except Exception:  # one bad sample must not end the history
                log.exception("tether: history sample failed")

    def start(self) -> None:
        """Start sampling in the background (idempotent); needs a running event loop."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self.run(), name="tether-history")

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


__all__ = ["COARSE", "FIELDS", "FINE", "Cadence", "Ring", "SampleHistory"]
