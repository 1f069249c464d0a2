"""Accounting: the one place that counts what happens to messages and connections."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .metrics import INSTANT, PENDING_SAMPLES, Counters, HubMetrics
from .resilience import CircuitState

if TYPE_CHECKING:
    from .messages import Envelope
    from .session import ClientSession


class Accounting:
    """One method per event; each bumps the hub-wide counter and the client's own.

    Hub-wide counters are always kept (results and shutdown statistics rely on them);
    the per-delivery ones (sent, delivered, queued) are kept per client only and summed
    when read. Other per-client message counters and the latency histogram are kept only
    when metrics are enabled; per-client connection and breaker counters always are
    (they are cheap and rare). This class is the only code that knows that difference.

    Latency is what a message waited: from the send call to its write (plain mode) or
    its ack (tether.v1). A delivery that waited less than the histogram's first bound
    (a message written by the call that sent it) is counted in
    `ClientStats.delivered_at_once` instead of `messages_delivered` — no buffered
    sample — and read as a latency of 0 in the first bucket.
    """

    __slots__ = ("_latency", "_sample", "_samples", "enabled", "metrics", "totals")

    def __init__(self, metrics: HubMetrics) -> None:
        self.metrics = metrics
        self.totals: Counters = metrics.counters
        # Metrics on: detailed counts and latency (then `delivered` needs a clock reading).
        # An attribute, read once per delivery, not a property call.
        self.enabled = metrics.enabled
        self._latency = metrics.latency
        # A delivery's latency sample is a list append (the histogram bins them in batches).
        self._samples = metrics.latency.pending
        self._sample = metrics.latency.pending.append

    # -- messages
    # sent, delivered and queued are counted on the client only, metrics on or off (the
    # hub-wide values are summed when read): one integer add per delivery either way.

    def sent(self, client: ClientSession) -> None:
        """A message was written to the client's connection (or forwarded) for the first time."""
        client.stats.counters.messages_sent += 1

    def delivered(self, client: ClientSession, envelope: Envelope, now: float) -> None:
        """A message reached the client: written (plain) or acknowledged (tether.v1)."""
        if not self.enabled:
            client.stats.counters.messages_delivered += 1
        elif now - envelope.created_at < INSTANT:  # the first latency bucket: counted only
            client.stats.delivered_at_once += 1
        else:
            client.stats.counters.messages_delivered += 1
            self._sample(now - envelope.created_at)
            if len(self._samples) >= PENDING_SAMPLES:
                self._latency.fold()

    def delivered_untimed(self, client: ClientSession) -> None:
        """`delivered` in a fan-out batch, whose latency `delivered_latency` records once."""
        client.stats.counters.messages_delivered += 1

    def delivered_many(self, client: ClientSession, envelopes: list[Envelope], now: float) -> None:
        """Messages an ack delivered, all at `now`."""
        client.stats.counters.messages_delivered += len(envelopes)
        if self.enabled:
            self._latency.record_ages(now, envelopes)

    def sent_and_delivered(self, client: ClientSession, envelope: Envelope, now: float) -> None:
        """A best-effort message was written: sent and delivered in one event."""
        stats = client.stats
        stats.counters.messages_sent += 1
        if not self.enabled:
            stats.counters.messages_delivered += 1
        elif now - envelope.created_at < INSTANT:  # the first latency bucket: counted only
            stats.delivered_at_once += 1
        else:
            stats.counters.messages_delivered += 1
            self._sample(now - envelope.created_at)
            if len(self._samples) >= PENDING_SAMPLES:
                self._latency.fold()

    def sent_and_delivered_untimed(self, client: ClientSession) -> None:
        """`sent_and_delivered` in a fan-out batch, whose latency `delivered_latency`
        records once for all its writes."""
        mine = client.stats.counters
        mine.messages_sent += 1
        mine.messages_delivered += 1

    def delivered_latency(self, envelope: Envelope, now: float, count: int) -> None:
        """`count` deliveries of `envelope` (a broadcast's), all done by `now`."""
        if self.enabled:
            self._latency.record_many(now - envelope.created_at, count)

    def delivered_total(self) -> int:
        """Messages delivered so far, hub-wide."""
        return self.metrics.total("messages_delivered")

    def queued(self, client: ClientSession) -> None:
        client.stats.counters.messages_queued += 1

    def delivered_evicted(self, client: ClientSession, count: int) -> None:
        """`count` in-flight messages pushed out of the outbox were acknowledged after all:
        delivered (no latency sample: their envelopes are gone)."""
        client.stats.counters.messages_delivered += count

    def dropped(self, client: ClientSession, count: int = 1) -> None:
        self.totals.messages_dropped += count
        if self.enabled:
            client.stats.counters.messages_dropped += count

    def rejected(self, client: ClientSession) -> None:
        self.totals.messages_rejected += 1
        if self.enabled:
            client.stats.counters.messages_rejected += 1

    def rejected_untracked(self, count: int = 1) -> None:
        """Sends refused before any client was tracked for them (bad id, payload, closing)."""
        self.totals.messages_rejected += count

    def expired(self, client: ClientSession) -> None:
        self.totals.messages_expired += 1
        if self.enabled:
            client.stats.counters.messages_expired += 1

    def expired_stored(self, client: ClientSession | None, count: int) -> None:
        """`count` messages expired in a store, for a client this hub may not track."""
        self.totals.messages_expired += count
        if self.enabled and client is not None:
            client.stats.counters.messages_expired += count

    def deduplicated(self, client: ClientSession) -> None:
        self.totals.messages_deduplicated += 1
        if self.enabled:
            client.stats.counters.messages_deduplicated += 1

    def dead_lettered(self, client: ClientSession) -> None:
        self.totals.messages_dead_lettered += 1
        if self.enabled:
            client.stats.counters.messages_dead_lettered += 1

    def failed(self, client: ClientSession) -> None:
        """A write to the client failed (charged to its breaker)."""
        self.totals.messages_failed += 1
        if self.enabled:
            client.stats.counters.messages_failed += 1

    def overflow(self, client: ClientSession) -> None:
        """The client's outbox was full when a message arrived."""
        self.totals.queue_overflows += 1
        if self.enabled:
            client.stats.counters.queue_overflows += 1

    def received(self, client: ClientSession | None) -> None:
        """Inbound data from a client (None: one the hub does not track)."""
        self.totals.messages_received += 1
        if client is not None and self.enabled:
            client.stats.counters.messages_received += 1

    # -- retries

    def retry_attempt(self, client: ClientSession) -> None:
        self.totals.retry_attempts += 1
        if self.enabled:
            client.stats.counters.retry_attempts += 1

    def retry_success(self, client: ClientSession) -> None:
        self.totals.retry_successes += 1
        if self.enabled:
            client.stats.counters.retry_successes += 1

    def retry_failure(self, client: ClientSession) -> None:
        self.totals.retry_failures += 1
        if self.enabled:
            client.stats.counters.retry_failures += 1

    # -- streams (tether.v1 resume, shared stores)

    def stream_reset(self, client: ClientSession) -> None:
        """A resume was answered with a reset: the stream could not be vouched for."""
        self.totals.streams_resets += 1
        if self.enabled:
            client.stats.counters.streams_resets += 1

    def stream_lost(self, client: ClientSession, count: int) -> None:
        """`count` seqs were reported lost to a resuming client."""
        self.totals.streams_lost += count
        if self.enabled:
            client.stats.counters.streams_lost += count

    def outcome_unknown(self, client: ClientSession) -> None:
        """A critical store write got no reply (the send is UNKNOWN)."""
        self.totals.streams_unknown += 1
        if self.enabled:
            client.stats.counters.streams_unknown += 1

    # -- connections and breakers (per client always)

    def connected(self, client: ClientSession, *, reconnection: bool) -> None:
        totals, mine = self.totals, client.stats.counters
        totals.connections_total += 1
        mine.connections_total += 1
        if reconnection:
            totals.connections_reconnections += 1
            mine.connections_reconnections += 1

    def connection_failed(self, client: ClientSession) -> None:
        self.totals.connections_failed += 1
        client.stats.counters.connections_failed += 1

    def timeout(self, client: ClientSession) -> None:
        """A write timed out: the connection is dropped and the write failed."""
        self.totals.connections_timeouts += 1
        if self.enabled:
            client.stats.counters.connections_timeouts += 1
        self.failed(client)

    def breaker_moved(self, client_id: str, new: CircuitState) -> None:
        """The client's circuit breaker entered `new`."""
        mine = stats.counters if (stats := self.metrics.clients.get(client_id)) else None
        totals = self.totals
        if new is CircuitState.OPEN:
            totals.circuit_breaker_opens += 1
            if mine is not None:
                mine.circuit_breaker_opens += 1
        elif new is CircuitState.HALF_OPEN:
            totals.circuit_breaker_half_opens += 1
            if mine is not None:
                mine.circuit_breaker_half_opens += 1
        else:
            totals.circuit_breaker_closes += 1
            if mine is not None:
                mine.circuit_breaker_closes += 1
