"""The publish API answers oversized messages with 413 naming the message and a readable limit,
and every send or broadcast result carries a message id, refused ones included."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest_asyncio

from tether import Hub, HubConfig, SendStatus
from tether.monitoring import BackgroundServer, create_app
from tether.testing import MockWebSocket

LIMIT = 1024


@pytest_asyncio.fixture
async def http() -> AsyncIterator[tuple[Hub, httpx.AsyncClient]]:
    hub = Hub(HubConfig(max_message_size=LIMIT))
    await hub.start()
    await hub.connect("alice", MockWebSocket())
    app = create_app(hub, monitor_token=None, api_token=None)
    async with (
        BackgroundServer(app) as server,
        httpx.AsyncClient(base_url=server.url, timeout=5) as client,
    ):
        yield hub, client
    await hub.shutdown(timeout=1.0)


async def test_over_limit_payload_is_413_with_message_id_and_readable_limit(
    http: tuple[Hub, httpx.AsyncClient],
) -> None:
    _, client = http
    answer = await client.post(
        "/api/send",
        json={"client_id": "alice", "data": "x" * 1536, "message_id": "big-1", "critical": True},
    )
    assert answer.status_code == 413
    body = answer.json()
    assert body["error"] == "too_large" and body["message_id"] == "big-1"
    assert body["limit_bytes"] == LIMIT
    assert "'big-1'" in body["message"] and "over the 1 KiB limit" in body["message"]
    assert "TETHER_MAX_MESSAGE_SIZE" in body["message"]

    broadcast = await client.post(
        "/api/broadcast", json={"data": {"id": "big-2", "blob": "y" * 2000}}
    )
    assert broadcast.status_code == 413
    assert broadcast.json()["message_id"] == "big-2"


async def test_oversized_body_413_names_the_message_and_limit_in_units(
    http: tuple[Hub, httpx.AsyncClient],
) -> None:
    _, client = http
    raw = b'{"client_id": "alice", "message_id": "huge-1", "data": "' + b"z" * 10_000 + b'"}'
    answer = await client.post(
        "/api/send", content=raw, headers={"content-type": "application/json"}
    )
    assert answer.status_code == 413
    body = answer.json()
    assert body["message_id"] == "huge-1"
    assert "payloads are limited to 1 KiB (TETHER_MAX_MESSAGE_SIZE)" in body["message"]
    assert "bytes" not in body["message"]  # no raw byte counts like "over 2101248 bytes"


async def test_rejected_results_always_carry_a_message_id(
    http: tuple[Hub, httpx.AsyncClient],
) -> None:
    hub, client = http
    # refused by the hub without an explicit id: an id is still assigned
    result = await hub.send("alice", object(), critical=True)
    assert result.status is SendStatus.REJECTED and result.message_id
    bad_id = await hub.send("not a valid id!", "hi")
    assert bad_id.status is SendStatus.REJECTED and bad_id.message_id
    assert bad_id.message_id != result.message_id
    everyone = await hub.broadcast(object())
    assert everyone.rejected == 1 and everyone.message_id
    # the same over HTTP: an oversized message without any id gets one in the 413
    answer = await client.post("/api/send", json={"client_id": "alice", "data": "x" * 2000})
    assert answer.status_code == 413 and answer.json()["message_id"]
    # ... and an explicit id is kept as given
    kept = await hub.send("alice", object(), message_id="mine")
    assert kept.message_id == "mine"


async def test_a_number_beyond_64_bits_is_400_not_delivered_rounded(
    http: tuple[Hub, httpx.AsyncClient],
) -> None:
    hub, client = http
    before = hub.metrics.total("messages_sent")
    raw = b'{"client_id":"alice","critical":true,"data":{"n":18446744073709551617}}'
    answer = await client.post(
        "/api/send", content=raw, headers={"content-type": "application/json"}
    )
    assert answer.status_code == 400
    assert answer.json()["error"] == "bad_request"
    assert "out of range" in answer.json()["message"]
    assert hub.metrics.total("messages_sent") == before  # nothing went out
    fits = b'{"client_id":"alice","data":{"n":18446744073709551615}}'
    answer = await client.post(
        "/api/send", content=fits, headers={"content-type": "application/json"}
    )
    assert answer.status_code == 200
