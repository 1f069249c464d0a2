"""DemoSimulation: simulated clients and a producer that keep every dashboard panel moving."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Literal

from .hub import Hub
from .testing.mock import MockWebSocket

log = logging.getLogger("tether.demo")

Role = Literal["healthy", "slow", "flaky"]

# Settings that make a demo eventful within seconds instead of minutes: breakers open
# after 3 failures and recover after 4 s, retries are quick, idle guests are evicted.
DEMO_CONFIG: dict[str, Any] = {
    "failure_threshold": 3,
    "success_threshold": 2,
    "recovery_timeout": 4.0,
    "retry_interval": 0.25,
    "retry_base_delay": 0.2,
    "retry_max_delay": 2.0,
    "max_retries": 4,
    "message_ttl": 45.0,
    "max_queue_size": 200,
    "send_timeout": 1.5,
    "client_ttl": 20.0,
    "cleanup_interval": 5.0,
    "dead_letter_max_size": 200,
}


@dataclass(slots=True)
class SimClient:
    client_id: str
    role: Role
    ws: MockWebSocket | None = None
    reconnect_at: float | None = None  # loop time; None while connected or gone for good
    guest: bool = False


class DemoSimulation:
    """Drives `hub` with `clients` simulated connections and about `rate` messages/s.

    Roughly 60 % of clients are healthy, 20 % slow (100-600 ms per send), 20 % flaky
    (random failures); now and then a healthy client has an outage long enough to open
    its breaker, clients drop and come back, and short-lived guests appear. Critical and
    best-effort sends and broadcasts are mixed, so queues, retries and dead letters move.
    """

    def __init__(
        self, hub: Hub, *, clients: int = 24, rate: float = 40.0, seed: int | None = None
    ) -> None:
        if clients < 1:
            raise ValueError("clients must be at least 1")
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.hub = hub
        self.rate = rate
        self.rng = random.Random(seed)
        self.clients: dict[str, SimClient] = {}
        roles: list[Role] = ["healthy", "slow", "flaky"]
        for i in range(clients):
            # the first three cover each role, so even a tiny demo shows every panel
            role = roles[i] if i < 3 else self.rng.choices(roles, weights=(6, 2, 2))[0]
            cid = f"demo-{i:03d}"
            self.clients[cid] = SimClient(cid, role)
        self._ids = itertools.count(1)
        self._guests = itertools.count(1)
        self._tasks: list[asyncio.Task[None]] = []
        self._sends: set[asyncio.Task[Any]] = set()
        self._inflight = asyncio.Semaphore(128)  # caps concurrent sends to slow clients
        self.sent = 0

    # ---- clients

    def _transport(self, client: SimClient) -> MockWebSocket:
        rng = self.rng
        if client.role == "slow":
            return MockWebSocket(latency=rng.uniform(0.1, 0.6), name=client.client_id)
        if client.role == "flaky":
            return MockWebSocket(
                latency=rng.uniform(0.001, 0.02),
                failure_rate=rng.uniform(0.15, 0.4),
                seed=rng.randrange(1 << 30),
                name=client.client_id,
            )
        return MockWebSocket(latency=rng.uniform(0.0005, 0.02), name=client.client_id)

    async def _connect(self, client: SimClient) -> None:
        client.ws = self._transport(client)
        client.reconnect_at = None
        try:
            await self.hub.connect(client.client_id, client.ws)
            if self.rng.random() < 0.5:
                self.hub.join(client.client_id, "room-a")
        except Exception as exc:  # a hub shutting down refuses; the demo just stops trying
            log.debug("demo: connect %s failed: %r", client.client_id, exc)

    async def _disconnect(self, client: SimClient, *, for_seconds: float | None) -> None:
        client.ws = None
        loop = asyncio.get_running_loop()
        client.reconnect_at = None if for_seconds is None else loop.time() + for_seconds
        with contextlib.suppress(Exception):
            await self.hub.disconnect(client.client_id, code=1001, reason="demo churn")

    # ---- loops

    async def _produce(self) -> None:
        tick = 0.1
        debt = 0.0
        while True:
            await asyncio.sleep(tick)
            debt += self.rate * tick
            ids = list(self.clients)
            while debt >= 1.0:
                debt -= 1.0
                cid = self.rng.choice(ids)
                n = next(self._ids)
                critical = self.rng.random() < 0.35
                payload = {"id": f"m{n}", "n": n, "kind": "alert" if critical else "tick"}
                self._spawn(self.hub.send(cid, payload, critical=critical))

    async def _broadcasts(self) -> None:
        for round_ in itertools.count(1):
            await asyncio.sleep(3.0)
            n = next(self._ids)
            if round_ % 3 == 0:
                coroutine = self.hub.broadcast(
                    {"id": f"b{n}", "kind": "room news"}, critical=True, group="room-a"
                )
            else:
                coroutine = self.hub.broadcast({"id": f"b{n}", "kind": "heartbeat news"})
            self._spawn(coroutine)

    async def _churn(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(1.0)
            now = loop.time()
            for client in list(self.clients.values()):
                if (
                    client.ws is None
                    and client.reconnect_at is not None
                    and now >= client.reconnect_at
                ):
                    await self._connect(client)
                elif client.ws is not None:
                    client.ws.sent.clear()  # mocks keep all they get; a demo may run for days
            connected = [c for c in self.clients.values() if c.ws is not None and not c.guest]
            if connected and self.rng.random() < 0.35:
                victim = self.rng.choice(connected)
                await self._disconnect(victim, for_seconds=self.rng.uniform(2.0, 8.0))
            healthy = [c for c in connected if c.role == "healthy" and c.ws is not None]
            if healthy and self.rng.random() < 0.12:
                # an outage long enough to open this client's breaker; it recovers by itself
                ws = self.rng.choice(healthy).ws
                if ws is not None:
                    ws.fail_next(self.hub.config.failure_threshold + 3)
            if self.rng.random() < 0.1:
                await self._guest()

    async def _guest(self) -> None:
        cid = f"guest-{next(self._guests):04d}"
        guest = SimClient(cid, "healthy", guest=True)
        self.clients[cid] = guest
        await self._connect(guest)
        stay = self.rng.uniform(3.0, 12.0)

        async def leave() -> None:
            await asyncio.sleep(stay)
            await self._disconnect(guest, for_seconds=None)
            self.clients.pop(cid, None)  # no more sends; the hub evicts it after client_ttl

        self._spawn(leave())

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        if (
            self._inflight.locked()
        ):  # too many slow sends outstanding: skip, like a real producer would shed
            coroutine.close()
            return

        async def guarded() -> None:
            async with self._inflight:
                with contextlib.suppress(Exception):
                    await coroutine
                    self.sent += 1

        task = asyncio.create_task(guarded())
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    # ---- lifecycle

    async def start(self) -> None:
        for client in list(self.clients.values()):
            await self._connect(client)
        self._tasks = [
            asyncio.create_task(self._produce(), name="demo-producer"),
            asyncio.create_task(self._broadcasts(), name="demo-broadcasts"),
            asyncio.create_task(self._churn(), name="demo-churn"),
        ]

    async def stop(self) -> None:
        tasks = [*self._tasks, *self._sends]
        self._tasks = []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
