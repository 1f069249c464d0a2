"""Shared test setup; the `tether.testing` plugin provides the clock, hub and mock_ws fixtures."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from playwright.async_api import Browser, async_playwright

from tether import Hub, HubConfig
from tether.clock import ManualClock

pytest_plugins = ["tether.testing.plugin"]  # opt-in: the clock, hub and mock_ws fixtures


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --------------------------------------------------------------------------- browser
# Debian's Chromium drives the browser tests; a missing browser fails them (never skips).

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",  # this machine's network is closed
    "--disable-component-update",
    "--disable-sync",
]


@pytest_asyncio.fixture
async def browser() -> AsyncIterator[Browser]:
    """A headless Chromium for the test."""
    async with async_playwright() as p:
        instance = await p.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield instance
        finally:
            await instance.close()


# --------------------------------------------------------------------------- Redis
# (added for issue 6: the Redis backend) Tests that need Redis use `redis_url` /
# `redis_prefix`; each test gets its own key prefix and its keys are deleted after it.

REDIS_URL = os.environ.get("TETHER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _redis_available() -> str | None:
    """None when Redis answers, else why not."""
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1, socket_timeout=1).ping()
    except Exception as exc:
        return f"Redis at {REDIS_URL} unavailable: {exc!r}"
    return None


_REDIS_PROBLEM: list[str | None] = []


def require_redis() -> None:
    """Fail (never skip) when Redis is not reachable: these machines always run it, so a
    missing Redis is a broken environment, not an optional feature."""
    if not _REDIS_PROBLEM:
        _REDIS_PROBLEM.append(_redis_available())
    problem = _REDIS_PROBLEM[0]
    if problem is not None:
        pytest.fail(problem + " (start it: see .ci/run)")


@pytest.fixture
def redis_url() -> str:
    require_redis()
    return REDIS_URL


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A fresh key prefix; every key under it is deleted after the test."""
    import redis

    prefix = f"tether-test-{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
    finally:
        client.close()


@pytest.fixture(
    params=[
        "memory",
        "sqlite",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("redis-cluster", marks=[pytest.mark.redis, pytest.mark.slow]),
        pytest.param("redis-sentinel", marks=[pytest.mark.redis, pytest.mark.slow]),
    ]
)
def backend_kind(request: pytest.FixtureRequest) -> str:
    """Run a test once per backend (the hub suite must hold on the SQLite file and on
    Redis too, on one server, a real 3-master Cluster and a Sentinel-managed master alike)."""
    return str(request.param)


def redis_topology_values(kind: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    """The HubConfig values that point a hub at the `kind` of Redis deployment."""
    if kind == "redis-cluster":
        return {"redis_url": request.getfixturevalue("redis_cluster"), "redis_cluster": True}
    if kind == "redis-sentinel":
        topology = request.getfixturevalue("shared_redis_sentinel")
        return {
            "redis_url": "redis://127.0.0.1:6379/0",
            "redis_sentinels": topology.sentinels_setting,
            "redis_sentinel_service": topology.service,
        }
    return {"redis_url": REDIS_URL}


MakeHub = Callable[..., Hub]


@pytest_asyncio.fixture
async def make_hub(
    backend_kind: str, clock: ManualClock, request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[MakeHub]:
    """`make_hub(**HubConfig fields, clock=..., rng=...)`: a Hub on the parametrised
    backend (a private Redis prefix for redis, a file of its own under tmp_path for
    sqlite), shut down after the test."""
    shared = backend_kind.startswith("redis")
    prefix = f"tether-test-{uuid.uuid4().hex[:12]}" if shared else "tether"
    if backend_kind == "redis":
        prefix = request.getfixturevalue("redis_prefix")
    hubs: list[Hub] = []

    def factory(config: HubConfig | None = None, **options: Any) -> Hub:
        hub_clock = options.pop("clock", clock)
        rng = options.pop("rng", None)
        values = dict(config.model_dump(exclude_unset=True)) if config is not None else {}
        values.update(options)
        values["backend"] = "redis" if shared else backend_kind
        if backend_kind == "sqlite":
            values.setdefault("sqlite_path", str(tmp_path / f"tether-{len(hubs)}.db"))
        if shared:
            for key, value in redis_topology_values(backend_kind, request).items():
                values.setdefault(key, value)
            values.setdefault("redis_prefix", prefix)
        hub = Hub(HubConfig(**values), clock=hub_clock, rng=rng)
        hubs.append(hub)
        return hub

    yield factory
    for hub in hubs:
        await hub.shutdown(timeout=1.0)


@pytest_asyncio.fixture
async def bhub(make_hub: MakeHub) -> AsyncIterator[Hub]:
    """Like the plugin's `hub`, on each backend."""
    instance = make_hub(HubConfig())
    await instance.start()
    await asyncio.sleep(0)
    yield instance


# --------------------------------------------------------------------------- Redis topologies
# (added for issue 10) Real Redis Cluster and Sentinel deployments on loopback ports:
# `redis_single` (a private server's URL, session), `redis_cluster` (seed URL, session),
# `fresh_redis_cluster` and `redis_sentinel` (function scope: tests may kill servers),
# `shared_redis_sentinel` (session; do not kill).
from redis_topology import (  # noqa: E402, F401 - pytest finds fixtures by name
    fresh_redis_cluster,
    redis_cluster,
    redis_sentinel,
    redis_single,
    shared_redis_sentinel,
)
