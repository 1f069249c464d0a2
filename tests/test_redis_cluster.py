"""Several `tether serve` processes on one Redis: cross-node delivery, SIGKILL failover, CLIENT KILL, restart."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from tether.client import Client

pytestmark = [pytest.mark.redis, pytest.mark.slow]  # several server processes


class Node:
    """One `tether serve` process (TETHER_BACKEND=redis) on an ephemeral port."""

    def __init__(
        self,
        node_id: str,
        prefix: str,
        redis_url: str,
        logs: Path,
        topology: dict[str, str] | None = None,
    ) -> None:
        self.node_id = node_id
        self.prefix = prefix
        self.redis_url = redis_url
        self.logs = logs
        self.topology = topology or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self) -> Node:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
        env.update(
            TETHER_BACKEND="redis",
            TETHER_REDIS_URL=self.redis_url,
            TETHER_REDIS_PREFIX=self.prefix,
            TETHER_NODE_ID=self.node_id,
            TETHER_HOST="127.0.0.1",
            TETHER_PORT="0",
            TETHER_PRESENCE_TTL="3",
            TETHER_RETRY_INTERVAL="0.2",
            TETHER_RETRY_BASE_DELAY="0.1",
            TETHER_RETRY_MAX_DELAY="1",
            TETHER_MAX_QUEUE_SIZE="5000",
        )
        env.update(self.topology)
        out = self.logs / f"{self.node_id}-{time.monotonic_ns()}.out"
        self.out = out
        with out.open("wb") as sink:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tether", "serve", "--log-level", "warning"],
                stdout=sink,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            text = out.read_text(errors="replace")
            for line in text.splitlines():
                if "listening on" in line:
                    self.port = int(line.split("listening on ", 1)[1].split()[0].rsplit(":", 1)[1])
                    return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"node {self.node_id} exited:\n{text}")
            time.sleep(0.05)
        raise RuntimeError(f"node {self.node_id} did not start:\n{out.read_text()}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=15)

    def output(self) -> str:
        return self.out.read_text(errors="replace")


def topology_env(kind: str, request: pytest.FixtureRequest) -> tuple[str, dict[str, str]]:
    """The Redis URL and TETHER_* settings of a `tether serve` node on `kind` of Redis."""
    if kind == "cluster":
        return request.getfixturevalue("redis_cluster"), {"TETHER_REDIS_CLUSTER": "true"}
    if kind == "sentinel":
        topology = request.getfixturevalue("shared_redis_sentinel")
        return "redis://127.0.0.1:6379/0", {
            "TETHER_REDIS_SENTINELS": topology.sentinels_setting,
            "TETHER_REDIS_SENTINEL_SERVICE": topology.service,
        }
    return request.getfixturevalue("redis_url"), {}


@pytest.fixture(params=["single", "cluster", "sentinel"])
def cluster(
    request: pytest.FixtureRequest, redis_prefix: str, tmp_path: Path
) -> Iterator[dict[str, Any]]:
    """`spawn("a")`: a `tether serve` node on one Redis server, a real 3-master Redis
    Cluster, or a Sentinel-managed master (the same tests hold on each)."""
    url, extra = topology_env(request.param, request)
    nodes: list[Node] = []

    def spawn(node_id: str) -> Node:
        node = Node(node_id, redis_prefix, url, tmp_path, extra).start()
        nodes.append(node)
        return node

    yield {"spawn": spawn, "topology": request.param}
    for node in nodes:
        node.kill(signal.SIGKILL)


@pytest_asyncio.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


@pytest_asyncio.fixture
async def r(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


class Collector:
    """Iterates a tether.Client in the background and keeps what the application got."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.messages: list[Any] = []
        self.seqs: list[int | None] = []
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Collector:
        await self.client.connect()
        self.task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        async for msg in self.client:
            self.messages.append(msg.data)
            self.seqs.append(msg.seq)

    async def __aexit__(self, *exc: object) -> None:
        await self.client.close()
        if self.task is not None:
            self.task.cancel()
            with pytest.raises((asyncio.CancelledError, Exception)):
                await self.task

    async def wait_for(self, count: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"got {len(self.messages)} of {count} messages")
            await asyncio.sleep(0.02)


def fast_client(url: str | list[str], client_id: str, last_seq: int = 0) -> Client:
    return Client(
        url,
        client_id=client_id,
        last_seq=last_seq,
        backoff_base=0.05,
        backoff_max=0.3,
        open_timeout=3,
    )


async def send(
    http: httpx.AsyncClient, node: Node, client_id: str, n: int, **extra: Any
) -> dict[str, Any]:
    """Send one critical message; a REJECTED (backend hiccup) is resent with the same id,
    which dedup makes safe."""
    body = {"client_id": client_id, "data": {"n": n}, "critical": True, "message_id": f"m{n}"}
    body.update(extra)
    for _ in range(100):
        response = await http.post(node.http + "/api/send", json=body)
        result: dict[str, Any] = response.json()
        if result["status"] in ("queued", "sent", "duplicate"):
            return result
        # certainly not stored, or maybe stored: the same message id is safe either way
        assert result["status"] in ("rejected", "unknown"), result
        await asyncio.sleep(0.05)
    raise AssertionError(f"message {n} never accepted: {result}")


