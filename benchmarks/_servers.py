"""Server side of the socket benchmarks: raw websockets, Tether (plain / tether.v1), and peers,
each with the same interface so one harness drives them all against a receiver process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import orjson
from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import broadcast as ws_broadcast
from websockets.asyncio.server import serve as ws_serve

from tether import Hub, HubConfig

from ._common import Child, free_port_server_port

HOST = "127.0.0.1"
TEXT = "x" * 64


def payload(n: int) -> dict[str, Any]:
    """The message every library sends: a small JSON object (~90 bytes encoded)."""
    return {"n": n, "text": TEXT}


def bench_hub_config(clients: int) -> HubConfig:
    """Default resilience settings, with room for the benchmark's connections and bursts.

    `max_queue_size` is raised so that in tether.v1 a burst written faster than the acks
    come back is not evicted from the outbox (in-flight messages count toward it).
    `max_inbound_rate` is raised because one receiver acking every 64 messages at
    ~100,000 msg/s sends ~1,500 ack frames/s, which the default (100 frames/s, a flood
    guard) would answer with a 1008 close.
    """
    return HubConfig(
        max_queue_size=100_000,
        max_connections=clients + 1_000,
        max_clients=clients + 1_000,
        max_inbound_rate=1_000_000,
    )


class BenchServer:
    """One server under test plus the receiver process holding its clients."""

    name = "?"
    receiver_mode = "plain"
    receiver_options: dict[str, Any] = {}  # noqa: RUF012 - read-only; extra receiver config

    def __init__(self) -> None:
        self.port = 0
        self.child: Child | None = None
        self.clients = 0

    @property
    def url(self) -> str:
        """The receivers' URL; `{id}` is replaced by each client's id."""
        return f"ws://{HOST}:{self.port}/?client_id={{id}}"

    async def start(self) -> None:
        raise NotImplementedError

    def connected(self) -> int:
        raise NotImplementedError

    async def send_round(self, first: int, messages: int) -> None:
        """Send `messages` messages, each to every connected client."""
        raise NotImplementedError

    def stats(self) -> dict[str, Any]:
        return {}

    async def stop(self) -> None:
        raise NotImplementedError

    async def attach(self, clients: int, *, prefix: str = "r", timeout: float = 180.0) -> None:
        """Start the receiver process with `clients` connections and wait until all are in."""
        self.clients = clients
        self.child = await Child.start(
            "benchmarks._receiver",
            {
                "url": self.url,
                "clients": clients,
                "mode": self.receiver_mode,
                "prefix": prefix,
                **self.receiver_options,
            },
            label=f"receivers[{self.name}]",
        )
        await self.child.expect("ready", timeout)
        deadline = time.monotonic() + timeout
        while self.connected() < clients:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: {self.connected()}/{clients} connected")
            await asyncio.sleep(0.02)

    async def round(self, first: int, messages: int, timeout: float = 300.0) -> dict[str, Any]:
        """One measured round: send, then wait until the receivers have the last message."""
        assert self.child is not None
        self.child.send({"cmd": "arm", "expect": messages})
        await self.child.expect("armed", 30)
        cpu0 = time.process_time()
        t0 = time.monotonic()
        await self.send_round(first, messages)
        t_sent = time.monotonic()
        done = await self.child.expect("done", timeout)
        cpu = time.process_time() - cpu0
        if done.get("timeout"):
            raise RuntimeError(
                f"{self.name}: only {done['received']} of {messages * self.clients} arrived"
            )
        elapsed = float(done["t_last"]) - t0
        return {"elapsed": elapsed, "send_call": t_sent - t0, "server_cpu": cpu}

    async def close(self) -> None:
        if self.child is not None:
            await self.child.close()
            self.child = None
        await self.stop()


# ---------------------------------------------------------------------------- raw websockets


class RawServer(BenchServer):
    """Plain `websockets`: `send` awaited per connection (in a loop), or `broadcast()`."""

    def __init__(self, variant: str) -> None:
        super().__init__()
        assert variant in ("send", "broadcast")
        self.variant = variant
        self.name = f"raw websockets {variant}{'()' if variant == 'broadcast' else ''}"
        self.conns: set[ServerConnection] = set()
        self.server: Any = None

    async def _handler(self, ws: ServerConnection) -> None:
        self.conns.add(ws)
        try:
            await ws.wait_closed()
        finally:
            self.conns.discard(ws)

    async def start(self) -> None:
        self.server = await ws_serve(self._handler, HOST, 0)
        self.port = free_port_server_port(self.server)

    def connected(self) -> int:
        return len(self.conns)

    async def send_round(self, first: int, messages: int) -> None:
        conns = list(self.conns)
        if self.variant == "broadcast":
            for n in range(first, first + messages):
                ws_broadcast(conns, orjson.dumps(payload(n)).decode())
                await asyncio.sleep(0)  # as an app producing messages would
            return
        for n in range(first, first + messages):
            frame = orjson.dumps(payload(n)).decode()
            for ws in conns:
                await ws.send(frame)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


# ---------------------------------------------------------------------------- Tether


class TetherServer(BenchServer):
    """Tether through `tether.transports.websockets.serve`: plain mode or tether.v1 critical."""

    def __init__(
        self, *, critical: bool, clients_hint: int = 1000, hub_cls: type[Hub] = Hub, label: str = ""
    ) -> None:
        super().__init__()
        self.critical = critical
        self.receiver_mode = "v1" if critical else "plain"
        self.name = ("tether v1 critical+acks" if critical else "tether plain") + label
        self.hub = hub_cls(bench_hub_config(clients_hint))
        self.server: Any = None
        self.ids: list[str] = []
        self.statuses: dict[str, int] = {}

    async def start(self) -> None:
        from tether.transports.websockets import serve

        await self.hub.start()
        self.server = await serve(self.hub, HOST, 0)
        self.port = free_port_server_port(self.server)

    async def attach(self, clients: int, *, prefix: str = "r", timeout: float = 180.0) -> None:
        self.ids = [f"{prefix}{i}" for i in range(clients)]
        await super().attach(clients, prefix=prefix, timeout=timeout)

    def connected(self) -> int:
        return sum(1 for cid in self.ids if self.hub.is_connected(cid))

    def _count(self, status: str, n: int = 1) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + n

    async def send_round(self, first: int, messages: int) -> None:
        hub, critical = self.hub, self.critical
        if len(self.ids) == 1:
            cid = self.ids[0]
            for n in range(first, first + messages):
                result = await hub.send(cid, payload(n), critical=critical)
                if result.status.value != "sent":
                    self._count(result.status.value)
            return
        for n in range(first, first + messages):
            b = await hub.broadcast(payload(n), critical=critical)
            if b.sent != len(self.ids):
                self._count("not_sent", len(self.ids) - b.sent)
            await asyncio.sleep(0)

    def stats(self) -> dict[str, Any]:
        snap = self.hub.metrics.snapshot().to_dict()
        return {
            "non_sent_results": dict(self.statuses),
            "dropped": snap["messages"]["dropped"],
            "queued": snap["messages"]["queued"],
            "delivered": snap["messages"]["delivered"],
        }

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        await self.hub.shutdown(flush=False)


# ---------------------------------------------------------------------------- uvicorn-hosted


class _Uvicorn:
    """An in-process uvicorn server on an ephemeral loopback port: `websockets-sansio`, no
    pings, no deflate, or (`as_users_run_it`) uvicorn's own WebSocket defaults."""

    def __init__(self, app: Any, *, as_users_run_it: bool = False) -> None:
        import uvicorn

        ws_options: dict[str, Any] = (
            {}
            if as_users_run_it
            else {
                "ws": "websockets-sansio",
                "ws_ping_interval": None,
                "ws_per_message_deflate": False,
            }
        )
        config = uvicorn.Config(
            app,
            host=HOST,
            port=0,
            log_level="warning",
            lifespan="off",
            access_log=False,
            **ws_options,
        )
        self.server = uvicorn.Server(config)
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        self.task = asyncio.create_task(self.server.serve())
        for _ in range(500):
            if self.server.started:
                break
            await asyncio.sleep(0.01)
        servers = self.server.servers
        port: int = servers[0].sockets[0].getsockname()[1]
        return port

    async def stop(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.task, 10)


