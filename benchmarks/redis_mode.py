"""Redis-mode figures: critical broadcast and concurrent critical sends through a Redis-backed hub vs memory, same run.

    .venv/bin/python -m benchmarks.redis_mode [--rounds 5] [--redis redis://127.0.0.1:6379/0]
                                              [--cluster redis://127.0.0.1:PORT/0]

Transports are MockWebSocket in plain mode (no network to the client), so the figures
isolate what the backend costs: memory does no I/O; Redis stores every copy (one batched
script call per event-loop turn, per cluster slot group) and trims it once written.
Memory and Redis alternate round by round; each figure is the median of the rounds.
`<kind>_cpu_us` is this process's CPU time per delivery or send (the Redis server's is
not included): steadier than the rates on a shared machine.

- broadcast: one critical broadcast to 1,000 connected plain-mode clients, repeated;
  deliveries/s (a delivery is a write: each copy is stored, written, then trimmed).
- broadcast_v1: the same to tether.v1 clients, which ack every 8 broadcasts (each copy is
  stored until acknowledged).
- producers: 100 concurrent producers, each sending critical messages to its own
  connected plain-mode client one after another; sends/s. (A plain-mode client with
  nothing queued is written to at once: written is delivered, nothing to store.)
- producers_v1: the same to tether.v1 clients acking every 64 messages (each message is
  stored until acknowledged).
- offline: the same producers to offline clients (stored only); sends/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from typing import Any

import redis.asyncio as aioredis

from tether import Hub, HubConfig
from tether.protocol import Hello

from ._hubkit import SocketLikeTransport

CLIENTS = 1000
PRODUCERS = 100
ACK_EVERY = 8  # broadcasts between a client's acks (tether.Client: 64 messages or 50 ms)


def _config(kind: str, url: str, prefix: str, cluster: bool) -> HubConfig:
    values: dict[str, Any] = {
        "backend": kind,
        "redis_url": url,
        "redis_prefix": prefix,
        "node_id": "bench",
        "max_queue_size": 1_000_000,
    }
    if cluster:
        values["redis_cluster"] = True
    return HubConfig(**values)


async def _connect(hub: Hub, ids: list[str], *, v1: bool = False) -> None:
    for cid in ids:
        await hub.connect(cid, SocketLikeTransport(), hello=Hello(cid, 0) if v1 else None)


async def _broadcast(hub: Hub, messages: int, *, v1: bool) -> dict[str, float]:
    ids = [f"b{i}" for i in range(CLIENTS)]
    await _connect(hub, ids, v1=v1)
    rejected = 0
    start, cpu = time.perf_counter(), time.process_time()
    for n in range(messages):
        result = await hub.broadcast({"n": n, "text": "x" * 64}, critical=True)
        rejected += result.rejected + result.unknown
        if v1 and n % ACK_EVERY == ACK_EVERY - 1:
            # Clients ack in batches (as tether.Client does), each from its own connection.
            await asyncio.gather(*(hub.ack(cid, hub.highest_sent(cid)) for cid in ids))
    elapsed = time.perf_counter() - start
    ops = messages * CLIENTS
    cpu_us = (time.process_time() - cpu) / ops * 1e6
    return {"per_s": ops / elapsed, "rejected": rejected, "cpu_us": cpu_us}


async def _producers(hub: Hub, messages: int, connected: bool, v1: bool) -> dict[str, float]:
    ids = [f"p{i}" for i in range(PRODUCERS)]
    if connected:
        await _connect(hub, ids, v1=v1)
    else:
        await hub.start()
    per_producer = max(1, messages // PRODUCERS)
    rejected = 0

    async def produce(cid: str) -> None:
        nonlocal rejected
        for n in range(per_producer):
            result = await hub.send(cid, {"n": n, "text": "x" * 64}, critical=True)
            rejected += not result.accepted
            if v1 and n % 64 == 63:  # the client acks every 64 messages
                await hub.ack(cid, hub.highest_sent(cid))

    start, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(produce(cid) for cid in ids))
    elapsed = time.perf_counter() - start
    ops = per_producer * PRODUCERS
    cpu_us = (time.process_time() - cpu) / ops * 1e6
    return {"per_s": ops / elapsed, "rejected": rejected, "cpu_us": cpu_us}


async def _one(kind: str, url: str, scenario: str, size: int, cluster: bool) -> dict[str, float]:
    prefix = f"tether-bench-{uuid.uuid4().hex[:8]}"
    hub = Hub(_config(kind, url, prefix, cluster))
    try:
        if scenario.startswith("broadcast"):
            return await _broadcast(hub, size, v1=scenario == "broadcast_v1")
        connected = scenario.startswith("producers")
        return await _producers(hub, size, connected, v1=scenario == "producers_v1")
    finally:
        await hub.shutdown(timeout=1.0)
        if kind == "redis":
            await _clean(url, prefix, cluster)


async def _clean(url: str, prefix: str, cluster: bool) -> None:
    if cluster:
        from redis.asyncio.cluster import RedisCluster

        rc = RedisCluster.from_url(url)
        try:
            for node in rc.get_primaries():
                client = rc.get_redis_connection(node)
                keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
                for k in keys:
                    await rc.delete(k)
        finally:
            await rc.aclose()
        return
    r = aioredis.Redis.from_url(url)
    try:
        keys = [k async for k in r.scan_iter(match=f"{prefix}:*", count=1000)]
        for start in range(0, len(keys), 500):
            await r.delete(*keys[start : start + 500])
    finally:
        await r.aclose()


SIZES = {
    "broadcast": 20,
    "broadcast_v1": 24,
    "producers": 5000,
    "producers_v1": 5000,
    "offline": 5000,
}


async def main(rounds: int, url: str, cluster_url: str | None) -> dict[str, Any]:
    results: dict[str, Any] = {"clients": CLIENTS, "producer_tasks": PRODUCERS, "rounds": rounds}
    for scenario, size in SIZES.items():
        runs: dict[str, list[dict[str, float]]] = {"memory": [], "redis": []}
        if cluster_url:
            runs["cluster"] = []
        for _ in range(rounds):  # alternate, so drift on a noisy machine hits all alike
            runs["memory"].append(await _one("memory", url, scenario, size, False))
            runs["redis"].append(await _one("redis", url, scenario, size, False))
            if cluster_url:
                runs["cluster"].append(await _one("redis", cluster_url, scenario, size, True))
        medians = {k: statistics.median(r["per_s"] for r in v) for k, v in runs.items()}
        entry: dict[str, Any] = {f"{k}_per_s": round(v) for k, v in medians.items()}
        for k, v in runs.items():  # this process's CPU per op (the Redis server's not included)
            entry[f"{k}_cpu_us"] = round(statistics.median(r["cpu_us"] for r in v), 1)
        entry["redis_vs_memory"] = round(medians["redis"] / medians["memory"], 3)
        entry["redis_rejected"] = sum(r["rejected"] for r in runs["redis"])
        if cluster_url:
            entry["cluster_vs_redis"] = round(medians["cluster"] / medians["redis"], 3)
            entry["cluster_rejected"] = sum(r["rejected"] for r in runs["cluster"])
        results[scenario] = entry
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--cluster", default=None, help="seed node URL of a Redis Cluster")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.rounds, args.redis, args.cluster)), indent=2))
