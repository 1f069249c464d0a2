"""Redis-mode figures: critical sends/s through a Redis-backed hub vs memory (same run), and Redis bytes per message.

    .venv/bin/python -m benchmarks.redis_mode [--messages 5000] [--redis redis://127.0.0.1:6379/0]

Transports are MockWebSocket (no network to the client), so the numbers isolate what
the backend costs: memory does no I/O; Redis does one atomic script per accepted
critical message (plus one trim per delivery in plain mode) over loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from typing import Any

import redis.asyncio as aioredis

from tether import Hub, HubConfig
from tether.testing import MockWebSocket


def _config(kind: str, url: str, prefix: str) -> HubConfig:
    return HubConfig(
        backend=kind,
        redis_url=url,
        redis_prefix=prefix,
        node_id="bench",
        max_queue_size=1_000_000,
        dedup_mode="off",
    )


async def _rate(kind: str, url: str, prefix: str, messages: int, scenario: str) -> float:
    hub = Hub(_config(kind, url, prefix))
    await hub.start()
    try:
        if scenario == "offline":  # stored only: one script per send
            start = time.perf_counter()
            for n in range(messages):
                await hub.send("off", n, critical=True)
            return messages / (time.perf_counter() - start)
        if scenario == "connected":  # stored, written, trimmed (plain mode)
            ws = MockWebSocket()
            ws.sent = _Discard()  # type: ignore[assignment]
            await hub.connect("on", ws)
            start = time.perf_counter()
            for n in range(messages):
                await hub.send("on", n, critical=True)
            return messages / (time.perf_counter() - start)
        # "fanout": 50 connected clients, sends to all of them concurrently
        clients = [f"c{i}" for i in range(50)]
        for cid in clients:
            mock = MockWebSocket()
            mock.sent = _Discard()  # type: ignore[assignment]
            await hub.connect(cid, mock)
        rounds = max(1, messages // len(clients))
        start = time.perf_counter()
        for n in range(rounds):
            await asyncio.gather(*(hub.send(cid, n, critical=True) for cid in clients))
        return rounds * len(clients) / (time.perf_counter() - start)
    finally:
        await hub.shutdown(timeout=1.0)


async def _sizes(url: str, prefix: str) -> dict[str, Any]:
    """Redis bytes per pending message (100-byte JSON payload) and per idle client."""
    hub = Hub(_config("redis", url, prefix))
    await hub.start()
    payload = {"text": "x" * 84}  # 100 bytes of JSON
    for _ in range(1000):
        await hub.send("size", payload, critical=True)
    r = aioredis.Redis.from_url(url)
    try:
        out = await r.memory_usage(f"{prefix}:{{size}}:out", samples=0) or 0
        seq = await r.memory_usage(f"{prefix}:{{size}}:seq") or 0
        await hub.connect("idle", MockWebSocket())
        presence = await r.memory_usage(f"{prefix}:{{idle}}:presence") or 0
        dedup_key = f"{prefix}:{{size}}:dedup:i:order-12345"
        await r.set(dedup_key, b"1", px=1000)
        dedup = await r.memory_usage(dedup_key) or 0
    finally:
        await hub.shutdown(timeout=1.0)
        keys = [k async for k in r.scan_iter(match=f"{prefix}:*")]
        if keys:
            await r.delete(*keys)
        await r.aclose()
    return {
        "stream_bytes_per_pending_message_100B_payload": round(out / 1000, 1),
        "seq_counter_bytes": seq,
        "presence_bytes": presence,
        "dedup_key_bytes": dedup,
    }


class _Discard(list[object]):
    def append(self, _item: object) -> None:
        pass


async def main(messages: int, url: str) -> dict[str, Any]:
    prefix = f"tether-bench-{uuid.uuid4().hex[:8]}"
    results: dict[str, Any] = {"messages": messages}
    try:
        for scenario in ("offline", "connected", "fanout"):
            memory = await _rate("memory", url, prefix, messages, scenario)
            redis = await _rate("redis", url, prefix, messages, scenario)
            results[scenario] = {
                "memory_per_s": round(memory),
                "redis_per_s": round(redis),
                "redis_vs_memory": round(redis / memory, 3),
            }
        results["sizes"] = await _sizes(url, prefix)
    finally:
        r = aioredis.Redis.from_url(url)
        keys = [k async for k in r.scan_iter(match=f"{prefix}:*")]
        if keys:
            await r.delete(*keys)
        await r.aclose()
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.messages, args.redis)), indent=2))
