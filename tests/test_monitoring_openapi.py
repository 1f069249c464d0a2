"""The monitoring app's route table: the OpenAPI document generated from it, the reply models
checked against what a real server answers, and query strings validated by pydantic models."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import openapi_spec_validator
import pytest
import pytest_asyncio
from starlette.routing import Route

from tether import Hub, HubConfig
from tether.monitoring import BackgroundServer, create_app, openapi_spec
from tether.monitoring.api import ClientPage, DeadLetterPage
from tether.monitoring.health import HealthReport
from tether.monitoring.publish import BroadcastReply, SendReply
from tether.monitoring.routes import ROUTES
from tether.testing import MockWebSocket


@pytest_asyncio.fixture
async def served() -> AsyncIterator[tuple[Hub, httpx.AsyncClient]]:
    hub = Hub(HubConfig(failure_threshold=2, max_retries=0))
    await hub.start()
    app = create_app(hub, monitor_token=None, api_token=None)
    async with (
        BackgroundServer(app) as server,
        httpx.AsyncClient(base_url=server.url, timeout=5) as client,
    ):
        yield hub, client
    await hub.shutdown(timeout=1.0)


def test_document_is_the_documented_part_of_the_route_table() -> None:
    spec = openapi_spec("/deliver")
    openapi_spec_validator.validate(spec)
    documented = {
        (e.path.replace(":str}", "}"), e.method.lower()) for e in ROUTES if e.summary is not None
    }
    assert {(path, method) for path, ops in spec["paths"].items() for method in ops} == documented
    assert "`/deliver`" in spec["info"]["description"]
    clients = spec["paths"]["/api/clients"]["get"]
    assert [p["name"] for p in clients["parameters"]] == [
        "limit",
        "offset",
        "sort",
        "q",
        "state",
        "connected",
    ]
    assert set(clients["responses"]) == {"200", "400", "401", "403"}
    send = spec["paths"]["/api/send"]["post"]
    assert send["security"] == [{"apiToken": []}, {}]
    assert set(send["responses"]) == {"200", "400", "401", "403", "413", "503"}
    schemas = spec["components"]["schemas"]
    assert send["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/SendResult"
    }
    assert {"Error", "SendRequest", "BroadcastRequest", "SendResult", "Health"} <= set(schemas)


def test_every_route_in_the_table_is_served() -> None:
    app = create_app(Hub(HubConfig()), include_ws=False)
    served = {(r.path, m) for r in app.routes if isinstance(r, Route) for m in r.methods or ()}
    assert {(e.path, e.method) for e in ROUTES} <= served


async def test_reply_models_describe_what_the_server_answers(served: Any) -> None:
    hub, client = served
    await hub.connect("alice", MockWebSocket())
    sent = await client.post("/api/send", json={"client_id": "alice", "data": "hi"})
    SendReply.model_validate(sent.json())
    everyone = await client.post("/api/broadcast", json={"data": "all", "critical": True})
    BroadcastReply.model_validate(everyone.json())
    HealthReport.model_validate((await client.get("/health")).json())
    ClientPage.model_validate((await client.get("/api/clients")).json())
    DeadLetterPage.model_validate((await client.get("/api/dead-letters")).json())


@pytest.mark.parametrize(
    ("path", "params", "status", "fragment"),
    [
        ("/api/clients", {"state": "OPEN"}, 200, ""),  # any case, as before
        ("/api/clients", {"connected": "1", "colour": "blue"}, 200, ""),  # unknown: ignored
        ("/api/clients", {"connected": "yes"}, 400, "connected must be true or false"),
        ("/api/clients", {"limit": "501"}, 400, "limit"),
        ("/api/clients", {"offset": "-1"}, 400, "offset"),
        ("/api/clients", {"sort": "-colour"}, 400, "sort"),
        ("/api/dead-letters", {"limit": "0"}, 400, "limit"),
        ("/api/history", {"since": "yesterday"}, 400, "since"),
        ("/api/history", {"cadence": "hourly"}, 400, "cadence must be one of fine, coarse"),
    ],
)
async def test_query_strings_are_validated(
    served: Any, path: str, params: dict[str, str], status: int, fragment: str
) -> None:
    _, client = served
    response = await client.get(path, params=params)
    assert response.status_code == status, response.text
    if status == 400:
        assert response.json()["error"] == "bad_request"
        assert fragment in response.json()["message"]
