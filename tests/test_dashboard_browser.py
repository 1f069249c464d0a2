"""The dashboard in headless Chromium against an in-process demo server: live updates, breaker
colours, charts, filtering, drill-down, phone width, token prompt and recovery after a restart."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, ConsoleMessage, Page
from playwright.async_api import TimeoutError as PlaywrightTimeoutError
from starlette.applications import Starlette

from tether import CircuitState, Hub, HubConfig
from tether.demo import DEMO_CONFIG, DemoSimulation
from tether.monitoring import BackgroundServer, create_app
from tether.testing import MockWebSocket

pytestmark = pytest.mark.browser

REALTIME = 0.5
PERFORMANCE = 1.0
AGGREGATE = 2.0
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "dashboard.png"


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
            dot = badge.locator(".dot")
            assert (
                await dot.evaluate("e => getComputedStyle(e).backgroundColor") == "rgb(248, 81, 73)"
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
            assert await page.locator("#latency-chart polyline").count() == 3

            if os.environ.get("TETHER_SCREENSHOT") == "1":
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
