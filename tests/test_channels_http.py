"""Channels over HTTP on a real uvicorn server: publish, list, history, presence, metrics, tokens."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openapi_spec_validator
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from tether import Hub, HubConfig
from tether.client import Client
from tether.monitoring import BackgroundServer, create_app

API = "api-secret-12345"
MONITOR = "monitor-secret-1"


@pytest_asyncio.fixture
async def served() -> AsyncIterator[tuple[Hub, httpx.AsyncClient, str]]:
    hub = Hub(HubConfig(channel_history_size=3))
    app = create_app(hub, monitor_token=MONITOR, api_token=API)
    async with (
        hub,
        BackgroundServer(app) as server,
        httpx.AsyncClient(base_url=server.url, timeout=5) as http,
    ):
        yield hub, http, server.url.replace("http://", "ws://") + "/ws"


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_publish_history_presence_and_channels(served: Any) -> None:
    _, http, ws_url = served
    async with Client(ws_url, client_id="alice") as alice:
        sub = await alice.subscribe("news")
        for n in range(1, 5):
            response = await http.post(
                "/api/publish", json={"channel": "news", "data": {"n": n}}, headers=auth(API)
            )
            assert response.status_code == 200
            body = response.json()
            assert (body["status"], body["offset"], body["delivered"]) == ("published", n, 1)
        got = [await asyncio.wait_for(anext(sub), 5) for _ in range(4)]
        assert [p.data for p in got] == [{"n": n} for n in range(1, 5)]
        again = await http.post(
            "/api/publish", json={"channel": "news", "data": 1, "id": "x"}, headers=auth(API)
        )
        duplicate = await http.post(
            "/api/publish", json={"channel": "news", "data": 1, "id": "x"}, headers=auth(API)
        )
        assert duplicate.json()["status"] == "duplicate"
        assert duplicate.json()["offset"] == again.json()["offset"] == 5

        history = await http.get("/api/channels/news/history", headers=auth(MONITOR))
        assert [m["offset"] for m in history.json()["messages"]] == [3, 4, 5]
        page = await http.get("/api/channels/news/history?since=3&limit=1", headers=auth(MONITOR))
        assert [(m["offset"], m["data"]) for m in page.json()["messages"]] == [(4, {"n": 4})]
        presence = await http.get("/api/channels/news/presence", headers=auth(MONITOR))
        assert list(presence.json()["presence"]) == ["alice"]
        listing = (await http.get("/api/channels", headers=auth(MONITOR))).json()["channels"]
        assert listing == [
            {
                "name": "news",
                "epoch": sub.epoch,
                "offset": 5,
                "depth": 3,
                "subscribers": 1,
            }
        ]
        metrics = (await http.get("/api/metrics", headers=auth(MONITOR))).json()["channels"]
        assert metrics["publishes"] == 5 and metrics["duplicates"] == 1
        assert metrics["subscribers"] == 1 and metrics["count"] == 1
        assert metrics["deliveries"] == 5
        text = (await http.get("/metrics", headers=auth(MONITOR))).text
        samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
        assert samples["tether_channels_publishes_total"] == 5
        assert samples["tether_channels_subscribers"] == 1


async def test_channel_routes_refuse_bad_input_and_missing_tokens(served: Any) -> None:
    _, http, _ = served
    body = {"channel": "news", "data": 1}
    assert (await http.post("/api/publish", json=body)).status_code == 401
    assert (await http.get("/api/channels")).status_code == 401
    bad = await http.post("/api/publish", json={"channel": "a b", "data": 1}, headers=auth(API))
    assert bad.status_code == 400 and "channel" in bad.json()["message"]
    missing = await http.post("/api/publish", json={"channel": "x"}, headers=auth(API))
    assert missing.status_code == 400
    name = await http.get("/api/channels/a%20b/history", headers=auth(MONITOR))
    assert name.status_code == 400
    limit = await http.get("/api/channels/news/history?limit=0", headers=auth(MONITOR))
    assert limit.status_code == 400
    spec = (await http.get("/openapi.json", headers=auth(MONITOR))).json()
    openapi_spec_validator.validate(spec)
    assert {"/api/publish", "/api/channels", "/api/channels/{name}/history"} <= set(spec["paths"])
