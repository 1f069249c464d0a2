"""The Starlette/FastAPI adapter over real loopback sockets, served by uvicorn in-process."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import fastapi
import httpx
import orjson
import pytest
import uvicorn
from starlette.applications import Starlette
from websockets.asyncio.client import connect

from support import closed_with, recv_json, until
from tether import Hub, HubConfig, SendStatus
from tether.client import Client, ClientState
from tether.monitoring import BackgroundServer
from tether.transports.starlette import websocket_endpoint, websocket_route

V1 = ["tether.v1"]
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@contextlib.asynccontextmanager
async def uvicorn_server(app: Any) -> AsyncIterator[str]:
    """Run `app` with uvicorn on an ephemeral loopback port; yields `host:port`."""
    async with BackgroundServer(
        app, log_level="warning", lifespan="off", ws_ping_interval=None
    ) as server:
        yield server.url.removeprefix("http://")


@pytest.fixture
def hub_config() -> HubConfig:
    return HubConfig(max_message_size=4096, hello_timeout=0.3)


async def test_plain_client_receives_sends_and_broadcasts(hub: Hub) -> None:
    inbound: list[tuple[str, Any]] = []

    @hub.on_message
    async def collect(client_id: str, data: Any) -> None:
        inbound.append((client_id, data))

    app = Starlette(routes=[websocket_route(hub, "/ws")])
    async with uvicorn_server(app) as host, connect(f"ws://{host}/ws?client_id=bob") as bob:
        assert bob.subprotocol is None
        await until(lambda: hub.is_connected("bob"))
        assert (await hub.send("bob", "hi")).status is SendStatus.SENT
        assert (await hub.send("bob", b"\x01")).status is SendStatus.SENT
        assert (await hub.broadcast({"all": 1}, critical=True)).sent == 1
        assert await bob.recv() == "hi"
        assert await bob.recv() == b"\x01"
        assert orjson.loads(await bob.recv()) == {"all": 1}
        await bob.send("up")
        await until(lambda: inbound == [("bob", "up")])
    await until(lambda: not hub.is_connected("bob"))


async def test_v1_client_resumes_across_server_side_closes(hub: Hub) -> None:
    app = Starlette(routes=[websocket_route(hub, "/ws")])
    async with uvicorn_server(app) as host:
        async with Client(
            f"ws://{host}/ws", client_id="carol", backoff_base=0.005, backoff_max=0.02
        ) as client:
            received: list[int | None] = []

            async def consume() -> None:
                async for msg in client:
                    received.append(msg.seq)
                    if len(received) == 300:
                        return

            consumer = asyncio.create_task(consume())
            for n in range(1, 301):
                await hub.send("carol", n, critical=True)
                if n % 50 == 25:
                    await until(lambda: hub.is_connected("carol"))
                    await hub.disconnect("carol", code=1012, reason="restart")
            await asyncio.wait_for(consumer, 10)
            assert received == list(range(1, 301))
            assert client.reconnects >= 6
            assert client.state is ClientState.CONNECTED
        await until(lambda: hub.pending("carol") == 0)


@pytest.mark.parametrize(
    ("frame", "code", "close_code"),
    [
        ("{oops", "invalid_json", 1002),
        ('{"type":"ack","seq":1}', "invalid_ack", 1002),
        ('{"type":"hello","client_id":"x"}', "unexpected_frame", 1002),
        (b"\x00", "binary_not_supported", 1003),
        ('{"type":"publish","data":"' + "x" * 5000 + '"}', "too_big", 1009),
    ],
    ids=["bad json", "ack beyond sent", "hello twice", "binary", "oversize"],
)
async def test_bad_frames_get_error_and_close_code(
    hub: Hub, frame: str | bytes, code: str, close_code: int
) -> None:
    app = Starlette(routes=[websocket_route(hub, "/ws")])
    async with uvicorn_server(app) as host, Client(f"ws://{host}/ws", client_id="other") as other:
        async with connect(f"ws://{host}/ws", subprotocols=V1) as bad:
            assert bad.subprotocol == "tether.v1"
            await bad.send('{"type":"hello","client_id":"bad","last_seq":0}')
            assert (await recv_json(bad))["type"] == "welcome"
            await bad.send(frame)
            error = await recv_json(bad)
            assert (error["type"], error["code"]) == ("error", code)
            assert await closed_with(bad) == close_code
        await until(lambda: not hub.is_connected("bad"))
        await hub.send("other", "still fine", critical=True)
        msg = await asyncio.wait_for(anext(aiter(other)), 5)
        assert (msg.seq, msg.data) == (1, "still fine")


async def test_hello_timeout(hub: Hub) -> None:
    app = Starlette(routes=[websocket_route(hub, "/ws")])
    async with uvicorn_server(app) as host, connect(f"ws://{host}/ws", subprotocols=V1) as ws:
        error = await recv_json(ws, timeout=3)
        assert error["code"] == "hello_timeout"
        assert await closed_with(ws) == 1008


async def test_endpoint_mounts_in_fastapi(hub: Hub) -> None:
    app = fastapi.FastAPI()
    app.add_api_websocket_route("/live", websocket_endpoint(hub))
    async with uvicorn_server(app) as host, Client(f"ws://{host}/live", client_id="dan") as client:
        await hub.send("dan", {"via": "fastapi"}, critical=True)
        msg = await asyncio.wait_for(anext(aiter(client)), 5)
        assert msg.data == {"via": "fastapi"}


async def test_fastapi_example_runs_as_written() -> None:
    spec = importlib.util.spec_from_file_location(
        "fastapi_app_example", EXAMPLES / "fastapi_app.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        hub: Hub = module.hub
        config = uvicorn.Config(
            module.app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"
        )
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())
        try:
            await until(lambda: server.started or task.done())
            port = server.servers[0].sockets[0].getsockname()[1]
            async with Client(f"ws://127.0.0.1:{port}/ws", client_id="eve") as client:
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
                    response = await http.post("/send/eve", json={"text": "hello"})
                assert response.status_code == 200
                assert response.json()["status"] == "sent"
                msg = await asyncio.wait_for(anext(aiter(client)), 5)
                assert msg.data == {"text": "hello"} and msg.seq == 1
            assert hub.running
        finally:
            server.should_exit = True
            await asyncio.wait_for(task, 10)
        assert not hub.running  # the app's lifespan shut the hub down
    finally:
        sys.modules.pop(spec.name, None)
