"""Pipelined EVALSHA throughput on one Redis server vs a 3-master Redis Cluster, same run, as a ratio.

    .venv/bin/python -m benchmarks.redis_topology_pipeline [--calls 10000] [--batch 500] [--repeat 5]

Starts its own servers on free loopback ports (the test fixtures' launcher): one plain
`redis-server`, and three cluster-enabled ones joined by `redis-cli --cluster create`,
all with the same flags (no persistence). Each round runs `--calls` calls of a small
script - HINCRBY + XADD + PEXPIRE on one client's hash-tagged keys, the shape of the
backend's append - through `RedisConnections.run_script_batch`, `--batch` calls per
pipeline, one pipeline after another. On the cluster each pipeline is split per master
and the three parts are sent concurrently. Figures are medians over `--repeat` rounds per
topology, the topologies taking turns round by round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from tether import HubConfig
from tether.backends.redis_connection import LuaScript, RedisConnections, ScriptCall

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from redis_topology import ClusterTopology, SingleTopology

APPEND = LuaScript(
    "local n = redis.call('HINCRBY', KEYS[1], 'n', 1)\n"
    "redis.call('XADD', KEYS[2], '*', 'd', ARGV[1])\n"
    "redis.call('PEXPIRE', KEYS[1], 60000)\n"
    "redis.call('PEXPIRE', KEYS[2], 60000)\n"
    "return n\n"
)


def _chunk(first: int, calls: int, batch: int, clients: int) -> list[ScriptCall]:
    payload = "x" * 100
    return [
        ([f"bench:{{c{i % clients}}}:h", f"bench:{{c{i % clients}}}:s"], [payload])
        for i in range(first, min(first + batch, calls))
    ]


async def _via_run_script_batch(
    connections: RedisConnections, chunk: list[ScriptCall]
) -> list[Any]:
    return await connections.run_script_batch(APPEND, chunk)


async def _via_cluster_pipeline(
    connections: RedisConnections, chunk: list[ScriptCall]
) -> list[Any]:
    """redis-py's ClusterPipeline, for comparison: it routes every command itself."""
    async with connections.commands.pipeline(transaction=False) as pipe:
        for keys, args in chunk:
            pipe.execute_command("EVALSHA", APPEND.sha, len(keys), *keys, *args)
        return list(await pipe.execute(raise_on_error=False))


Runner = Callable[[RedisConnections, list[ScriptCall]], Awaitable[list[Any]]]


async def _round(
    connections: RedisConnections, runner: Runner, calls: int, batch: int, clients: int
) -> float:
    """Calls per second of one round of pipelines sent one after another."""
    started = time.perf_counter()
    for first in range(0, calls, batch):
        results = await runner(connections, _chunk(first, calls, batch, clients))
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise RuntimeError(f"{len(failed)} calls failed, e.g. {failed[0]!r}")
    return calls / (time.perf_counter() - started)


async def _interleaved(
    variants: dict[str, tuple[HubConfig, Runner]], args: argparse.Namespace
) -> dict[str, list[float]]:
    """Rounds alternate between the variants, so drift on a shared machine hits all alike."""
    connections = {name: RedisConnections(config) for name, (config, _) in variants.items()}
    rates: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for name, each in connections.items():
            await each.load_script(APPEND)
            await _round(each, variants[name][1], args.batch, args.batch, args.clients)  # warm-up
        for _ in range(args.repeat):
            for name, each in connections.items():
                runner = variants[name][1]
                rates[name].append(await _round(each, runner, args.calls, args.batch, args.clients))
    finally:
        for each in connections.values():
            await each.aclose()
    return rates


async def main(args: argparse.Namespace) -> dict[str, Any]:
    single = SingleTopology()
    cluster = ClusterTopology()
    try:
        single.start()
        cluster.start()
        cluster_config = HubConfig(redis_url=cluster.seed_url, redis_cluster=True)
        rates = await _interleaved(
            {
                "single": (HubConfig(redis_url=single.url), _via_run_script_batch),
                "cluster": (cluster_config, _via_run_script_batch),
                "cluster_pipeline": (cluster_config, _via_cluster_pipeline),
            },
            args,
        )
    finally:
        single.close()
        cluster.close()
    medians = {name: statistics.median(values) for name, values in rates.items()}
    single_rate = medians["single"]
    return {
        "name": "redis_topology_pipeline",
        "params": {
            "calls": args.calls,
            "batch": args.batch,
            "repeat": args.repeat,
            "clients": args.clients,
        },
        "results": {
            **{f"{name}_calls_per_s": round(rate) for name, rate in medians.items()},
            "cluster_over_single": round(medians["cluster"] / single_rate, 3),
            "cluster_pipeline_over_single": round(medians["cluster_pipeline"] / single_rate, 3),
        },
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--clients", type=int, default=1000, help="distinct hash tags")
    print(json.dumps(asyncio.run(main(parser.parse_args())), indent=2))