class TetherStarletteServer(TetherServer):
    """Tether's Starlette adapter under uvicorn, as users run it.

    `stack="app"`: `add_tether` on a Starlette app (what FastAPI users write) under
    `uvicorn.Server` with its WebSocket defaults (implementation, pings, deflate offered;
    the receivers do not ask for compression). `stack="serve"`: `create_app` under
    `BackgroundServer`, the `tether serve` stack with Tether's uvicorn protocol classes.
    """

    def __init__(self, *, critical: bool, clients_hint: int = 1000, stack: str = "app") -> None:
        super().__init__(critical=critical, clients_hint=clients_hint)
        if stack not in ("app", "serve"):
            raise ValueError(f"stack must be 'app' or 'serve', not {stack!r}")
        self.stack = stack
        self.name += STARLETTE_LABEL if stack == "app" else SERVE_LABEL
        self.uv: Any = None

    @property
    def url(self) -> str:
        return f"ws://{HOST}:{self.port}/ws?client_id={{id}}"

    async def start(self) -> None:
        await self.hub.start()
        if self.stack == "serve":
            from tether.monitoring import BackgroundServer, create_app

            app = create_app(self.hub, start_hub=False, host=HOST)
            self.uv = BackgroundServer(app, HOST, 0, access_log=False)
            await self.uv.start()
            self.port = self.uv.port
            return
        from starlette.applications import Starlette

        from tether.transports.starlette import add_tether

        app = Starlette()
        add_tether(app, self.hub, "/ws")
        self.uv = _Uvicorn(app, as_users_run_it=True)
        self.port = await self.uv.start()

    async def stop(self) -> None:
        if self.uv is not None:
            await self.uv.stop()
        await self.hub.shutdown(flush=False)


