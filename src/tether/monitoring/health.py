"""GET /health: the hub's metrics judged ok / degraded (200) or failing (503), with reasons."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict
from starlette.requests import Request
from starlette.responses import Response

from .._version import __version__
from ..hub import Hub
from .responses import JSONResponse
from .routing import Endpoint

if TYPE_CHECKING:
    from .context import Monitor

__all__ = ["ENDPOINTS", "HealthCheck", "HealthReport", "HealthThresholds"]


@dataclass(frozen=True, slots=True)
class HealthThresholds:
    """When /health says degraded (still 200) or failing (503).

    Open breakers: degraded from `open_breakers_degraded` open clients, failing once that
    many open clients are also at least `open_ratio_failing` of the tracked ones (a whole
    fleet failing means the server side is broken, not a few phones in tunnels).
    """

    open_breakers_degraded: int = 1
    open_ratio_failing: float = 0.5
    oldest_pending_degraded: float = 30.0
    oldest_pending_failing: float = 120.0
    backlog_degraded: int = 10_000
    backlog_failing: int = 100_000
    backend_error_window: float = 60.0  # backend errors this recent are reported (degraded)


class HealthReport(BaseModel):
    """The body of /health (and the `health` of each /ws/live realtime update)."""

    model_config = ConfigDict(title="Health", extra="forbid")

    status: Literal["ok", "degraded", "failing"]
    reasons: list[str]
    session: str
    version: str
    checks: dict[str, Any]
    uptime_seconds: float


class HealthCheck:
    """Turns the hub's metrics into ok / degraded / failing with human-readable reasons."""

    def __init__(self, hub: Hub, thresholds: HealthThresholds) -> None:
        self.hub = hub
        self.t = thresholds
        self._backend_errors = 0
        self._backend_error_at: float | None = None

    def evaluate(self, data: dict[str, Any] | None = None) -> dict[str, Any]:
        """ok / degraded / failing, from `data` (a snapshot's `to_dict()`) or a fresh one."""
        if data is None:
            data = self.hub.metrics.snapshot().to_dict()
        t = self.t
        failing: list[str] = []
        degraded: list[str] = []

        if self.hub.closing:
            failing.append("hub is shutting down")

        cb = data["circuit_breaker"]
        tracked = max(1, data["memory"]["tracked_clients"])
        open_count = cb["open"]
        if open_count >= t.open_breakers_degraded:
            msg = f"{open_count} of {tracked} client circuit breakers open"
            if open_count / tracked >= t.open_ratio_failing:
                failing.append(msg)
            else:
                degraded.append(msg)

        age = data["queue"]["oldest_pending_age_seconds"]
        if age >= t.oldest_pending_failing:
            failing.append(
                f"oldest pending message {age:.1f}s old (>= {t.oldest_pending_failing}s)"
            )
        elif age >= t.oldest_pending_degraded:
            degraded.append(
                f"oldest pending message {age:.1f}s old (>= {t.oldest_pending_degraded}s)"
            )

        backlog = data["queue"]["current_size"]
        if backlog >= t.backlog_failing:
            failing.append(f"{backlog} messages pending (>= {t.backlog_failing})")
        elif backlog >= t.backlog_degraded:
            degraded.append(f"{backlog} messages pending (>= {t.backlog_degraded})")

        # A backend outage degrades the hub rather than failing it: local connections keep
        # working and critical sends are refused with a reason, never lost. Errors are a
        # running count, so only recent ones are reported.
        errors = data["backend"]["errors"]
        now = time.monotonic()
        if errors > self._backend_errors:
            self._backend_error_at = now
        self._backend_errors = errors
        backend = self.hub.backend
        if not backend.healthy:
            damage = backend.describe().get("damage")  # the sqlite store's integrity check
            degraded.append(
                f"{backend.name} store damaged: {damage}"
                if damage
                else f"{backend.name} backend unreachable"
            )
        elif (
            errors
            and self._backend_error_at is not None
            and now - self._backend_error_at <= t.backend_error_window
        ):
            degraded.append(
                f"{errors} backend errors (last {now - self._backend_error_at:.0f} s ago)"
            )

        status = "failing" if failing else "degraded" if degraded else "ok"
        return {
            "status": status,
            "reasons": failing + degraded,
            "session": self.hub.session_id,
            "version": __version__,
            "checks": {
                "circuit_breaker": {
                    "open": open_count,
                    "half_open": cb["half_open"],
                    "tracked": tracked,
                },
                "oldest_pending_age_seconds": age,
                "backlog": backlog,
                "backend_errors": errors,
                "backend": backend.describe(),
                "connections_active": data["connections"]["active"],
            },
            "uptime_seconds": data["uptime_seconds"],
        }


async def health(request: Request, m: Monitor) -> Response:
    report = m.health.evaluate()
    return JSONResponse(report, 503 if report["status"] == "failing" else 200)


ENDPOINTS = [
    Endpoint(
        "/health",
        health,
        "monitor",
        summary="Health: ok / degraded (200) or failing (503), with reasons",
        responses={200: HealthReport, 503: HealthReport},
    ),
]
