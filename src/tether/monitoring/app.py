"""create_app: one Starlette app serving /ws, health, Prometheus, the JSON + publish API, /ws/live
and the dashboard for a Hub."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect

from .._version import __version__
from ..access import host_allowed, origin_allowed, origin_patterns
from ..backends.base import BackendError
from ..channels import PublishStatus
from ..config import ConfigError, format_bytes
from ..hub import CLIENT_ID_PATTERN, Hub
from ..metrics import MetricsSnapshot
from ..protocol import CHANNEL_PATTERN
from ..resilience import CircuitState
from ..transports.session import Authenticate
from .history import SampleHistory

log = logging.getLogger("tether.monitoring")

_HERE = Path(__file__).resolve().parent
DASHBOARD_DIR = _HERE / "static"
CLIENT_STATIC_DIR = _HERE.parent / "static"  # tether.js and other assets for clients

_UNSET: Any = object()
_STATE_RANK = {CircuitState.CLOSED: 0, CircuitState.HALF_OPEN: 1, CircuitState.OPEN: 2}
_SORT_KEYS = ("id", "pending", "state", "last_activity")
_MAX_PAGE = 500
_LIST_CAP = 200  # ids listed per breaker state in live updates; counts are always exact

Handler = Callable[[Request], Awaitable[Response]]


# --------------------------------------------------------------------------- responses


class JSONResponse(Response):
    """JSON via orjson (fast, and it serialises the hub's dicts as they are)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS)


def _error(status: int, error: str, message: str, **extra: Any) -> JSONResponse:
    headers = {"WWW-Authenticate": 'Bearer realm="tether"'} if status == 401 else None
    return JSONResponse({"error": error, "message": message, **extra}, status, headers=headers)


_MESSAGE_ID_FIELD = re.compile(rb'"message_id"\s*:\s*"((?:[^"\\]|\\.){1,256})"')
_PAYLOAD_SIZE = re.compile(r"payload is (\d+) bytes, over max_message_size")


def _peek_message_id(head: bytes) -> str | None:
    """The `message_id` of a body cut off for size, when it appears in what was read."""
    match = _MESSAGE_ID_FIELD.search(head[:65536])
    if match is None:
        return None
    with contextlib.suppress(orjson.JSONDecodeError):
        value = orjson.loads(b'"' + match.group(1) + b'"')
        return value if isinstance(value, str) else None
    return None


def _payload_too_large(message_id: str, reasons: list[str], limit: int) -> JSONResponse | None:
    """HTTP 413 naming the message and the limit, when the hub refused it for its size."""
    for reason in reasons:
        match = _PAYLOAD_SIZE.search(reason)
        if match is not None:
            size = format_bytes(int(match.group(1)))
            return _error(
                413,
                "too_large",
                f"message {message_id!r}: payload is {size}, over the {format_bytes(limit)} "
                "limit (TETHER_MAX_MESSAGE_SIZE)",
                message_id=message_id,
                limit_bytes=limit,
            )
    return None


# --------------------------------------------------------------------------- settings


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


@dataclass(frozen=True, slots=True)
class LiveCadence:
    """Seconds between /ws/live updates of each kind."""

    realtime: float = 1.0
    performance: float = 5.0
    aggregate: float = 30.0


def is_loopback(host: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost: addresses only this machine can reach."""
    if host is None:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _bearer(conn: HTTPConnection, *, allow_query: bool) -> str | None:
    header = conn.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    if allow_query:
        return conn.query_params.get("token")
    return None


def _cross_origin(
    conn: HTTPConnection, allowed: list[re.Pattern[str]], hosts: list[str] | None = None
) -> bool:
    """True when a browser sent this request from another site's page.

    Browsers send `Origin` with every POST and WebSocket handshake; a page elsewhere
    could otherwise publish through (or watch) a server that trusts loopback callers,
    since the victim's browser *is* on loopback. Non-browser clients send no Origin.
    Same-origin means the Origin equals the Host *and* names an allowed host: a DNS
    rebinding page controls both headers, but not the allowlist.
    """
    origin = conn.headers.get("origin")
    if origin is None:
        return False
    if allowed and origin_allowed(origin, allowed):
        return False
    host = conn.headers.get("host", "")
    netloc = urlsplit(origin).netloc
    if netloc.lower() != host.lower():
        return True
    return bool(hosts) and not host_allowed(netloc, hosts or [])


def _token_ok(given: str | None, expected: str) -> bool:
    # compare_digest keeps the comparison time independent of where the strings differ
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


# --------------------------------------------------------------------------- request bodies


class _Publish(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    data: Any = Field(description="Payload: a JSON string goes as text, anything else as JSON.")
    critical: bool = Field(False, description="Queue, retry, deliver in order; or best-effort.")
    message_id: str | None = Field(
        None, min_length=1, max_length=256, description="Idempotency key (deduplication)."
    )
    ttl: float | None = Field(
        None, gt=0, le=86_400 * 365, description="Seconds a critical message may wait."
    )

    @field_validator("ttl", mode="before")
    @classmethod
    def _int_ttl(cls, value: Any) -> Any:
        # strict mode refuses ints for a float field; 30 is as good a ttl as 30.0
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


_Body = TypeVar("_Body", bound=BaseModel)


class SendRequest(_Publish):
    """Body of POST /api/send."""

    client_id: str = Field(
        min_length=1,
        max_length=128,
        pattern=CLIENT_ID_PATTERN.pattern,
        description="Target client id.",
    )


class BroadcastRequest(_Publish):
    """Body of POST /api/broadcast."""

    group: str | None = Field(
        None, min_length=1, max_length=256, description="Only this group's members."
    )
    exclude: list[str] = Field(default_factory=list, max_length=10_000)


class ChannelPublishRequest(BaseModel):
    """Body of POST /api/publish."""

    model_config = ConfigDict(extra="forbid", strict=True)
    channel: str = Field(
        min_length=1,
        max_length=128,
        pattern=f"^{CHANNEL_PATTERN.pattern}$",
        description="The channel.",
    )
    data: Any = Field(description="Payload: a JSON string goes as text, anything else as JSON.")
    id: str | None = Field(
        None, min_length=1, max_length=256, description="Message id (dedup within the history)."
    )


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ())) or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


# --------------------------------------------------------------------------- live feed


class LiveFeed:
    """Computes /ws/live updates once per cadence and fans them out to every subscriber.

    One shared loop (not one per browser tab) keeps the cost of N dashboards at one
    snapshot per tick; each subscriber has a small queue, and a tab that stops reading
    loses old updates instead of slowing the others.
    """

    def __init__(self, hub: Hub, cadence: LiveCadence, history: int = 120) -> None:
        self.hub = hub
        self.cadence = cadence
        self._subscribers: set[asyncio.Queue[bytes]] = set()
        self._task: asyncio.Task[None] | None = None
        self._last: dict[str, bytes] = {}
        self._history: deque[dict[str, Any]] = deque(maxlen=history)
        self._perf_base: MetricsSnapshot | None = None
        self._aggr_base: MetricsSnapshot | None = None
        self.health: HealthCheck | None = None  # set by create_app: health in every realtime

    # ---- payloads

    def _states(self) -> dict[str, list[str]]:
        hub = self.hub
        return {
            "open": sorted(hub.clients_in_state(CircuitState.OPEN))[:_LIST_CAP],
            "half_open": sorted(hub.clients_in_state(CircuitState.HALF_OPEN))[:_LIST_CAP],
        }

    def realtime(self) -> dict[str, Any]:
        data = self.hub.metrics.snapshot().to_dict()
        lists = self._states()
        return {
            "type": "realtime",
            "session": self.hub.session_id,
            "ts": data["taken_at"],
            "circuit_breaker": data["circuit_breaker"],
            "open_clients": lists["open"],
            "half_open_clients": lists["half_open"],
            "connections": data["connections"],
            "queue": data["queue"],
            "retry": data["retry"],
            "memory": data["memory"],
            "closing": self.hub.closing,
            # header, totals and health come from this same snapshot, so the page agrees
            "uptime_seconds": data["uptime_seconds"],
            "messages": data["messages"],
            "health": self.health.evaluate(data) if self.health is not None else None,
        }

    def performance(self) -> dict[str, Any]:
        snap = self.hub.metrics.snapshot()
        base = self._perf_base
        self._perf_base = snap
        interval = snap.diff(base) if base is not None else None
        point = self._rates(snap, interval)
        self._history.append(point)
        return {"type": "performance", "session": self.hub.session_id, **point}

    def aggregate(self) -> dict[str, Any]:
        snap = self.hub.metrics.snapshot()
        base = self._aggr_base
        self._aggr_base = snap
        totals = snap.to_dict()
        interval = snap.diff(base) if base is not None else None
        return {
            "type": "aggregate",
            "session": self.hub.session_id,
            "ts": totals["taken_at"],
            "totals": totals,
            "window": self._rates(snap, interval),
            "lifetime_rates": self._per_second(totals, totals["uptime_seconds"]),
        }

    @staticmethod
    def _per_second(data: dict[str, Any], seconds: float) -> dict[str, float]:
        if seconds <= 0:
            return {"sent": 0.0, "delivered": 0.0, "failed": 0.0, "queued": 0.0, "dropped": 0.0}
        msgs = data["messages"]
        return {
            k: round(msgs[k] / seconds, 3)
            for k in ("sent", "delivered", "failed", "queued", "dropped")
        }

    def _rates(self, snap: MetricsSnapshot, interval: MetricsSnapshot | None) -> dict[str, Any]:
        now = snap.to_dict()
        if interval is None:  # first tick: no interval yet, so no rates to claim
            lat = now["latency"]
            throughput = self._per_second(now, 0.0)
            seconds = 0.0
        else:
            diff = interval.to_dict()
            lat = diff["latency"]
            seconds = interval.uptime_seconds
            throughput = self._per_second(diff, seconds)
        return {
            "ts": now["taken_at"],
            "interval_seconds": round(seconds, 3),
            "latency": {k: lat[k] for k in ("p50_ms", "p95_ms", "p99_ms", "average_ms", "count")},
            "throughput": throughput,
            "memory": now["memory"],
        }

    def hello(self) -> dict[str, Any]:
        return {
            "type": "hello",
            "session": self.hub.session_id,
            "version": __version__,
            "cadence": {
                "realtime": self.cadence.realtime,
                "performance": self.cadence.performance,
                "aggregate": self.cadence.aggregate,
            },
            "history": list(self._history),
        }

    # ---- fan-out

    def _publish(self, kind: str, payload: dict[str, Any]) -> None:
        frame = orjson.dumps(payload, option=orjson.OPT_NON_STR_KEYS)
        self._last[kind] = frame
        for queue in self._subscribers:
            if queue.full():  # a slow tab loses its oldest update, never blocks the feed
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait(frame)

    async def _run(self) -> None:
        kinds: list[tuple[str, float, Callable[[], dict[str, Any]]]] = [
            ("realtime", self.cadence.realtime, self.realtime),
            ("performance", self.cadence.performance, self.performance),
            ("aggregate", self.cadence.aggregate, self.aggregate),
        ]
        loop = asyncio.get_running_loop()
        due = dict.fromkeys((k for k, _, _ in kinds), loop.time())
        while True:
            now = loop.time()
            for kind, every, build in kinds:
                if now >= due[kind]:
                    try:
                        self._publish(kind, build())
                    except Exception:  # one bad tick must not end every dashboard's feed
                        log.exception("tether: live %s update failed", kind)
                    due[kind] = max(due[kind] + every, now + every / 4)
            await asyncio.sleep(max(0.01, min(due.values()) - loop.time()))

    def subscribe(self) -> asyncio.Queue[bytes]:
        queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=16)
        # a new tab starts with the latest of each kind instead of waiting a whole cadence
        for frame in self._last.values():
            queue.put_nowait(frame)
        self._subscribers.add(queue)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="tether-live-feed")
        return queue

    async def unsubscribe(self, queue: asyncio.Queue[bytes]) -> None:
        self._subscribers.discard(queue)
        if not self._subscribers and self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


# --------------------------------------------------------------------------- health


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
            degraded.append(f"{backend.name} backend unreachable")
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


# --------------------------------------------------------------------------- the app


@dataclass(frozen=True, slots=True)
class _Access:
    monitor_token: str | None
    api_token: str | None
    public_bind: bool  # bound beyond loopback
    origins: list[re.Pattern[str]]  # allowed_origins, besides the app's own
    hosts: list[str] | None = None  # allowed Host names (empty: any)

    def monitor(self, conn: HTTPConnection, *, allow_query: bool = False) -> Response | None:
        """None when the caller may read monitoring data, else the refusal."""
        if self.monitor_token is not None:
            if not _token_ok(_bearer(conn, allow_query=allow_query), self.monitor_token):
                return _error(401, "unauthorized", "monitoring needs Authorization: Bearer <token>")
            return None
        if self.public_bind and not is_loopback(conn.client.host if conn.client else None):
            # no token and reachable from the network: only this machine may look
            return _error(
                403, "forbidden", "monitoring answers loopback only; set TETHER_MONITOR_TOKEN"
            )
        return None

    def publish(self, conn: HTTPConnection) -> Response | None:
        if _cross_origin(conn, self.origins, self.hosts):
            return _error(403, "forbidden", "cross-origin publishing is refused")
        if self.api_token is not None:
            if not _token_ok(_bearer(conn, allow_query=False), self.api_token):
                return _error(
                    401, "unauthorized", "publishing needs Authorization: Bearer <api token>"
                )
            return None
        if self.public_bind and not is_loopback(conn.client.host if conn.client else None):
            return _error(403, "forbidden", "the publish API needs TETHER_API_TOKEN")
        return None


def create_app(
    hub: Hub,
    *,
    monitor_token: str | None = _UNSET,
    api_token: str | None = _UNSET,
    host: str | None = None,
    ws_path: str = "/ws",
    realtime_interval: float = 1.0,
    performance_interval: float = 5.0,
    aggregate_interval: float = 30.0,
    health: HealthThresholds | None = None,
    start_hub: bool = True,
    shutdown_hub: bool = False,
    include_ws: bool = True,
    authenticate: Authenticate | None = None,
    history: SampleHistory | None = None,
) -> Starlette:
    """A Starlette app serving `hub`: the delivery WebSocket at `ws_path` and monitoring.

    Tokens and `host` (the address the server binds, which decides whether the network
    can reach it) default to `hub.config`. Binding beyond loopback without `api_token`
    is refused with `ConfigError`: an open publish API would let anyone message every
    client. Without `monitor_token` the monitoring routes then answer loopback callers
    only. Mounted in FastAPI the lifespan may not run; the hub starts on first use.
    `authenticate` is the `/ws` hook (see `tether.auth`); without one, `auth_secret`
    (TETHER_AUTH_SECRET) turns on signed tokens. `history` (default: a new
    `SampleHistory(hub)`) is sampled from app start-up, dashboard open or not, and
    served at `/api/history`.
    """
    cfg = hub.config
    monitor = cfg.monitor_token if monitor_token is _UNSET else monitor_token
    api = cfg.api_token if api_token is _UNSET else api_token
    bind = cfg.host if host is None else host
    public = not is_loopback(bind)
    if public and not api:
        raise ConfigError(
            f"TETHER_API_TOKEN: required when binding {bind!r} (beyond loopback): "
            "POST /api/send and /api/broadcast would otherwise let anyone message any client"
        )
    for name, value in (("TETHER_MONITOR_TOKEN", monitor), ("TETHER_API_TOKEN", api)):
        if value is not None and len(value) < 8:
            raise ConfigError(f"{name}: a token must be at least 8 characters")
    cadence = LiveCadence(realtime_interval, performance_interval, aggregate_interval)
    if min(realtime_interval, performance_interval, aggregate_interval) <= 0:
        raise ValueError("live update intervals must be positive")
    hosts = cfg.effective_allowed_hosts
    access = _Access(
        monitor or None, api or None, public, origin_patterns(cfg.allowed_origins), hosts
    )
    feed = LiveFeed(hub, cadence)
    checker = HealthCheck(hub, health or HealthThresholds())
    feed.health = checker
    samples = history if history is not None else SampleHistory(hub)

    def guarded(handler: Handler, *, allow_query: bool = False) -> Handler:
        async def endpoint(request: Request) -> Response:
            refusal = access.monitor(request, allow_query=allow_query)
            return refusal if refusal is not None else await handler(request)

        endpoint.__name__ = handler.__name__
        return endpoint

    # ---- monitoring

    async def health_route(request: Request) -> Response:
        report = checker.evaluate()
        return JSONResponse(report, 503 if report["status"] == "failing" else 200)

    async def prometheus(request: Request) -> Response:
        body = await asyncio.to_thread(generate_latest, hub.metrics.prometheus_registry)
        return Response(body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def api_metrics(request: Request) -> Response:
        return JSONResponse(hub.metrics.snapshot().to_dict())

    async def api_history(request: Request) -> Response:
        samples.start()  # mounted without a lifespan: sampling starts with the first reader
        q = request.query_params
        cadence = q.get("cadence", "fine")
        if cadence not in samples.rings:
            return _error(400, "bad_request", f"cadence must be one of {', '.join(samples.rings)}")
        try:
            since = float(q["since"]) if "since" in q else None
        except ValueError:
            return _error(400, "bad_request", "since must be a number (wall-clock seconds)")
        return JSONResponse(samples.to_dict(cadence, since))

    async def api_clients(request: Request) -> Response:
        q = request.query_params
        try:
            limit = int(q.get("limit", "50"))
            offset = int(q.get("offset", "0"))
        except ValueError:
            return _error(400, "bad_request", "limit and offset must be integers")
        if not 1 <= limit <= _MAX_PAGE or offset < 0:
            return _error(400, "bad_request", f"limit must be 1..{_MAX_PAGE} and offset >= 0")
        sort = q.get("sort", "id")
        descending = sort.startswith("-")
        key = sort.lstrip("-")
        if key not in _SORT_KEYS:
            return _error(
                400,
                "bad_request",
                f"sort must be one of {', '.join(_SORT_KEYS)} (- prefix: descending)",
            )
        state_filter: CircuitState | None = None
        if "state" in q:
            try:
                state_filter = CircuitState(q["state"].lower())
            except ValueError:
                return _error(400, "bad_request", "state must be closed, open or half_open")
        connected_filter: bool | None = None
        if "connected" in q:
            raw = q["connected"].lower()
            if raw not in ("true", "false", "1", "0"):
                return _error(400, "bad_request", "connected must be true or false")
            connected_filter = raw in ("true", "1")
        needle = q.get("q", "").lower()

        # Filter and sort on cheap accessors first; build full rows only for the page.
        ids = [
            cid
            for cid in hub.clients()
            if (not needle or needle in cid.lower())
            and (state_filter is None or hub.circuit_state(cid) is state_filter)
            and (connected_filter is None or hub.is_connected(cid) is connected_filter)
        ]
        if key == "id":
            ids.sort(reverse=descending)
        else:

            def sort_key(cid: str) -> tuple[Any, ...]:
                if key == "pending":
                    return (hub.pending(cid), cid)
                if key == "state":
                    return (_STATE_RANK[hub.circuit_state(cid)], hub.pending(cid), cid)
                return (hub.last_activity(cid) or 0.0, cid)

            ids.sort(key=sort_key, reverse=descending)
        page = ids[offset : offset + limit]
        items = [{"client_id": cid, **hub.metrics.client_dict(cid)} for cid in page]
        nxt = offset + limit if offset + limit < len(ids) else None
        return JSONResponse(
            {
                "total": len(ids),
                "offset": offset,
                "limit": limit,
                "sort": sort,
                "next_offset": nxt,
                "items": items,
            }
        )

    async def api_client(request: Request) -> Response:
        client_id = request.path_params["client_id"]
        info = hub.client_info(client_id)
        if info is None:
            return _error(404, "not_found", f"unknown client {client_id!r}")
        return JSONResponse(info)

    async def api_dead_letters(request: Request) -> Response:
        q = request.query_params
        try:
            limit = int(q.get("limit", "100"))
        except ValueError:
            return _error(400, "bad_request", "limit must be an integer")
        if not 1 <= limit <= _MAX_PAGE:
            return _error(400, "bad_request", f"limit must be 1..{_MAX_PAGE}")
        wanted = q.get("client_id")
        ids = [wanted] if wanted else hub.clients()
        letters = [d for cid in ids for d in hub.dead_letters(cid)]
        letters.sort(key=lambda d: d.failed_at, reverse=True)
        return JSONResponse(
            {"total": len(letters), "limit": limit, "items": [d.to_dict() for d in letters[:limit]]}
        )

    async def openapi(request: Request) -> Response:
        return JSONResponse(openapi_spec(ws_path))

    async def dashboard(request: Request) -> Response:
        return FileResponse(DASHBOARD_DIR / "dashboard.html", headers=_PAGE_HEADERS)

    async def dashboard_asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in ("dashboard.css", "dashboard.js"):
            return _error(404, "not_found", "no such asset")
        return FileResponse(DASHBOARD_DIR / name, headers=_PAGE_HEADERS)

    async def favicon(request: Request) -> Response:
        return FileResponse(CLIENT_STATIC_DIR / "favicon.svg", media_type="image/svg+xml")

    async def root(request: Request) -> Response:
        return RedirectResponse(str(request.url_for("dashboard")), 307)

    # ---- publish

    async def read_body(request: Request) -> tuple[Any, Response | None]:
        limit = cfg.max_message_size * 2 + 4096  # room for JSON escaping and the envelope fields
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                message_id = _peek_message_id(b"".join(chunks) + chunk)
                named = f"message {message_id!r}: " if message_id else ""
                return None, _error(
                    413,
                    "too_large",
                    f"{named}request body over {format_bytes(limit)}; payloads are limited to "
                    f"{format_bytes(cfg.max_message_size)} (TETHER_MAX_MESSAGE_SIZE)",
                    message_id=message_id,
                    limit_bytes=cfg.max_message_size,
                )
            chunks.append(chunk)
        try:
            return orjson.loads(b"".join(chunks)), None
        except orjson.JSONDecodeError as exc:
            return None, _error(400, "bad_request", f"body is not valid JSON: {exc}")

    async def publish_body(request: Request, model: type[_Body]) -> _Body | Response:
        """The validated body of a publish request, or the response refusing it."""
        refusal = access.publish(request)
        if refusal is not None:
            return refusal
        raw, problem = await read_body(request)
        if problem is not None:
            return problem
        try:
            body = model.model_validate(raw)
        except ValidationError as exc:
            return _error(400, "bad_request", _describe(exc))
        if hub.closing:
            return _error(503, "unavailable", "hub is shutting down")
        return body

    async def api_send(request: Request) -> Response:
        body = await publish_body(request, SendRequest)
        if isinstance(body, Response):
            return body
        result = await hub.send(
            body.client_id,
            body.data,
            critical=body.critical,
            message_id=body.message_id,
            ttl=body.ttl,
        )
        too_large = _payload_too_large(
            result.message_id, [result.reason or ""], cfg.max_message_size
        )
        return too_large or JSONResponse(result.to_dict())

    async def api_broadcast(request: Request) -> Response:
        body = await publish_body(request, BroadcastRequest)
        if isinstance(body, Response):
            return body
        result = await hub.broadcast(
            body.data,
            critical=body.critical,
            group=body.group,
            message_id=body.message_id,
            ttl=body.ttl,
            exclude=body.exclude,
        )
        too_large = _payload_too_large(
            result.message_id, list(result.reasons), cfg.max_message_size
        )
        return too_large or JSONResponse(result.to_dict())

    # ---- channels (tether.channels; docs/protocol.md section 11)

    async def api_publish(request: Request) -> Response:
        body = await publish_body(request, ChannelPublishRequest)
        if isinstance(body, Response):
            return body
        result = await hub.publish(body.channel, body.data, message_id=body.id)
        if result.status is PublishStatus.REJECTED and (result.reason or "").startswith(
            "backend unavailable"
        ):
            return _error(503, "unavailable", result.reason or "", id=result.id)
        too_large = _payload_too_large(result.id, [result.reason or ""], cfg.max_message_size)
        return too_large or JSONResponse(result.to_dict())

    async def api_channels(request: Request) -> Response:
        try:
            channels = await hub.channels.channels()
        except BackendError as exc:
            return _error(503, "unavailable", f"channel store unavailable: {exc}")
        return JSONResponse({"channels": channels})

    def channel_name(request: Request) -> str | Response:
        name = request.path_params["name"]
        if CHANNEL_PATTERN.fullmatch(name) is None:
            return _error(400, "bad_request", f"invalid channel name {name!r}")
        return str(name)

    async def api_channel_history(request: Request) -> Response:
        name = channel_name(request)
        if isinstance(name, Response):
            return name
        q = request.query_params
        try:
            since = int(q.get("since", "0"))
            limit = int(q.get("limit", "100"))
            if since < 0 or not 1 <= limit <= _MAX_PAGE:
                raise ValueError
        except ValueError:
            return _error(
                400, "bad_request", f"since must be an offset >= 0 and limit in 1..{_MAX_PAGE}"
            )
        try:
            epoch, messages = await hub.channels.read(name, since, limit)
        except BackendError as exc:
            return _error(503, "unavailable", f"channel store unavailable: {exc}")
        return JSONResponse(
            {"channel": name, "epoch": epoch, "messages": [m.to_dict() for m in messages]}
        )

    async def api_channel_presence(request: Request) -> Response:
        name = channel_name(request)
        if isinstance(name, Response):
            return name
        try:
            members = await hub.presence(name)
        except BackendError as exc:
            return _error(503, "unavailable", f"channel store unavailable: {exc}")
        return JSONResponse({"channel": name, "presence": members})

    # ---- live

    async def live(websocket: WebSocket) -> None:
        refusal = access.monitor(websocket, allow_query=True)
        if refusal is None and _cross_origin(websocket, access.origins, access.hosts):
            # another site's page in an operator's browser must not watch the feed
            refusal = _error(403, "forbidden", "cross-origin")
        if refusal is not None:
            # Refused before the handshake with the same HTTP status (and body) as the
            # other guarded routes: 401 asks for the token, 403 is final.
            await websocket.send_denial_response(refusal)
            return
        await websocket.accept()
        samples.start()
        queue = feed.subscribe()

        async def pump() -> None:
            await websocket.send_text(orjson.dumps(feed.hello()).decode())
            while True:
                frame = await queue.get()
                # text frames: the browser gets strings it can JSON.parse directly
                await websocket.send_text(frame.decode())

        sender = asyncio.create_task(pump())
        try:
            while True:  # reading is how a closed tab is noticed; what it says is ignored
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sender
            await feed.unsubscribe(queue)

    routes: list[BaseRoute] = []
    if include_ws:
        routes.extend(_delivery_routes(hub, ws_path, authenticate))
    routes += [
        Route("/", root, methods=["GET"]),
        Route("/health", guarded(health_route), methods=["GET"]),
        Route("/metrics", guarded(prometheus), methods=["GET"]),
        Route("/api/metrics", guarded(api_metrics), methods=["GET"]),
        Route("/api/history", guarded(api_history), methods=["GET"]),
        Route("/favicon.ico", favicon, methods=["GET"]),
        Route("/api/clients", guarded(api_clients), methods=["GET"]),
        Route("/api/clients/{client_id:str}", guarded(api_client), methods=["GET"]),
        Route("/api/dead-letters", guarded(api_dead_letters), methods=["GET"]),
        Route("/api/send", api_send, methods=["POST"]),
        Route("/api/broadcast", api_broadcast, methods=["POST"]),
        Route("/api/publish", api_publish, methods=["POST"]),
        Route("/api/channels", guarded(api_channels), methods=["GET"]),
        Route("/api/channels/{name:str}/history", guarded(api_channel_history), methods=["GET"]),
        Route("/api/channels/{name:str}/presence", guarded(api_channel_presence), methods=["GET"]),
        Route("/openapi.json", guarded(openapi), methods=["GET"]),
        # The page and its assets hold no data, so they load without the token (the
        # page then asks for it); the loopback-only rule still applies.
        Route("/dashboard", _loopback_only(access, dashboard), methods=["GET"], name="dashboard"),
        Route("/dashboard/{name:str}", _loopback_only(access, dashboard_asset), methods=["GET"]),
        WebSocketRoute("/ws/live", live),
        Mount("/static", StaticFiles(directory=CLIENT_STATIC_DIR, check_dir=False), name="static"),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if start_hub:
            await hub.start()
        samples.start()
        try:
            yield
        finally:
            await samples.stop()
            if shutdown_hub:
                await hub.shutdown()

    # DNS rebinding: a page on evil.example re-pointed at 127.0.0.1 sends `Host:
    # evil.example`; only the names this server is reachable as are served.
    middleware = (
        [Middleware(TrustedHostMiddleware, allowed_hosts=hosts, www_redirect=False)]
        if hosts
        else []
    )
    app = Starlette(routes=routes, lifespan=lifespan, middleware=middleware)
    app.state.hub = hub
    app.state.live_feed = feed
    app.state.health = checker
    app.state.history = samples
    return app


def _loopback_only(access: _Access, handler: Handler) -> Handler:
    async def endpoint(request: Request) -> Response:
        if access.monitor_token is None:
            refusal = access.monitor(request)
            if refusal is not None:
                return refusal
        return await handler(request)

    endpoint.__name__ = handler.__name__
    return endpoint


def _delivery_routes(hub: Hub, path: str, authenticate: Authenticate | None) -> list[BaseRoute]:
    # imported here: the Starlette transport is optional for users who only want monitoring
    try:
        from ..transports.starlette import websocket_route
    except ImportError as exc:  # pragma: no cover - only while the transport is missing
        log.warning("tether: %s not served (%s)", path, exc)
        return []
    route: BaseRoute = websocket_route(hub, path=path, authenticate=authenticate)
    return [route]


_PAGE_HEADERS = {
    # everything is same-origin; the token may sit in the URL once, so send no referrer
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self' ws: wss:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


# --------------------------------------------------------------------------- OpenAPI


def _schema(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_json_schema(ref_template="#/components/schemas/{model}")


def openapi_spec(ws_path: str = "/ws") -> dict[str, Any]:
    """An OpenAPI 3.1 description of the JSON routes (WebSockets are described in text)."""

    def ref(name: str) -> dict[str, str]:
        return {"$ref": f"#/components/schemas/{name}"}

    def ok(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
        return {"description": description, "content": {"application/json": {"schema": schema}}}

    error = ok(ref("Error"), "Error")
    monitor_sec: list[dict[str, list[str]]] = [{"monitorToken": []}, {}]
    api_sec: list[dict[str, list[str]]] = [{"apiToken": []}, {}]
    obj: dict[str, Any] = {"type": "object"}
    int_param = {"type": "integer", "minimum": 0}

    def q(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
        return {
            "name": name,
            "in": "query",
            "required": False,
            "schema": schema,
            "description": description,
        }

    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Tether monitoring and publish API",
            "version": __version__,
            "description": (
                f"Health, metrics and clients of a Tether hub, and HTTP publishing. The delivery "
                f"WebSocket is at `{ws_path}` (subprotocol `tether.v1` or plain); `/ws/live` "
                "pushes dashboard updates (JSON typed hello / realtime / performance / aggregate). "
                "`/metrics` serves Prometheus text."
            ),
        },
        "components": {
            "securitySchemes": {
                "monitorToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "TETHER_MONITOR_TOKEN",
                },
                "apiToken": {"type": "http", "scheme": "bearer", "description": "TETHER_API_TOKEN"},
            },
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error", "message"],
                    "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
                },
                "SendRequest": _schema(SendRequest),
                "ChannelPublishRequest": _schema(ChannelPublishRequest),
                "PublishResult": {
                    "type": "object",
                    "required": ["channel", "offset", "epoch", "status", "id"],
                    "properties": {
                        "channel": {"type": "string"},
                        "offset": {"type": "integer"},
                        "epoch": {"type": "string"},
                        "status": {"enum": [s.value for s in PublishStatus]},
                        "id": {"type": "string"},
                        "reason": {"type": ["string", "null"]},
                        "delivered": {"type": "integer"},
                    },
                },
                "BroadcastRequest": _schema(BroadcastRequest),
                "SendResult": {
                    "type": "object",
                    "required": ["status", "client_id", "message_id"],
                    "properties": {
                        "status": {"enum": ["sent", "queued", "duplicate", "dropped", "rejected"]},
                        "client_id": {"type": "string"},
                        "message_id": {"type": "string"},
                        "reason": {"type": ["string", "null"]},
                        "seq": {"type": ["integer", "null"]},
                    },
                },
                "BroadcastResult": {
                    "type": "object",
                    "properties": {
                        "message_id": {"type": "string"},
                        **{
                            k: {"type": "integer"}
                            for k in ("sent", "queued", "duplicate", "dropped", "rejected", "total")
                        },
                        "reasons": {"type": "object", "additionalProperties": {"type": "integer"}},
                    },
                },
                "Health": {
                    "type": "object",
                    "required": ["status", "reasons"],
                    "properties": {
                        "status": {"enum": ["ok", "degraded", "failing"]},
                        "reasons": {"type": "array", "items": {"type": "string"}},
                        "checks": obj,
                    },
                },
                "ClientPage": {
                    "type": "object",
                    "properties": {
                        "total": {"type": "integer"},
                        "offset": {"type": "integer"},
                        "limit": {"type": "integer"},
                        "next_offset": {"type": ["integer", "null"]},
                        "items": {"type": "array", "items": obj},
                    },
                },
            },
        },
        "paths": {
            "/health": {
                "get": {
                    "summary": "Health: ok / degraded (200) or failing (503), with reasons",
                    "security": monitor_sec,
                    "responses": {
                        "200": ok(ref("Health")),
                        "503": ok(ref("Health"), "Failing"),
                        "401": error,
                        "403": error,
                    },
                }
            },
            "/api/metrics": {
                "get": {
                    "summary": "Aggregate metrics (MetricsSnapshot.to_dict())",
                    "security": monitor_sec,
                    "responses": {"200": ok(obj), "401": error, "403": error},
                }
            },
            "/api/history": {
                "get": {
                    "summary": "Recent samples (rates, latency, clients) in fixed rings",
                    "description": (
                        "Recorded every second by the app whether or not a dashboard is "
                        "open: `fine` keeps 15 minutes at 1 s, `coarse` 24 hours at 60 s. "
                        "`rows` are lists in the order of `fields`, oldest first."
                    ),
                    "security": monitor_sec,
                    "parameters": [
                        q("cadence", {"enum": ["fine", "coarse"], "default": "fine"}, "Ring"),
                        q("since", {"type": "number"}, "Only samples after this wall time"),
                    ],
                    "responses": {"200": ok(obj), "400": error, "401": error, "403": error},
                }
            },
            "/api/clients": {
                "get": {
                    "summary": "Tracked clients, filtered, sorted and paginated",
                    "security": monitor_sec,
                    "parameters": [
                        q(
                            "limit",
                            {"type": "integer", "minimum": 1, "maximum": _MAX_PAGE, "default": 50},
                            "Page size",
                        ),
                        q("offset", {**int_param, "default": 0}, "Rows to skip"),
                        q(
                            "sort",
                            {
                                "enum": [*_SORT_KEYS, *("-" + k for k in _SORT_KEYS)],
                                "default": "id",
                            },
                            "Sort key; a leading - sorts descending",
                        ),
                        q("q", {"type": "string"}, "Client id substring (case-insensitive)"),
                        q("state", {"enum": ["closed", "open", "half_open"]}, "Breaker state"),
                        q("connected", {"type": "boolean"}, "Connected now"),
                    ],
                    "responses": {
                        "200": ok(ref("ClientPage")),
                        "400": error,
                        "401": error,
                        "403": error,
                    },
                }
            },
            "/api/clients/{client_id}": {
                "get": {
                    "summary": "One client: breaker, outbox summary, dead letters, counters",
                    "security": monitor_sec,
                    "parameters": [
                        {
                            "name": "client_id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                    "responses": {"200": ok(obj), "404": error, "401": error, "403": error},
                }
            },
            "/api/dead-letters": {
                "get": {
                    "summary": "Dead-lettered messages, newest first",
                    "security": monitor_sec,
                    "parameters": [
                        q(
                            "limit",
                            {"type": "integer", "minimum": 1, "maximum": _MAX_PAGE, "default": 100},
                            "At most",
                        ),
                        q("client_id", {"type": "string"}, "Only this client's"),
                    ],
                    "responses": {"200": ok(obj), "400": error, "401": error, "403": error},
                }
            },
            "/api/send": {
                "post": {
                    "summary": "Send one message to one client",
                    "security": api_sec,
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": ref("SendRequest")}},
                    },
                    "responses": {
                        "200": ok(ref("SendResult")),
                        "400": error,
                        "401": error,
                        "403": error,
                        "413": error,
                        "503": error,
                    },
                }
            },
            "/api/publish": {
                "post": {
                    "summary": "Publish one message to a channel (stored once, fanned out)",
                    "security": api_sec,
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": ref("ChannelPublishRequest")}},
                    },
                    "responses": {
                        "200": ok(ref("PublishResult")),
                        "400": error,
                        "401": error,
                        "403": error,
                        "413": error,
                        "503": error,
                    },
                }
            },
            "/api/channels": {
                "get": {
                    "summary": "Channels with their epoch, last offset, history depth, subscribers",
                    "security": monitor_sec,
                    "responses": {"200": ok(obj), "401": error, "403": error, "503": error},
                }
            },
            "/api/channels/{name}/history": {
                "get": {
                    "summary": "Messages a channel still holds, oldest first",
                    "security": monitor_sec,
                    "parameters": [
                        {
                            "name": "name",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        },
                        q("since", int_param, "Only messages after this offset"),
                        q(
                            "limit",
                            {"type": "integer", "minimum": 1, "maximum": _MAX_PAGE, "default": 100},
                            "At most",
                        ),
                    ],
                    "responses": {
                        "200": ok(obj),
                        "400": error,
                        "401": error,
                        "403": error,
                        "503": error,
                    },
                }
            },
            "/api/channels/{name}/presence": {
                "get": {
                    "summary": "Who is subscribed to a channel, across every node",
                    "security": monitor_sec,
                    "parameters": [
                        {
                            "name": "name",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                    "responses": {
                        "200": ok(obj),
                        "400": error,
                        "401": error,
                        "403": error,
                        "503": error,
                    },
                }
            },
            "/api/broadcast": {
                "post": {
                    "summary": "Send one message to every client, or to a group's members",
                    "security": api_sec,
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": ref("BroadcastRequest")}},
                    },
                    "responses": {
                        "200": ok(ref("BroadcastResult")),
                        "400": error,
                        "401": error,
                        "403": error,
                        "413": error,
                        "503": error,
                    },
                }
            },
        },
    }


__all__ = ["HealthThresholds", "LiveCadence", "create_app", "is_loopback", "openapi_spec"]