async def kill_connections(r: aioredis.Redis, prefix: str, node_id: str, *, kind: str) -> int:
    """CLIENT KILL one node's connections of one type (by id: other tests share Redis)."""
    name = f"tether:{prefix}:{node_id}".encode()
    killed = 0
    for line in (await r.execute_command("CLIENT", "LIST", "TYPE", kind)).splitlines():
        fields = dict(part.split(b"=", 1) for part in line.split(b" ") if b"=" in part)
        if fields.get(b"name") == name:
            killed += int(await r.execute_command("CLIENT", "KILL", "ID", fields[b"id"].decode()))
    return killed


# ---------------------------------------------------------------------------- tests


async def test_client_on_b_gets_critical_and_broadcast_sent_through_a(
    cluster: dict[str, Any], http: httpx.AsyncClient
) -> None:
    a, b = cluster["spawn"]("a"), cluster["spawn"]("b")
    async with Collector(fast_client(b.ws, "bea")) as got:
        for n in range(100):
            result = await send(http, a, "bea", n)
            assert result["status"] == "queued" and result["reason"] == "delivered by node b"
        # A best-effort message is not ordered after critical ones another node has not
        # handed over yet (they are in Redis, b loads them on its doorbell): wait for them.
        await got.wait_for(100)
        best = await http.post(
            a.http + "/api/broadcast", json={"data": "to all", "critical": False}
        )
        assert best.status_code == 200
        await got.wait_for(101)
        crit = await http.post(
            a.http + "/api/broadcast", json={"data": "critical all", "critical": True}
        )
        assert crit.json()["queued"] >= 1
        await got.wait_for(102)
    assert got.messages[:100] == [{"n": n} for n in range(100)]
    assert got.seqs[:100] == list(range(1, 101))
    assert got.messages[100:] == ["to all", "critical all"]
    assert got.seqs[101] == 101


async def test_failover_after_sigkill_delivers_exactly_once_in_order(
    cluster: dict[str, Any], http: httpx.AsyncClient
) -> None:
    a, b = cluster["spawn"]("a"), cluster["spawn"]("b")
    total = 2000
    client = fast_client([b.ws, a.ws], "fay")  # fails over to A when B is gone
    async with Collector(client) as got:
        killed_at = None
        for n in range(total):
            await send(http, a, "fay", n)
            if n == 700:
                await got.wait_for(300)  # mid-stream: B is delivering
                b.kill(signal.SIGKILL)
                killed_at = len(got.messages)
        await got.wait_for(total, timeout=30)
        await asyncio.sleep(0.3)  # anything extra (a duplicate) would show up now
    assert killed_at is not None and killed_at < total
    assert got.messages == [{"n": n} for n in range(total)]
    assert got.seqs == list(range(1, total + 1))
    assert client.reconnects >= 1 and client.lost == 0


@pytest.mark.parametrize("cluster", ["single"], indirect=True)  # CLIENT KILL on that server
async def test_client_kill_mid_stream_recovers_and_shows_in_health(
    cluster: dict[str, Any], http: httpx.AsyncClient, r: aioredis.Redis, redis_prefix: str
) -> None:
    a, b = cluster["spawn"]("a"), cluster["spawn"]("b")
    total = 1000
    async with Collector(fast_client(b.ws, "kai")) as got:
        for n in range(total):
            if n in (200, 600):
                assert await kill_connections(r, redis_prefix, "b", kind="pubsub") >= 1
            if n in (400, 800):
                await kill_connections(r, redis_prefix, "a", kind="normal")
                await kill_connections(r, redis_prefix, "b", kind="normal")
            await send(http, a, "kai", n)
        await got.wait_for(total, timeout=30)
        await asyncio.sleep(0.2)
    assert got.messages == [{"n": n} for n in range(total)]
    metrics = (await http.get(b.http + "/api/metrics")).json()
    assert metrics["backend"]["errors"] >= 2  # both listener failures were counted
    health = (await http.get(b.http + "/health")).json()
    assert health["status"] in ("degraded", "failing")
    assert health["checks"]["backend_errors"] >= 2


async def test_restarted_node_delivers_what_was_pending(
    cluster: dict[str, Any], http: httpx.AsyncClient
) -> None:
    a = cluster["spawn"]("a")
    client = fast_client(a.ws, "rex")
    async with Collector(client) as got:
        for n in range(10):
            await send(http, a, "rex", n)
        await got.wait_for(10)
    for n in range(10, 60):  # rex is offline: these wait in Redis
        assert (await send(http, a, "rex", n))["status"] == "queued"
    a.kill(signal.SIGTERM)  # graceful: nothing to flush for an offline client
    assert "0 dropped" in a.output()
    again = cluster["spawn"]("a")  # the same node, restarted
    client2 = fast_client(again.ws, "rex", last_seq=client.last_seq)  # persisted by the app
    async with Collector(client2) as got2:
        await got2.wait_for(50)
        await asyncio.sleep(0.2)
    assert got2.messages == [{"n": n} for n in range(10, 60)]
    assert got2.seqs == list(range(11, 61))
