"""The dashboard in headless Chromium against an in-process demo server: live updates, breaker
colours, charts, filtering, drill-down, phone width, token prompt and recovery after a restart."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, ConsoleMessage, Page
from playwright.async_api import TimeoutError as PlaywrightTimeoutError
from starlette.applications import Starlette

from tether import CircuitState, Hub, HubConfig, ManualClock
from tether.demo import DEMO_CONFIG, DemoSimulation
from tether.monitoring import BackgroundServer, create_app
from tether.monitoring.history import FIELDS, SampleHistory
from tether.testing import MockWebSocket

pytestmark = pytest.mark.browser

REALTIME = 0.5
PERFORMANCE = 1.0
AGGREGATE = 2.0
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "dashboard.png"
# Where the history test leaves its desktop and phone screenshots for a person to look at.
# (Not a TETHER_* name: those must all be settings, or HubConfig() refuses to start.)
SHOTS = Path(os.environ.get("DASHBOARD_SHOTS_DIR", "/tmp/tether-dashboard-shots"))


@pytest.fixture
def shots() -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    return SHOTS


@dataclass
class Console:
    errors: list[str] = field(default_factory=list)

    def attach(self, page: Page) -> None:
        page.on("console", self._on_console)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))

    def _on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(message.text)


def demo_hub(**overrides: object) -> Hub:
    # the demo's settings, but a breaker stays OPEN for a minute so the test can look at it
    return Hub(HubConfig(**{**DEMO_CONFIG, "recovery_timeout": 60.0, **overrides}))


def dashboard_app(hub: Hub, **options: Any) -> Starlette:
    return create_app(
        hub,
        realtime_interval=REALTIME,
        performance_interval=PERFORMANCE,
        aggregate_interval=AGGREGATE,
        **options,
    )


async def force_open(hub: Hub, client_id: str) -> MockWebSocket:
    ws = MockWebSocket(name=client_id)
    await hub.connect(client_id, ws)
    ws.fail_next(hub.config.failure_threshold)
    for _ in range(hub.config.failure_threshold):
        await hub.send(client_id, {"probe": True})  # best-effort: every failure counts
    assert hub.circuit_state(client_id) is CircuitState.OPEN
    return ws


async def points(page: Page, testid: str) -> int:
    value = await page.get_by_test_id(testid).get_attribute("data-points")
    return int(value or 0)


async def test_dashboard_follows_a_running_demo(browser: Browser) -> None:
    hub = demo_hub()
    await hub.start()
    simulation = DemoSimulation(hub, clients=8, rate=30, seed=7)
    async with BackgroundServer(dashboard_app(hub)) as server:
        await simulation.start()
        page = await browser.new_page(viewport={"width": 1280, "height": 800})
        console = Console()
        console.attach(page)
        try:
            await page.goto(server.url + "/dashboard")
            live = page.get_by_test_id("live-status")
            await page.wait_for_function(
                "() => document.getElementById('live-status').dataset.state === 'live'",
                timeout=10_000,
            )
            assert await live.text_content() == "live"
            await page.wait_for_function(
                "() => document.querySelectorAll('[data-testid=client-row]').length >= 8",
                timeout=10_000,
            )

            # A client forced OPEN turns red from the live feed, without a reload, within a
            # few real-time cadences (a loaded CI machine delays the browser too).
            await force_open(hub, "victim")
            shown_open = (
                "() => document.querySelector('#open-clients li[data-client-id=victim]') !== null"
                " && document.querySelector('tr[data-client-id=victim][data-state=open]') !== null"
            )
            bound = 4 * REALTIME + 1.0
            try:
                await page.wait_for_function(shown_open, timeout=bound * 1000)
            except PlaywrightTimeoutError:
                pytest.fail(f"the dashboard did not show the OPEN client within {bound:g} s")
            badge = page.locator('tr[data-client-id="victim"] [data-testid="client-state"]')
            assert await badge.get_attribute("data-state") == "open"
            assert "🔴" in (await badge.get_attribute("title") or "")
            # the table is redrawn every tick: read the dot of the current row in one go
            await page.wait_for_function(
                """() => {
                    const dot = document.querySelector('tr[data-client-id="victim"] .dot');
                    return dot && getComputedStyle(dot).backgroundColor === 'rgb(248, 81, 73)';
                }""",
                timeout=5_000,
            )
            open_count = int(await page.get_by_test_id("breaker-open-count").text_content() or 0)
            assert open_count >= 1

            # Charts gain points as performance updates arrive.
            before = await points(page, "latency-chart")
            await page.wait_for_function(
                f"() => Number(document.getElementById('latency-chart').dataset.points) >= {before + 2}",
                timeout=10_000,
            )
            assert await points(page, "throughput-chart") >= before + 2
            assert await points(page, "memory-chart") >= before + 2
            assert await page.locator("#latency-chart path.series").count() == 3

            if os.environ.get("UPDATE_DASHBOARD_PNG") == "1":
                await page.wait_for_function(
                    "() => Number(document.getElementById('latency-chart').dataset.points) >= 8",
                    timeout=20_000,
                )
                SCREENSHOT.parent.mkdir(exist_ok=True)
                await page.screenshot(path=str(SCREENSHOT))

            # The per-client table filters, then drills down into one client.
            await page.get_by_test_id("client-filter").fill("vict")
            await page.wait_for_function(
                """() => {
                    const rows = [...document.querySelectorAll('[data-testid=client-row]')];
                    return rows.length === 1 && rows[0].dataset.clientId === 'victim';
                }""",
                timeout=5_000,
            )
            await page.locator('tr[data-client-id="victim"]').click()
            detail = page.get_by_test_id("client-detail")
            await detail.wait_for(state="visible", timeout=5_000)
            await page.wait_for_function(
                "() => document.getElementById('detail-title').textContent.includes('victim')",
                timeout=5_000,
            )
            assert "OPEN" in (await page.locator("#detail-title").text_content() or "")

            await page.get_by_test_id("client-filter").fill("")
            await page.get_by_test_id("client-state-filter").select_option("open")
            await page.wait_for_function(
                """() => {
                    const rows = [...document.querySelectorAll('[data-testid=client-row]')];
                    return rows.length >= 1 && rows.every(r => r.dataset.state === 'open');
                }""",
                timeout=5_000,
            )
            assert console.errors == []
        finally:
            await page.close()
            await simulation.stop()
    await hub.shutdown(timeout=1.0)


async def test_dashboard_recovers_after_server_restart(browser: Browser) -> None:
    first = demo_hub()
    server = BackgroundServer(dashboard_app(first))
    await server.start()
    port = server.port
    page = await browser.new_page(viewport={"width": 1280, "height": 800})
    console = Console()
    console.attach(page)
    second: Hub | None = None
    restarted: BackgroundServer | None = None
    try:
        await page.goto(server.url + "/dashboard")
        await page.wait_for_function(
            "() => document.getElementById('live-status').dataset.state === 'live'", timeout=10_000
        )
        stale = page.get_by_test_id("stale-indicator")
        assert await stale.get_attribute("data-stale") == "false"
        assert console.errors == []

        await server.stop()
        await first.shutdown(timeout=1.0)
        # no update for more than two real-time cadences: the page says its data is stale
        await page.wait_for_function(
            "() => document.getElementById('stale').dataset.stale === 'true'", timeout=10_000
        )
        assert await stale.is_visible()

        second = demo_hub()
        await second.connect("after-restart", MockWebSocket())
        restarted = BackgroundServer(dashboard_app(second), port=port)
        await restarted.start()
        await page.wait_for_function(
            "() => document.getElementById('stale').dataset.stale === 'false'", timeout=15_000
        )
        await page.wait_for_function(
            "() => document.getElementById('live-status').dataset.state === 'live'", timeout=5_000
        )
        assert not await stale.is_visible()
        assert await page.get_by_test_id("session").text_content() == second.session_id[:8]
        await page.locator('tr[data-client-id="after-restart"]').wait_for(timeout=5_000)
    finally:
        await page.close()
        if restarted is not None:
            await restarted.stop()
        await server.stop()
        await first.shutdown(timeout=1.0)
        if second is not None:
            await second.shutdown(timeout=1.0)


async def test_phone_width_and_token_prompt(browser: Browser) -> None:
    token = "monitor-token-for-browser"
    hub = demo_hub()
    await hub.connect("phone-1", MockWebSocket())
    async with BackgroundServer(
        dashboard_app(hub, monitor_token=token, api_token="api-token-123")
    ) as server:
        page = await browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
        console = Console()
        console.attach(page)
        try:
            await page.goto(server.url + "/dashboard")
            form = page.get_by_test_id("token-form")
            await form.wait_for(state="visible", timeout=10_000)
            assert await page.get_by_test_id("live-status").get_attribute("data-state") == "auth"
            await page.get_by_test_id("token-input").fill(token)
            await page.get_by_test_id("token-submit").click()
            await page.wait_for_function(
                "() => document.getElementById('live-status').dataset.state === 'live'",
                timeout=10_000,
            )
            await page.locator('tr[data-client-id="phone-1"]').wait_for(timeout=5_000)
            assert await form.is_hidden()
            # the token is kept for the tab, so a reload does not ask again
            assert await page.evaluate("sessionStorage.getItem('tether.monitorToken')") == token

            overflow = await page.evaluate(
                "document.documentElement.scrollWidth - document.documentElement.clientWidth"
            )
            assert overflow <= 0, f"page scrolls sideways by {overflow}px at phone width"
            panels = await page.locator(".panel").evaluate_all(
                "els => els.map(e => e.getBoundingClientRect().width)"
            )
            assert all(width <= 390 for width in panels)
            # Only the first unauthenticated fetch/handshake may have logged an error (the 401).
            assert all("401" in e or "Unauthorized" in e for e in console.errors), console.errors

            # ?token= bootstraps a fresh tab and is removed from the address bar
            fresh = await browser.new_page(viewport={"width": 390, "height": 844})
            try:
                await fresh.goto(f"{server.url}/dashboard?token={token}")
                await fresh.wait_for_function(
                    "() => document.getElementById('live-status').dataset.state === 'live'",
                    timeout=10_000,
                )
                assert "token" not in fresh.url
            finally:
                await fresh.close()
        finally:
            await page.close()
    await hub.shutdown(timeout=1.0)


# --------------------------------------------------------------------------- history


def synthetic_history(hub: Hub, now: float) -> SampleHistory:
    """Fifteen minutes of samples with a hole in the middle: what a restarted
    dashboard must draw from the server's memory, gaps as gaps."""
    history = SampleHistory(hub)

    def row(ts: float, step: float, i: int) -> tuple[float, ...]:
        wave = (i % 60) / 60
        values = {
            "ts": ts,
            "interval_seconds": step,
            "p50_ms": 0.4 + 0.2 * wave,
            "p95_ms": 30 + 20 * wave,
            "p99_ms": 600 + 300 * wave,
            "deliveries": 40,
            "delivered_per_s": 38 + 6 * wave,
            "queued_per_s": 5 + 3 * wave,
            "failed_per_s": 1 + wave,
            "dropped_per_s": 0.5,
            "rss_bytes": 80 * 2**20 + i * 4096,
            "tracked_clients": 14,
            "connected": 11 + (i // 30) % 3,
            "breakers_open": (i // 45) % 2,
            "breakers_half_open": 0,
            "pending": 20,
            "oldest_pending_seconds": 2.0,
        }
        return tuple(float(values[name]) for name in FIELDS)

    for i in range(120):  # 8 to 6 minutes ago
        history.fine.append(row(now - 480 + i, 1.0, i))
    for i in range(240):  # the last 4 minutes; nothing between: the server was down
        history.fine.append(row(now - 240 + i, 1.0, i))
    for i in range(60):  # coarse: 3 hours, a gap, then the last 2 hours
        history.coarse.append(row(now - 6 * 3600 + i * 60, 60.0, i))
    for i in range(120):
        history.coarse.append(row(now - 2 * 3600 + i * 60, 60.0, i))
    return history


async def y_labels(page: Page, chart: str) -> list[str]:
    labels: list[str] = await page.evaluate(
        """id => [...document.querySelectorAll('#' + id + ' text[text-anchor=end]')]
                 .filter(t => t.textContent !== 'now').map(t => t.textContent)""",
        chart,
    )
    return labels


async def test_dashboard_draws_the_servers_history_with_gaps_log_latency_and_labels(
    browser: Browser, shots: Path
) -> None:
    now = time.time()
    clock = ManualClock(wall_start=now)  # the sampler waits on this clock: only our samples
    hub = Hub(HubConfig(**{**DEMO_CONFIG, "recovery_timeout": 60.0}), clock=clock)
    for i in range(12):
        await hub.connect(f"phone-{i:02d}", MockWebSocket())
    await force_open(hub, "tunnel-7")
    history = synthetic_history(hub, now)
    # performance and aggregate frames once an hour: header, panels and totals must not need them
    app = create_app(
        hub,
        history=history,
        realtime_interval=REALTIME,
        performance_interval=3600,
        aggregate_interval=3600,
    )
    async with BackgroundServer(app) as server:
        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        console = Console()
        console.attach(page)
        try:
            await page.goto(server.url + "/dashboard")
            # the past is there as soon as the page opens
            await page.wait_for_function(
                "() => document.getElementById('latency-chart').dataset.points === '360'",
                timeout=10_000,
            )
            for chart in ("latency-chart", "throughput-chart", "memory-chart", "clients-chart"):
                segments = await page.get_by_test_id(chart).get_attribute("data-segments")
                assert segments == "2", f"{chart}: the 4-minute hole must break the line"

            # log latency axis: p50 (~0.5 ms) is well clear of the floor beside p99 (~800 ms)
            assert await page.get_by_test_id("latency-chart").get_attribute("data-scale") == "log"
            labels = await y_labels(page, "latency-chart")
            assert labels == ["0.1 ms", "1 ms", "10 ms", "100 ms", "1 s"]  # decades, short labels
            lift = await page.evaluate(
                r"""() => {
                    const svg = document.getElementById('latency-chart');
                    const ys = [...svg.querySelector('path.s0').getAttribute('d')
                        .matchAll(/[ML][\d.]+,([\d.]+)/g)].map(m => Number(m[1]));
                    const grid = [...svg.querySelectorAll('line.grid-line')].map(l => Number(l.getAttribute('y1')));
                    const bottom = Math.max(...grid), top = Math.min(...grid);
                    return (bottom - Math.max(...ys)) / (bottom - top);
                }"""
            )
            assert lift > 0.1, f"p50 sits at {lift:.0%} of the axis: unreadable"

            # one frame feeds header, breaker panel, health pill and totals: they agree
            await page.wait_for_function(
                """() => document.getElementById('uptime').textContent !== '–'
                    && document.querySelector('#totals-body tr[data-metric=sent]')""",
                timeout=5_000,
            )
            agreed = await page.evaluate(
                """() => ({
                    open: document.getElementById('breaker-open').textContent,
                    health: document.getElementById('health').textContent,
                    status: document.getElementById('health').dataset.status,
                })"""
            )
            assert agreed["open"] == "1" and agreed["status"] == "degraded"
            # the totals' rates are the throughput chart's samples over the last minute
            await page.wait_for_function(
                """() => Number(document.querySelector(
                    '#totals-body tr[data-metric=delivered] td:last-child').textContent) > 38""",
                timeout=5_000,
            )
            assert "1 of 13 client circuit breakers open" in agreed["health"]

            # words for the symbols: "breaker" and "connected" columns, with a legend
            headers = await page.locator("table[data-testid=clients-table] th").all_text_contents()
            assert headers[:3] == ["client", "breaker", "connected"]
            legend = await page.get_by_test_id("clients-legend").text_content() or ""
            assert "breaker" in legend and "connected" in legend and "○ no" in legend
            cell = page.locator('tr[data-client-id="tunnel-7"] [data-testid=client-connected]')
            assert (await cell.text_content() or "").strip() == "● yes"

            await page.screenshot(path=str(shots / "desktop-15min.png"), full_page=True)
            await page.get_by_test_id("range-coarse").click()
            await page.wait_for_function(
                "() => document.getElementById('clients-chart').dataset.points === '180'",
                timeout=5_000,
            )
            assert await page.get_by_test_id("clients-chart").get_attribute("data-segments") == "2"
            await page.screenshot(path=str(shots / "desktop-24h.png"))
            assert console.errors == []
        finally:
            await page.close()

        phone = await browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
        try:
            await phone.goto(server.url + "/dashboard")
            await phone.locator('tr[data-client-id="tunnel-7"]').wait_for(timeout=10_000)
            overflow = await phone.evaluate(
                "document.documentElement.scrollWidth - document.documentElement.clientWidth"
            )
            assert overflow <= 0
            # every column of a client is on screen, labelled: a card per client
            cells = await phone.locator('tr[data-client-id="tunnel-7"] td').evaluate_all(
                """tds => tds.map(td => {
                    const r = td.getBoundingClientRect();
                    return {label: td.dataset.label, left: r.left, right: r.right,
                            shown: r.width > 0 && r.height > 0};
                })"""
            )
            assert [c["label"] for c in cells] == [
                "client", "breaker", "connected", "pending", "sent", "delivered", "failed",
                "dead", "last activity",
            ]  # fmt: skip
            assert all(c["shown"] and c["left"] >= 0 and c["right"] <= 390 for c in cells), cells
            assert await phone.locator("table[data-testid=clients-table] thead").is_hidden()
            await phone.locator("#panel-clients").screenshot(path=str(shots / "phone-clients.png"))
            await phone.screenshot(path=str(shots / "phone.png"), full_page=True)
            for name, top in (("phone-top.png", 0), ("phone-charts.png", 1100)):
                clip = {"x": 0, "y": top, "width": 390, "height": 1100}
                await phone.screenshot(path=str(shots / name), full_page=True, clip=clip)
        finally:
            await phone.close()
    await hub.shutdown(timeout=1.0)


async def test_empty_dashboard_has_sensible_axes(browser: Browser, shots: Path) -> None:
    clock = ManualClock(wall_start=time.time())
    hub = Hub(HubConfig(), clock=clock)  # no sample is ever taken: the clock never moves
    async with BackgroundServer(dashboard_app(hub)) as server:
        page = await browser.new_page(viewport={"width": 1280, "height": 800})
        try:
            await page.goto(server.url + "/dashboard")
            await page.wait_for_function(
                "() => document.getElementById('live-status').dataset.state === 'live'",
                timeout=10_000,
            )
            await page.wait_for_timeout(300)  # the first history fetch has been drawn
            latency = await page.get_by_test_id("latency-chart").text_content() or ""
            assert "no deliveries yet" in latency
            for chart in ("latency-chart", "throughput-chart", "memory-chart", "clients-chart"):
                labels = await y_labels(page, chart)
                assert len(labels) == len(set(labels)) >= 3, f"{chart}: {labels}"
            assert await y_labels(page, "memory-chart") == [
                "0 B", "256 KiB", "512 KiB", "768 KiB", "1 MiB",
            ]  # fmt: skip
            assert await y_labels(page, "clients-chart") == ["0", "1", "2", "3", "4"]
            # grid lines at quarters are labelled with their true values, not rounded ones
            assert await y_labels(page, "throughput-chart") == ["0", "0.25", "0.5", "0.75", "1"]
            await page.screenshot(path=str(shots / "desktop-empty.png"))
        finally:
            await page.close()
    await hub.shutdown(timeout=1.0)


async def test_dashboard_lists_channels_with_subscribers_and_history(browser: Browser) -> None:
    hub = demo_hub(channel_history_size=5)
    server = BackgroundServer(dashboard_app(hub))
    await server.start()
    page = await browser.new_page(viewport={"width": 1280, "height": 800})
    console = Console()
    console.attach(page)
    try:
        ws = MockWebSocket(name="reader")
        await hub.connect("reader", ws)
        assert await hub.subscribe("reader", "news")
        for n in range(8):
            await hub.publish("news", {"n": n})
        await page.goto(server.url + "/dashboard")
        row = page.locator('tr[data-channel="news"]')
        await row.wait_for(timeout=10_000)
        assert await row.get_by_test_id("channel-subscribers").text_content() == "1"
        assert await row.get_by_test_id("channel-depth").text_content() == "5"
        assert await page.get_by_test_id("channels-total").text_content() == "1"
        assert console.errors == []
    finally:
        await page.close()
        await server.stop()
        await hub.shutdown(timeout=1.0)