STARLETTE_LABEL = " (starlette add_tether/uvicorn)"
SERVE_LABEL = " (tether serve stack)"


class SocketIOServer(BenchServer):
    """python-socketio (AsyncServer on aiohttp): every client joins a room; `emit(room=...)`."""

    receiver_mode = "socketio"

    def __init__(self) -> None:
        super().__init__()
        import socketio

        self.name = "python-socketio emit(room)"
        self.sio = socketio.AsyncServer(async_mode="aiohttp", ping_interval=60, ping_timeout=60)
        self.members = 0
        self.runner: Any = None

        @self.sio.event
        async def connect(sid: str, environ: dict[str, Any]) -> None:
            await self.sio.enter_room(sid, "bench")
            self.members += 1

        @self.sio.event
        async def disconnect(sid: str, *args: Any) -> None:
            self.members -= 1

    @property
    def url(self) -> str:
        return f"ws://{HOST}:{self.port}/socket.io/?EIO=4&transport=websocket"

    async def start(self) -> None:
        from aiohttp import web

        app = web.Application()
        self.sio.attach(app)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, HOST, 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def connected(self) -> int:
        return self.members

    async def send_round(self, first: int, messages: int) -> None:
        for n in range(first, first + messages):
            await self.sio.emit("m", payload(n), room="bench")

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


class StabilizerServer(BenchServer):
    """fastapi-websocket-stabilizer: FastAPI under uvicorn, `WebSocketConnectionManager.broadcast`."""

    def __init__(self) -> None:
        super().__init__()
        from fastapi import FastAPI, WebSocket, WebSocketDisconnect
        from fastapi_websocket_stabilizer import WebSocketConfig, WebSocketConnectionManager

        self.name = "fastapi-websocket-stabilizer broadcast"
        # Its per-broadcast INFO log line would dominate; silence it like production would.
        logging.getLogger("fastapi_websocket_stabilizer").setLevel(logging.WARNING)
        self.manager = WebSocketConnectionManager(WebSocketConfig(log_level="WARNING"))
        app = FastAPI()
        manager = self.manager

        async def endpoint(websocket: WebSocket, client_id: str) -> None:
            await websocket.accept()
            await manager.connect(client_id, websocket)
            try:
                while True:
                    await websocket.receive_text()
            except WebSocketDisconnect:
                with contextlib.suppress(Exception):
                    await manager.disconnect(client_id)

        # FastAPI reads annotations at runtime; this module's are strings (PEP 563).
        endpoint.__annotations__ = {"websocket": WebSocket, "client_id": str, "return": None}
        app.websocket("/ws/{client_id}")(endpoint)
        self.uv = _Uvicorn(app)

    @property
    def url(self) -> str:
        return f"ws://{HOST}:{self.port}/ws/{{id}}"

    async def start(self) -> None:
        self.port = await self.uv.start()

    def connected(self) -> int:
        return self.manager.get_connection_count()

    async def send_round(self, first: int, messages: int) -> None:
        manager = self.manager
        if self.clients == 1:
            for n in range(first, first + messages):
                await manager.send_to_client("r0", orjson.dumps(payload(n)).decode())
            return
        for n in range(first, first + messages):
            await manager.broadcast(orjson.dumps(payload(n)).decode())

    async def stop(self) -> None:
        await self.uv.stop()


async def measure(
    servers: list[BenchServer],
    clients: int,
    messages: int,
    repeat: int,
) -> dict[str, dict[str, Any]]:
    """Attach `clients` receivers to each server, warm up, then interleave `repeat` rounds.

    Returns per server: median deliveries/s (until the last arrival), median server CPU
    µs per delivery, and the raw per-round figures.
    """
    from ._common import median

    per: dict[str, list[dict[str, Any]]] = {s.name: [] for s in servers}
    counters: dict[str, int] = {s.name: 0 for s in servers}
    for server in servers:
        await server.attach(clients)
    for server in servers:  # warm-up round (not measured)
        await server.round(counters[server.name], max(1, messages // 10))
        counters[server.name] += max(1, messages // 10)
    for rep in range(repeat):
        order = servers[rep % len(servers) :] + servers[: rep % len(servers)]
        for server in order:
            figures = await server.round(counters[server.name], messages)
            counters[server.name] += messages
            per[server.name].append(figures)
    out: dict[str, dict[str, Any]] = {}
    deliveries = messages * clients
    for server in servers:
        rounds = per[server.name]
        out[server.name] = {
            "deliveries_per_s": median(deliveries / r["elapsed"] for r in rounds),
            "server_cpu_us_per_delivery": median(
                r["server_cpu"] / deliveries * 1e6 for r in rounds
            ),
            "send_call_s": median(r["send_call"] for r in rounds),
            "rounds": [{k: round(v, 6) for k, v in r.items()} for r in rounds],
            "stats": server.stats(),
        }
    return out
