"""Real Redis topologies for tests: a 3-master Redis Cluster and a Sentinel-managed master, on loopback.

Every server is a real `redis-server` started on free 127.0.0.1 ports in a private temp
dir, stopped and removed after use. A missing `redis-server` / `redis-cli` fails the test
(these machines always have them), it never skips.

Fixtures (registered in conftest.py):

    redis_single         session scope: the URL of a private plain redis-server
    redis_cluster        session scope: the seed URL of a shared, healthy 3-master cluster
    fresh_redis_cluster  function scope: a `ClusterTopology` of its own, for tests that kill nodes
    redis_sentinel       function scope: a `SentinelTopology` (master, replica, 3 sentinels);
                         `kill_master()` + `await wait_for_promotion()` drive a failover
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

REDIS_SERVER = "redis-server"
REDIS_CLI = "redis-cli"
CLUSTER_BUS_OFFSET = 10_000  # Redis Cluster's node-to-node bus listens on port + 10000
START_TIMEOUT = 10.0  # generous bound on a server answering PING; it is ~50 ms here
SERVICE = "mymaster"


def require_binaries() -> None:
    """Fail (never skip) when the Redis binaries are missing."""
    missing = [name for name in (REDIS_SERVER, REDIS_CLI) if shutil.which(name) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found on PATH: install the redis-server package")


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


_handed_out: set[int] = set()


def free_port(*, with_bus: bool = False) -> int:
    """A loopback port nobody listens on (and, `with_bus`, whose cluster bus port is free too).

    Random probing in a high range rather than binding port 0: the kernel's ephemeral
    range is where outgoing connections take their ports, and port + 10000 must exist.
    """
    for _ in range(1000):
        port = random.randint(20_000, 50_000)
        if port in _handed_out or not _bindable(port):
            continue
        if with_bus and not _bindable(port + CLUSTER_BUS_OFFSET):
            continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free loopback port found")


class RedisProcess:
    """One `redis-server` child process on 127.0.0.1:`port`, logging into `workdir`."""

    def __init__(self, name: str, port: int, workdir: Path, args: list[str]) -> None:
        self.name = name
        self.port = port
        self.workdir = workdir
        self.log = workdir / f"{name}.log"
        self._args = args
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def start(self) -> RedisProcess:
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen(
                [REDIS_SERVER, *self._args],
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return self

    def wait_ready(self) -> None:
        """Block until the server answers PING; raise with its log when it does not."""
        deadline = time.monotonic() + START_TIMEOUT
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1)
        try:
            while True:
                if self._proc is not None and self._proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited at start-up:\n{self.tail()}")
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} did not answer PING:\n{self.tail()}")
                time.sleep(0.02)
        finally:
            client.close()

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: the server dies the way a crashed host does, without a goodbye."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=10)

    def stop(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=5)

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _server_args(port: int, *extra: str) -> list[str]:
    return [
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
        *extra,
    ]


class ClusterTopology:
    """Three masters, no replicas, every slot covered: a real Redis Cluster on loopback."""

    def __init__(self, size: int = 3) -> None:
        require_binaries()
        self.workdir = Path(tempfile.mkdtemp(prefix="tether-cluster-"))
        self.nodes: list[RedisProcess] = []
        for index in range(size):
            port = free_port(with_bus=True)
            args = _server_args(
                port,
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(self.workdir / f"nodes-{port}.conf"),
                "--cluster-node-timeout",
                "2000",
            )
            self.nodes.append(RedisProcess(f"cluster-{index}", port, self.workdir, args))

    @property
    def seed_url(self) -> str:
        """The URL of one node; a cluster client discovers the rest from it."""
        return self.nodes[0].url

    def start(self) -> ClusterTopology:
        try:
            for node in self.nodes:
                node.start()
            for node in self.nodes:
                node.wait_ready()
            created = subprocess.run(
                [
                    REDIS_CLI,
                    "--cluster",
                    "create",
                    *(f"127.0.0.1:{node.port}" for node in self.nodes),
                    "--cluster-replicas",
                    "0",
                    "--cluster-yes",
                ],
                capture_output=True,
                timeout=60,
                check=False,
            )
            if created.returncode != 0:
                raise RuntimeError(
                    f"redis-cli --cluster create failed:\n{created.stdout.decode()}"
                    f"\n{created.stderr.decode()}"
                )
            self.wait_healthy()
        except BaseException:
            self.close()
            raise
        return self

    def wait_healthy(self, timeout: float = 20.0) -> None:
        """Block until every live node says cluster_state:ok and knows every slot."""
        deadline = time.monotonic() + timeout
        pending = [node for node in self.nodes if node.alive]
        while pending:
            node = pending[0]
            client = redis.Redis(host="127.0.0.1", port=node.port, socket_timeout=1)
            try:
                info = client.execute_command("CLUSTER INFO")
                if info.get("cluster_state") == "ok" and int(info["cluster_slots_ok"]) == 16384:
                    pending.pop(0)
                    continue
            except redis.RedisError:
                pass
            finally:
                client.close()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{node.name} never reached cluster_state:ok")
            time.sleep(0.05)

    def node_for_slot(self, slot: int) -> RedisProcess:
        """The node that serves `slot`, as a live node of the cluster sees it."""
        asked = next(node for node in self.nodes if node.alive)
        client = redis.Redis(host="127.0.0.1", port=asked.port, socket_timeout=1)
        try:
            for start, end, primary, *_ in client.execute_command("CLUSTER SLOTS"):
                if int(start) <= slot <= int(end):
                    port = int(primary[1])
                    return next(node for node in self.nodes if node.port == port)
        finally:
            client.close()
        raise LookupError(f"slot {slot} is not served")

    def close(self) -> None:
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


class SentinelTopology:
    """A master, one replica and three sentinels watching them as `service`."""

    def __init__(self, service: str = SERVICE) -> None:
        require_binaries()
        self.service = service
        self.workdir = Path(tempfile.mkdtemp(prefix="tether-sentinel-"))
        master_port = free_port()
        self.master = RedisProcess("master", master_port, self.workdir, _server_args(master_port))
        replica_port = free_port()
        self.replica = RedisProcess(
            "replica",
            replica_port,
            self.workdir,
            _server_args(replica_port, "--replicaof", "127.0.0.1", str(master_port)),
        )
        self.sentinels: list[RedisProcess] = []
        for index in range(3):
            port = free_port()
            config = self.workdir / f"sentinel-{index}.conf"
            # Sentinel rewrites its config file as it learns, so each gets its own copy.
            config.write_text(
                "\n".join(
                    [
                        f"port {port}",
                        "bind 127.0.0.1",
                        "daemonize no",
                        f"dir {self.workdir}",
                        "sentinel resolve-hostnames no",
                        f"sentinel monitor {service} 127.0.0.1 {master_port} 2",
                        f"sentinel down-after-milliseconds {service} 1000",
                        f"sentinel failover-timeout {service} 3000",
                        "",
                    ]
                )
            )
            self.sentinels.append(
                RedisProcess(f"sentinel-{index}", port, self.workdir, [str(config), "--sentinel"])
            )
        self.original_master = self.master.address

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        return [sentinel.address for sentinel in self.sentinels]

    @property
    def sentinels_setting(self) -> str:
        """The value for TETHER_REDIS_SENTINELS."""
        return ",".join(f"{host}:{port}" for host, port in self.sentinel_addresses)

    def start(self) -> SentinelTopology:
        try:
            self.master.start()
            self.master.wait_ready()
            self.replica.start()
            for sentinel in self.sentinels:
                sentinel.start()
            self.replica.wait_ready()
            for sentinel in self.sentinels:
                sentinel.wait_ready()
            self._wait_converged()
        except BaseException:
            self.close()
            raise
        return self

    def _wait_converged(self, timeout: float = 20.0) -> None:
        """Block until the replica is in sync and every sentinel knows the replica and the
        two other sentinels: before that, a failover could not reach its quorum."""
        deadline = time.monotonic() + timeout
        replica = redis.Redis(host="127.0.0.1", port=self.replica.port, socket_timeout=1)
        try:
            while True:
                ready = replica.info("replication").get("master_link_status") == "up"
                for sentinel in self.sentinels:
                    client = redis.Redis(host="127.0.0.1", port=sentinel.port, socket_timeout=1)
                    try:
                        state = client.sentinel_master(self.service)
                    except redis.RedisError:
                        ready = False
                    else:
                        ready = (
                            ready
                            and int(state["num-slaves"]) >= 1
                            and int(state["num-other-sentinels"]) >= 2
                        )
                    finally:
                        client.close()
                if ready:
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError("the sentinels never saw the replica and each other")
                time.sleep(0.1)
        finally:
            replica.close()

    def kill_master(self) -> tuple[str, int]:
        """SIGKILL the current master; return its address."""
        address = self.master.address
        self.master.kill()
        return address

    async def wait_for_promotion(self, timeout: float = 30.0) -> tuple[str, int]:
        """Poll the sentinels until every one names a master other than the killed one and
        that master accepts writes; return its address. Bounded by `timeout`."""
        old = self.master.address
        async with asyncio.timeout(timeout):
            while True:
                answers: set[tuple[str, int]] = set()
                for host, port in self.sentinel_addresses:
                    client = aioredis.Redis(host=host, port=port, socket_timeout=1)
                    try:
                        reply = await client.sentinel_get_master_addr_by_name(self.service)
                    except (redis.RedisError, OSError):
                        reply = None
                    finally:
                        await client.aclose()
                    if reply:
                        raw_host, raw_port = reply
                        text = raw_host.decode() if isinstance(raw_host, bytes) else raw_host
                        answers.add((text, int(raw_port)))
                if len(answers) == 1 and old not in answers:
                    new = answers.pop()
                    if await self._is_writable_master(new):
                        if new == self.replica.address:
                            self.master, self.replica = self.replica, self.master
                        return new
                await asyncio.sleep(0.1)

    @staticmethod
    async def _is_writable_master(address: tuple[str, int]) -> bool:
        client = aioredis.Redis(host=address[0], port=address[1], socket_timeout=1)
        try:
            info = await client.info("replication")
        except (redis.RedisError, OSError):
            return False
        finally:
            await client.aclose()
        return bool(info.get("role") == "master")

    def close(self) -> None:
        for process in (*self.sentinels, self.replica, self.master):
            process.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


# --------------------------------------------------------------------------- fixtures


class SingleTopology:
    """One plain `redis-server` of the session's own (tests may flush its script cache)."""

    def __init__(self) -> None:
        require_binaries()
        self.workdir = Path(tempfile.mkdtemp(prefix="tether-single-"))
        port = free_port()
        self.server = RedisProcess("single", port, self.workdir, _server_args(port))

    @property
    def url(self) -> str:
        return self.server.url

    def start(self) -> SingleTopology:
        try:
            self.server.start().wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        self.server.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_single() -> Iterator[str]:
    """URL of a private single Redis server (not the shared one on 6379), same flags as
    the cluster's nodes."""
    topology = SingleTopology().start()
    try:
        yield topology.url
    finally:
        topology.close()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[str]:
    """Seed URL of a shared 3-master Redis Cluster (do not kill its nodes; use
    `fresh_redis_cluster` for that). Tests use their own hash-tagged key prefixes."""
    topology = ClusterTopology().start()
    try:
        yield topology.seed_url
    finally:
        topology.close()


@pytest.fixture
def fresh_redis_cluster() -> Iterator[ClusterTopology]:
    """A 3-master Redis Cluster of the test's own, which it may kill nodes of."""
    topology = ClusterTopology().start()
    try:
        yield topology
    finally:
        topology.close()


@pytest.fixture
def redis_sentinel() -> Iterator[SentinelTopology]:
    """A master, a replica and three sentinels (service "mymaster"), fresh per test so a
    test may kill the master."""
    topology = SentinelTopology().start()
    try:
        yield topology
    finally:
        with contextlib.suppress(Exception):
            topology.close()


@pytest.fixture(scope="session")
def shared_redis_sentinel() -> Iterator[SentinelTopology]:
    """A Sentinel deployment shared by the session's tests that never kill its servers."""
    topology = SentinelTopology().start()
    try:
        yield topology
    finally:
        topology.close()
