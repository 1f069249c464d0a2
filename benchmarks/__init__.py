"""Tether benchmarks: each module is runnable as `python -m benchmarks.<name> [--quick] [--json PATH]`."""

from __future__ import annotations

from ._common import validate_result

# The order `tether bench` runs them in: cheap, pure ones first, sockets last.
BENCHMARKS: tuple[str, ...] = (
    "hash_performance",
    "circuit_breaker_latency",
    "cleanup_performance",
    "metrics_overhead",
    "e2e_throughput",
    "channels",
    "peers",
    "scale",
    "recovery",
    "sqlite_store",
)

__all__ = ["BENCHMARKS", "validate_result"]
