"""The dashboard's sample history: recorded by the monitoring app whether or not a page is open,
at two cadences in fixed-size rings, served at /api/history; driven by a ManualClock."""

from __future__ import annotations

import asyncio

import httpx

from tether import Hub, HubConfig, ManualClock
from tether.monitoring import BackgroundServer, create_app
from tether.monitoring.history import FIELDS, Cadence, SampleHistory
from tether.testing import MockWebSocket


async def tick(clock: ManualClock, seconds: int) -> None:
    """Advance one second at a time, letting the sampler (and the hub) run after each."""
    for _ in range(seconds):
        clock.advance(1.0)
        for _ in range(5):
            await asyncio.sleep(0)


async def test_samples_are_recorded_with_no_dashboard_open_and_served() -> None:
    clock = ManualClock()
    hub = Hub(HubConfig(), clock=clock)
    await hub.connect("alice", MockWebSocket())
    app = create_app(hub, monitor_token=None, api_token=None)
    async with (
        BackgroundServer(app) as server,
        httpx.AsyncClient(base_url=server.url, timeout=5) as http,
    ):
        await tick(clock, 1)
        for _ in range(10):
            await hub.send("alice", {"n": 1}, critical=True)  # 10 deliveries in the next second
        await tick(clock, 119)
        fine = (await http.get("/api/history")).json()
        coarse = (await http.get("/api/history?cadence=coarse")).json()
        later = (await http.get(f"/api/history?since={fine['rows'][-5][0]}")).json()
        bad = await http.get("/api/history?cadence=hourly")
    await hub.shutdown(timeout=1.0)

    assert fine["fields"] == list(FIELDS)
    assert (fine["step_seconds"], fine["keep"]) == (1.0, 900)
    rows = [dict(zip(fine["fields"], row, strict=True)) for row in fine["rows"]]
    assert len(rows) == 120  # one a second since start-up, no page ever opened
    assert all(r["interval_seconds"] == 1.0 for r in rows)
    assert [r["ts"] for r in rows] == sorted(r["ts"] for r in rows)
    assert sum(r["delivered_per_s"] for r in rows) == 10
    assert all(r["connected"] == 1 and r["tracked_clients"] == 1 for r in rows)
    # no delivery in an interval: no latency (null), never a fake zero
    assert sum(1 for r in rows if r["p50_ms"] is not None) == 1
    assert len(coarse["rows"]) == 2 and coarse["rows"][0][1] == 60.0
    assert len(later["rows"]) == 4
    assert bad.status_code == 400


async def test_rings_keep_a_fixed_number_of_samples_in_fixed_memory() -> None:
    clock = ManualClock()
    hub = Hub(HubConfig(), clock=clock)
    history = SampleHistory(hub, Cadence("fine", 1.0, 10), Cadence("coarse", 5.0, 3))
    size = history.nbytes
    history.record()
    for _ in range(100):
        clock.advance(1.0)
        assert history.record()
    assert len(history.fine) == 10 and len(history.coarse) == 3
    assert history.nbytes == size == 8 * len(FIELDS) * (10 + 3)
    rows = history.to_dict("fine")["rows"]
    assert [row[0] for row in rows] == [clock.wall() - 9 + i for i in range(10)]  # newest ten
    coarse = history.to_dict("coarse")["rows"]
    assert [row[1] for row in coarse] == [5.0, 5.0, 5.0]
    await hub.shutdown(timeout=1.0)


async def test_sampler_is_owned_by_the_app_and_a_missed_tick_leaves_a_longer_interval() -> None:
    clock = ManualClock()
    hub = Hub(HubConfig(), clock=clock)
    history = SampleHistory(hub)
    app = create_app(hub, monitor_token=None, api_token=None, history=history)
    assert app.state.history is history and not history.running
    async with BackgroundServer(app):
        assert history.running  # started with the app, not with a dashboard
        await tick(clock, 3)
        clock.advance(30.0)  # the loop was stalled for 30 s: one sample covers all of it
        await tick(clock, 1)
    assert not history.running  # stopped with the app
    intervals = [row[1] for row in history.to_dict()["rows"]]
    assert intervals[:3] == [1.0, 1.0, 1.0] and intervals[3] >= 30.0
    await hub.shutdown(timeout=1.0)


async def test_history_needs_the_monitoring_token() -> None:
    hub = Hub(HubConfig(), clock=ManualClock())
    token = "monitor-secret-1"
    app = create_app(hub, monitor_token=token, api_token="api-secret-12345")
    async with (
        BackgroundServer(app) as server,
        httpx.AsyncClient(base_url=server.url, timeout=5) as http,
    ):
        assert (await http.get("/api/history")).status_code == 401
        good = await http.get("/api/history", headers={"Authorization": f"Bearer {token}"})
        assert good.status_code == 200 and good.json()["cadence"] == "fine"
    await hub.shutdown(timeout=1.0)
