"""/ws/live: the dashboard's push feed, one shared loop fanning updates out to every open page."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from starlette.websockets import WebSocket, WebSocketDisconnect

from .._version import __version__
from ..hub import Hub
from ..metrics import MetricsSnapshot
from ..resilience import CircuitState
from .health import HealthCheck

if TYPE_CHECKING:
    from .context import Monitor

__all__ = ["LiveCadence", "LiveFeed", "live"]

log = logging.getLogger("tether.monitoring")

_LIST_CAP = 200  # ids listed per breaker state in live updates; counts are always exact


@dataclass(frozen=True, slots=True)
class LiveCadence:
    """Seconds between /ws/live updates of each kind."""

    realtime: float = 1.0
    performance: float = 5.0
    aggregate: float = 30.0


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


async def live(websocket: WebSocket, m: Monitor) -> None:
    """Serve one dashboard: a `hello` with the recent history, then every update as a text frame."""
    refusal = m.access.live(websocket)
    if refusal is not None:
        # Refused before the handshake with the same HTTP status (and body) as the
        # other guarded routes: 401 asks for the token, 403 is final.
        await websocket.send_denial_response(refusal)
        return
    await websocket.accept()
    m.history.start()
    feed = m.feed
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
