"""Channels in the JavaScript client (/static/tether.js), in headless Chromium against uvicorn:
2,000 messages to two pages across 24 connection cuts, loss counts, refusal, presence."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from playwright.async_api import Browser, Page

from support import until
from test_js_client_browser import live_ws, open_page
from tether import Hub, HubConfig
from tether.monitoring import BackgroundServer, create_app

pytestmark = pytest.mark.browser

N = 2_000
CUTS = 24
WINDOW = 200

# Runs in the page: a TetherClient with one subscription; everything it reports goes to
# window.log in order.
START = """
async ([url, clientId, channel, presence]) => {
  const { TetherClient } = await import("/static/tether.js");
  const client = new TetherClient(url, { clientId, backoffBase: 1, backoffMax: 20 });
  window.client = client;
  window.log = [];
  window.got = [];
  await client.connect();
  const sub = client.subscribe(channel, { presence });
  window.sub = sub;
  sub.addEventListener("message", (e) => {
    window.got.push(e.detail.offset);
    window.log.push({ kind: "msg", offset: e.detail.offset, data: e.detail.data });
  });
  for (const kind of ["lost", "join", "leave", "unsubscribed"]) {
    sub.addEventListener(kind, (e) => window.log.push({ kind, ...e.detail }));
  }
  await sub.ready;
  return [client.state, sub.epoch, sub.offset];
}
"""


async def start(page: Page, server: BackgroundServer, client_id: str, **kw: Any) -> list[Any]:
    args = [server.ws_url + "/ws", client_id, kw.get("channel", "ticks"), kw.get("presence", False)]
    result: list[Any] = await page.evaluate(START, args)
    return result


async def got(page: Page) -> int:
    count: int = await page.evaluate("() => window.got.length")
    return count


@pytest.mark.slow
async def test_two_pages_get_every_message_once_in_order_across_cuts(browser: Browser) -> None:
    rng = random.Random(20261202)
    hub = Hub(HubConfig())
    async with hub, BackgroundServer(create_app(hub)) as server:
        pages = [await open_page(browser, server) for _ in range(2)]
        for index, page in enumerate(pages):
            state, _, offset = await start(page, server, f"page-{index}")
            assert (state, offset) == ("connected", 0)
        cut_points = set(rng.sample(range(50, N - 50), CUTS))
        counts = [0, 0]

        async def all_live() -> bool:
            if len(live_ws(server)) != 2:
                return False
            for page in pages:
                if not await page.evaluate(
                    "() => window.client.state === 'connected' && window.sub.active"
                ):
                    return False
            return len(hub.channels.subscribers("ticks")) == 2

        cuts = 0
        for n in range(1, N + 1):
            await hub.publish("ticks", {"n": n})
            if n % 50 == 0 or n in cut_points:
                counts = [await got(page) for page in pages]
            if n - min(counts) > WINDOW:
                async with asyncio.timeout(20):
                    while n - min(counts) > WINDOW // 2:
                        await asyncio.sleep(0.01)
                        counts = [await got(page) for page in pages]
            if n in cut_points:
                async with asyncio.timeout(10):
                    while not await all_live():  # every cut really cuts both pages' links
                        await asyncio.sleep(0.005)
                for conn in live_ws(server):
                    conn.transport.abort()  # drop TCP, no close handshake
                cuts += 1
        for page in pages:
            await page.wait_for_function(f"() => window.got.length >= {N}", timeout=30_000)
            log = await page.evaluate("() => window.log")
            assert [item["offset"] for item in log] == list(range(1, N + 1))
            assert [item["data"]["n"] for item in log] == list(range(1, N + 1))
            counters = await page.evaluate("() => window.sub.counters")
            assert counters["received"] == N and counters["lost"] == 0
            assert await page.evaluate("() => window.client.counters.reconnects") >= CUTS
            assert page.js_errors == []  # type: ignore[attr-defined]
        assert cuts == CUTS


async def test_a_page_away_longer_than_the_history_is_told_what_it_lost(browser: Browser) -> None:
    hub = Hub(HubConfig(channel_history_size=10))
    async with hub, BackgroundServer(create_app(hub)) as server:
        page = await open_page(browser, server)
        await start(page, server, "away")
        for n in range(1, 4):
            await hub.publish("ticks", n)
        await page.wait_for_function("() => window.got.length >= 3")
        await until(lambda: len(live_ws(server)) == 1)
        live_ws(server)[0].transport.abort()
        for n in range(4, 54):  # no await yields here: all 50 land before the page is back
            await hub.publish("ticks", n)
        await page.wait_for_function("() => window.got.length >= 13")
        log = await page.evaluate("() => window.log")
        assert [item["data"] for item in log if item["kind"] == "msg"] == [1, 2, 3, *range(44, 54)]
        losses = [item for item in log if item["kind"] == "lost"]
        assert losses == [
            {"kind": "lost", "channel": "ticks", "count": 40, "after": 3, "reset": False}
        ]
        assert await page.evaluate("() => window.sub.counters.lost") == 40


async def test_refused_subscription_and_presence_events(browser: Browser) -> None:
    hub = Hub(HubConfig())

    @hub.authorize_subscribe
    async def no_secrets(client_id: str, channel: str) -> bool:
        return channel != "secret"

    async with hub, BackgroundServer(create_app(hub)) as server:
        watcher = await open_page(browser, server)
        await start(watcher, server, "watcher", channel="room", presence=True)
        refused = await watcher.evaluate(
            """async () => {
                 const sub = window.client.subscribe("secret");
                 try { await sub.ready; return "subscribed"; }
                 catch (error) { return [error.code, window.client.state, sub.ended]; }
               }"""
        )
        assert refused == ["forbidden", "connected", True]
        other = await open_page(browser, server)
        await start(other, server, "other", channel="room")
        await watcher.wait_for_function("() => window.log.some((i) => i.kind === 'join')")
        assert set(await hub.presence("room")) == {"watcher", "other"}
        await other.evaluate("() => window.sub.unsubscribe()")
        await watcher.wait_for_function("() => window.log.some((i) => i.kind === 'leave')")
        events = [i for i in await watcher.evaluate("() => window.log") if i["kind"] != "msg"]
        assert events == [
            {"kind": "join", "channel": "room", "clientId": "other"},
            {"kind": "leave", "channel": "room", "clientId": "other"},
        ]
        assert await watcher.evaluate("() => window.client.counters.reconnects") == 0
        await hub.publish("room", "still works")
        await watcher.wait_for_function("() => window.got.length === 1")
        assert watcher.js_errors == []  # type: ignore[attr-defined]


START_STORED = """
async ([url, clientId, channel]) => {
  const { TetherClient } = await import("/static/tether.js");
  const client = new TetherClient(url, { clientId, storage: sessionStorage });
  window.client = client;
  window.log = [];
  await client.connect();
  const sub = client.subscribe(channel);
  sub.addEventListener("message", (e) => window.log.push(e.detail.offset));
  sub.addEventListener("lost", (e) => window.log.push("lost"));
  await sub.ready;
  return sub.offset;
}
"""


async def test_a_reloaded_page_resumes_its_channels_from_storage(browser: Browser) -> None:
    hub = Hub(HubConfig())
    async with hub, BackgroundServer(create_app(hub)) as server:
        page = await open_page(browser, server)
        args = [server.ws_url + "/ws", "reloader", "ticks"]
        assert await page.evaluate(START_STORED, args) == 0
        for n in range(1, 4):
            await hub.publish("ticks", n)
        await page.wait_for_function("() => window.log.length === 3")
        await page.reload()  # the page (and its client) start over; sessionStorage stays
        await until(lambda: not hub.channels.subscribers("ticks"))
        for n in range(4, 7):
            await hub.publish("ticks", n)
        assert await page.evaluate(START_STORED, args) == 3  # resumed after offset 3
        await page.wait_for_function("() => window.log.length === 3")
        assert await page.evaluate("() => window.log") == [4, 5, 6]
        assert page.js_errors == []  # type: ignore[attr-defined]
