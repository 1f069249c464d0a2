"""The monitoring app over a real uvicorn server on loopback: routes, tokens, publishing, formats."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import openapi_spec_validator
import pytest
import pytest_asyncio
import websockets
from prometheus_client.parser import text_string_to_metric_families

from tether import CircuitState, ConfigError, Hub, HubConfig
from tether.monitoring import BackgroundServer, HealthThresholds, create_app
from tether.testing import MockWebSocket

MONITOR = "monitor-secret-1"
API = "api-secret-12345"


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


@pytest_asyncio.fixture
async def hub() -> AsyncIterator[Hub]:
    instance = Hub(HubConfig(failure_threshold=2, recovery_timeout=60, max_retries=0))
    await instance.start()
    yield instance
    await instance.shutdown(timeout=1.0)


@pytest_asyncio.fixture
async def served(hub: Hub) -> AsyncIterator[tuple[Hub, httpx.AsyncClient, BackgroundServer]]:
    app = create_app(hub, monitor_token=None, api_token=None, realtime_interval=0.2)
    async with (
        BackgroundServer(app) as server,
        httpx.AsyncClient(base_url=server.url, timeout=5) as client,
    ):
        yield hub, client, server


async def test_health_ok_and_json_routes(served: Any) -> None:
    hub, client, _ = served
    ws = MockWebSocket()
    await hub.connect("alice", ws)
    await hub.send("alice", {"id": "m1"}, critical=True)

    health = await client.get("/health")
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    assert health.json()["reasons"] == []

    metrics = (await client.get("/api/metrics")).json()
    assert metrics["connections"]["active"] == 1
    assert metrics["messages"]["delivered"] == 1
    assert set(metrics) >= {
        "connections",
        "messages",
        "queue",
        "retry",
        "circuit_breaker",
        "latency",
    }

    info = await client.get("/api/clients/alice")
    assert info.status_code == 200
    body = info.json()
    assert body["state"] == "closed" and body["connected"] is True
    assert body["outbox"]["pending"] == 0 and body["messages_delivered"] == 1

    missing = await client.get("/api/clients/nobody")
    assert missing.status_code == 404
    assert "nobody" in missing.json()["message"]


async def test_clients_pagination_sort_and_filters(served: Any) -> None:
    hub, client, _ = served
    for i in range(7):
        await hub.connect(f"c-{i}", MockWebSocket())
    await hub.disconnect("c-3")
    for _ in range(4):  # queue for the offline client: it sorts first by pending
        await hub.send("c-3", "x", critical=True)
    bad = MockWebSocket()
    await hub.connect("bad-1", bad)
    bad.fail_next(5)
    for _ in range(2):
        await hub.send("bad-1", "x")  # best-effort: each failure is charged to the breaker
    assert hub.circuit_state("bad-1") is CircuitState.OPEN

    page = (await client.get("/api/clients", params={"limit": 3, "offset": 0})).json()
    assert page["total"] == 8 and len(page["items"]) == 3 and page["next_offset"] == 3
    assert [r["client_id"] for r in page["items"]] == ["bad-1", "c-0", "c-1"]
    last = (await client.get("/api/clients", params={"limit": 3, "offset": 6})).json()
    assert [r["client_id"] for r in last["items"]] == ["c-5", "c-6"] and last["next_offset"] is None

    by_pending = (await client.get("/api/clients", params={"sort": "-pending", "limit": 1})).json()
    assert by_pending["items"][0]["client_id"] == "c-3" and by_pending["items"][0]["pending"] == 4
    by_state = (await client.get("/api/clients", params={"sort": "-state", "limit": 1})).json()
    assert by_state["items"][0]["client_id"] == "bad-1"
    assert by_state["items"][0]["state"] == "open"

    only_open = (await client.get("/api/clients", params={"state": "open"})).json()
    assert [r["client_id"] for r in only_open["items"]] == ["bad-1"]
    offline = (await client.get("/api/clients", params={"connected": "false"})).json()
    assert [r["client_id"] for r in offline["items"]] == ["c-3"]
    search = (await client.get("/api/clients", params={"q": "C-4"})).json()
    assert [r["client_id"] for r in search["items"]] == ["c-4"]

    recent = (
        await client.get("/api/clients", params={"sort": "-last_activity", "limit": 1})
    ).json()
    assert recent["items"][0]["client_id"] == "bad-1"

    for params in ({"limit": "0"}, {"limit": "x"}, {"sort": "colour"}, {"state": "blue"}):
        response = await client.get("/api/clients", params=params)
        assert response.status_code == 400, params
        assert response.json()["message"]


async def test_dead_letters_route(served: Any) -> None:
    hub, client, _ = served
    ws = MockWebSocket()
    await hub.connect("dl", ws)
    ws.fail_next(1)
    result = await hub.send("dl", {"id": "doomed"}, critical=True)  # max_retries=0: dead at once
    assert result.status.value == "queued"
    body = (await client.get("/api/dead-letters")).json()
    assert body["total"] == 1
    assert body["items"][0]["message_id"] == "doomed" and body["items"][0]["client_id"] == "dl"
    only = (await client.get("/api/dead-letters", params={"client_id": "other"})).json()
    assert only["total"] == 0


async def test_prometheus_text_parses(served: Any) -> None:
    hub, client, _ = served
    await hub.connect("p", MockWebSocket())
    await hub.send("p", "hello", critical=True)
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    assert "tether_messages_delivered" in families
    assert families["tether_messages_delivered"].samples[0].value == 1
    assert "tether_circuit_breaker_open" in families
    # aggregate only: no per-client labels anywhere
    assert all("client" not in s.labels for f in families.values() for s in f.samples)


async def test_openapi_validates(served: Any) -> None:
    _, client, _ = served
    spec = (await client.get("/openapi.json")).json()
    openapi_spec_validator.validate(spec)
    assert spec["openapi"].startswith("3.1")
    for path in (
        "/health",
        "/api/metrics",
        "/api/clients",
        "/api/clients/{client_id}",
        "/api/send",
        "/api/broadcast",
    ):
        assert path in spec["paths"], path


async def test_publish_send_and_broadcast_reach_clients(served: Any) -> None:
    hub, client, _ = served
    alice, bob = MockWebSocket(), MockWebSocket()
    await hub.connect("alice", alice)
    await hub.connect("bob", bob)
    hub.join("bob", "room")

    sent = await client.post(
        "/api/send",
        json={
            "client_id": "alice",
            "data": {"text": "hi"},
            "critical": True,
            "message_id": "k1",
            "ttl": 30,
        },
    )
    assert sent.status_code == 200
    assert sent.json() == {
        "status": "sent",
        "client_id": "alice",
        "message_id": "k1",
        "reason": None,
        "seq": 1,
    }
    assert alice.payloads == [{"text": "hi"}]
    again = await client.post(
        "/api/send", json={"client_id": "alice", "data": "x", "message_id": "k1"}
    )
    assert again.json()["status"] == "duplicate"

    everyone = await client.post("/api/broadcast", json={"data": "all"})
    assert everyone.status_code == 200
    assert everyone.json()["sent"] == 2 and everyone.json()["total"] == 2
    room = await client.post(
        "/api/broadcast", json={"data": "room only", "group": "room", "critical": True}
    )
    assert room.json()["sent"] == 1
    assert bob.payloads[-2:] == ["all", "room only"]
    assert alice.payloads[-1] == "all"


@pytest.mark.parametrize(
    ("path", "body", "fragment"),
    [
        ("/api/send", {"data": "x"}, "client_id"),
        ("/api/send", {"client_id": "a b", "data": "x"}, "client_id"),
        ("/api/send", {"client_id": "a", "data": "x", "critical": "yes"}, "critical"),
        ("/api/send", {"client_id": "a", "data": "x", "ttl": -1}, "ttl"),
        ("/api/send", {"client_id": "a", "data": "x", "colour": 1}, "colour"),
        ("/api/send", {"client_id": "a"}, "data"),
        ("/api/broadcast", {"data": "x", "group": ""}, "group"),
        ("/api/broadcast", [1, 2], "BroadcastRequest"),
    ],
)
async def test_publish_bad_input_is_400(served: Any, path: str, body: Any, fragment: str) -> None:
    _, client, _ = served
    response = await client.post(path, json=body)
    assert response.status_code == 400
    assert response.json()["error"] == "bad_request"
    assert fragment in response.json()["message"] or fragment == "BroadcastRequest"


async def test_paging_numbers_past_the_wire_range_are_400(served: Any) -> None:
    _, client, _ = served
    for path in (
        "/api/clients?offset=99999999999999999999999",
        "/api/channels/news/history?since=99999999999999999999999",
    ):
        response = await client.get(path)
        assert response.status_code == 400, (path, response.text)


async def test_publish_rejects_non_json(served: Any) -> None:
    _, client, _ = served
    response = await client.post(
        "/api/send", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert "JSON" in response.json()["message"]


async def test_health_failing_is_503(hub: Hub) -> None:
    app = create_app(
        hub, health=HealthThresholds(oldest_pending_degraded=0.01, oldest_pending_failing=0.05)
    )
    async with BackgroundServer(app) as server, httpx.AsyncClient(base_url=server.url) as client:
        await hub.send("offline", "waiting", critical=True)  # never connected: it stays pending
        await asyncio.sleep(0.06)  # the threshold is an age: it has to pass
        response = await client.get("/health")
        assert response.status_code == 503
        body = response.json()
        assert body["status"] == "failing"
        assert any("oldest pending" in r for r in body["reasons"])


async def test_health_degraded_then_failing_on_open_breakers(hub: Hub) -> None:
    app = create_app(hub, health=HealthThresholds(open_ratio_failing=0.5))
    async with BackgroundServer(app) as server, httpx.AsyncClient(base_url=server.url) as client:
        mocks = {f"h{i}": MockWebSocket() for i in range(4)}
        for cid, ws in mocks.items():
            await hub.connect(cid, ws)
        mocks["h0"].fail_next(2)
        await hub.send("h0", "x")
        await hub.send("h0", "x")
        degraded = await client.get("/health")
        assert degraded.status_code == 200 and degraded.json()["status"] == "degraded"
        assert "1 of 4 client circuit breakers open" in degraded.json()["reasons"]
        mocks["h1"].fail_next(2)
        await hub.send("h1", "x")
        await hub.send("h1", "x")
        failing = await client.get("/health")
        assert failing.status_code == 503 and failing.json()["status"] == "failing"


async def test_monitor_token_enforced(hub: Hub) -> None:
    app = create_app(hub, monitor_token=MONITOR, api_token=API)
    async with BackgroundServer(app) as server, httpx.AsyncClient(base_url=server.url) as client:
        good = {"Authorization": f"Bearer {MONITOR}"}
        wrong = {"Authorization": "Bearer not-the-token"}
        for path in (
            "/health",
            "/metrics",
            "/api/metrics",
            "/api/clients",
            "/api/dead-letters",
            "/openapi.json",
        ):
            assert (await client.get(path)).status_code == 401, path
            assert (await client.get(path, headers=wrong)).status_code == 401, path
            assert (await client.get(path, headers=good)).status_code == 200, path
        denied = await client.get("/api/metrics")
        assert denied.json()["error"] == "unauthorized"
        assert denied.headers["www-authenticate"].startswith("Bearer")
        # the page itself carries no data: it loads, then asks for the token
        assert (await client.get("/dashboard")).status_code == 200

        live = server.ws_url + "/ws/live"
        with pytest.raises(websockets.InvalidStatus):
            async with websockets.connect(live):
                pass
        async with websockets.connect(f"{live}?token={MONITOR}") as ws:
            hello = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert hello["type"] == "hello"


async def test_api_token_enforced(hub: Hub) -> None:
    app = create_app(hub, monitor_token=MONITOR, api_token=API)
    target = MockWebSocket()
    await hub.connect("t", target)
    async with BackgroundServer(app) as server, httpx.AsyncClient(base_url=server.url) as client:
        body = {"client_id": "t", "data": "hello"}
        assert (await client.post("/api/send", json=body)).status_code == 401
        # the monitoring token is not a publishing token
        monitor = {"Authorization": f"Bearer {MONITOR}"}
        assert (await client.post("/api/send", json=body, headers=monitor)).status_code == 401
        assert (await client.post("/api/broadcast", json={"data": "x"})).status_code == 401
        good = {"Authorization": f"Bearer {API}"}
        response = await client.post("/api/send", json=body, headers=good)
        assert response.status_code == 200 and response.json()["status"] == "sent"
        assert target.sent == ["hello"]


async def test_public_bind_requires_api_token(hub: Hub) -> None:
    with pytest.raises(ConfigError, match="TETHER_API_TOKEN"):
        create_app(hub, host="0.0.0.0", api_token=None)
    create_app(hub, host="0.0.0.0", api_token=API)  # with a token it is allowed


async def test_public_bind_without_monitor_token_refuses_remote_callers(hub: Hub) -> None:
    # Bound "publicly" but reached over loopback: allowed. A proxy header makes uvicorn
    # report a remote client address, which must be refused.
    app = create_app(hub, host="0.0.0.0", api_token=API, monitor_token=None)
    proxied = BackgroundServer(app, proxy_headers=True, forwarded_allow_ips="127.0.0.1")
    async with proxied as server, httpx.AsyncClient(base_url=server.url) as client:
        assert (await client.get("/api/metrics")).status_code == 200
        remote = await client.get("/api/metrics", headers={"X-Forwarded-For": "203.0.113.9"})
        assert remote.status_code == 403
        assert "TETHER_MONITOR_TOKEN" in remote.json()["message"]


async def test_live_feed_pushes_three_kinds(hub: Hub) -> None:
    app = create_app(hub, realtime_interval=0.1, performance_interval=0.3, aggregate_interval=0.6)
    async with BackgroundServer(app) as server:
        ws_client = MockWebSocket()
        await hub.connect("live-1", ws_client)
        async with websockets.connect(server.ws_url + "/ws/live") as ws:
            seen: dict[str, list[dict[str, Any]]] = {}
            async with asyncio.timeout(5):
                while (
                    len(seen.get("performance", [])) < 2
                    or "aggregate" not in seen
                    or len(seen.get("realtime", [])) < 3
                ):
                    message = json.loads(await ws.recv())
                    seen.setdefault(message["type"], []).append(message)
                    if message["type"] == "realtime":
                        await hub.send("live-1", "tick")
        assert seen["hello"][0]["cadence"]["realtime"] == 0.1
        realtime = seen["realtime"][-1]
        assert realtime["connections"]["active"] == 1
        assert realtime["circuit_breaker"]["closed"] == 1
        perf = seen["performance"][-1]
        assert perf["interval_seconds"] > 0
        assert perf["throughput"]["delivered"] > 0
        assert {"p50_ms", "p95_ms", "p99_ms"} <= set(perf["latency"])
        assert seen["aggregate"][0]["totals"]["messages"]["delivered"] >= 0


async def test_static_dir_served_without_token(hub: Hub) -> None:
    app = create_app(hub, monitor_token=MONITOR, api_token=API)
    async with BackgroundServer(app) as server, httpx.AsyncClient(base_url=server.url) as client:
        response = await client.get("/static/tether.js")
        # the JS client is someone else's file; whether or not it exists yet, no token is asked
        assert response.status_code in (200, 404)
        assert response.status_code != 401


async def test_real_websocket_client_gets_published_message(served: Any) -> None:
    hub, client, server = served
    async with websockets.connect(server.ws_url + "/ws?client_id=web-1") as ws:
        await wait_for(lambda: hub.is_connected("web-1"))
        response = await client.post(
            "/api/send", json={"client_id": "web-1", "data": {"n": 1}, "critical": True}
        )
        assert response.json()["status"] == "sent"
        assert json.loads(await asyncio.wait_for(ws.recv(), 5)) == {"n": 1}


async def test_dashboard_page_and_assets(served: Any) -> None:
    _, client, _ = served
    page = await client.get("/dashboard")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert 'data-testid="breaker-open-count"' in page.text
    for asset in ("/dashboard/dashboard.js", "/dashboard/dashboard.css"):
        assert (await client.get(asset)).status_code == 200
    assert (await client.get("/dashboard/secrets.txt")).status_code == 404
    root = await client.get("/")
    assert root.status_code == 307 and root.headers["location"].endswith("/dashboard")


async def test_mounted_under_a_prefix_in_fastapi(hub: Hub) -> None:
    from fastapi import FastAPI

    outer = FastAPI()
    outer.mount("/tether", create_app(hub))
    async with BackgroundServer(outer) as server, httpx.AsyncClient(base_url=server.url) as client:
        assert (await client.get("/tether/api/metrics")).status_code == 200
        page = await client.get("/tether/dashboard")
        assert page.status_code == 200
        # relative asset URLs resolve under the prefix
        assert 'href="dashboard/dashboard.css"' in page.text
        assert (await client.get("/tether/dashboard/dashboard.js")).status_code == 200
        async with websockets.connect(server.ws_url + "/tether/ws/live") as ws:
            assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "hello"
