"""A/B: two source trees measured alternately in one run — hub-only CPU cost, or end to end.

    python -m benchmarks.ab_trees BEFORE_DIR AFTER_DIR [--rounds N] [--n N] [--repeat N]
    python -m benchmarks.ab_trees BEFORE_DIR AFTER_DIR --e2e CLIENTS MESSAGES [--rounds N]

Each tree is a checkout (or `git archive` of a commit) with `src/` and `benchmarks/`. Every
round runs one probe per tree in a fresh interpreter, the trees in alternating order, so
load on a shared machine falls on both alike.

The default probe runs `benchmarks.profile_hot_paths`'s operations (plain send, broadcast
to 100 clients, critical send + ack, retry tick — over transports that must be awaited)
and broadcasts to 100 clients whose transport takes every frame at once (`try_send`, the
path real sockets take), and counts CPU time (`process_time`),
which other processes disturb less than wall-clock time; each operation runs `--repeat`
times and the least counts (interference only adds). With `--e2e`, the probe is one
`e2e_throughput` fan-out (3 repetitions) and reports Tether's same-run ratios to raw
`websockets` `send`: deliveries/s and server CPU per delivery.

Prints each tree's median over rounds, their ratio, and the median of each round's own
after/before ratio ("paired", the steadier figure when load drifts).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from ._common import median

_HUB_PROBE = """
import asyncio, gc, json, logging, sys, time
from benchmarks.profile_hot_paths import _ops
from tether import Hub, HubConfig, protocol
logging.getLogger("tether").setLevel(logging.ERROR)

async def cpu_us_per_delivery(factory):
    op, _, hub = await factory()
    gc.collect()
    start = time.process_time()
    done = await op()
    elapsed = time.process_time() - start
    await hub.shutdown(flush=False)
    return elapsed / max(1, done) * 1e6

class SyncTransport:  # a socket that always takes the frame at once (`try_send`)
    async def send(self, data): pass
    def try_send(self, data): return True
    async def close(self, code=1000, reason=""): pass

def sync_ops(n):
    async def hub_of(v1):
        hub = Hub(HubConfig(max_queue_size=100_000))
        for i in range(100):
            hello = protocol.Hello(f"s{i}", 0) if v1 else None
            await hub.connect(f"s{i}", SyncTransport(), hello=hello)
        return hub

    async def broadcast(critical):
        hub = await hub_of(critical)
        async def op():
            for _ in range(n // 100):
                await hub.broadcast({"text": "x" * 64}, critical=critical)
            return n // 100 * 100
        return op, n, hub

    return {
        "broadcast, try_send (100 clients)": lambda: broadcast(False),
        "critical broadcast, try_send (100 v1)": lambda: broadcast(True),
    }

n, repeat = int(sys.argv[1]), int(sys.argv[2])
ops = {**_ops(Hub, n), **sync_ops(n)}
print(json.dumps({
    name: min(asyncio.run(cpu_us_per_delivery(f)) for _ in range(repeat))
    for name, f in ops.items()
}))
"""

_E2E_PROBE = """
import asyncio, json, sys
from benchmarks._common import raise_fd_limit
from benchmarks.e2e_throughput import _fanout
raise_fd_limit()
clients, messages = int(sys.argv[1]), int(sys.argv[2])
f = asyncio.run(_fanout(clients, messages, 3))
raw = f["raw websockets send"]
out = {}
for name in ("tether plain", "tether v1 critical+acks"):
    out[name + ": x raw send"] = f[name]["deliveries_per_s"] / raw["deliveries_per_s"]
    out[name + ": server CPU x raw"] = (
        f[name]["server_cpu_us_per_delivery"] / raw["server_cpu_us_per_delivery"]
    )
print(json.dumps(out))
"""


def _probe(tree: Path, code: str, args: list[str]) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), str(tree / "src")]))
    out = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    figures: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return figures


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ab_trees")
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--n", type=int, default=20_000, help="deliveries per operation")
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per operation in a round (the least counts)"
    )
    parser.add_argument(
        "--e2e", type=int, nargs=2, metavar=("CLIENTS", "MESSAGES"), help="end-to-end probe"
    )
    args = parser.parse_args(argv)
    if args.e2e:
        code, probe_args = _E2E_PROBE, [str(args.e2e[0]), str(args.e2e[1])]
        title = f"e2e {args.e2e[0]} client(s) x {args.e2e[1]} msgs, same-run ratios to raw send"
    else:
        code, probe_args = _HUB_PROBE, [str(args.n), str(args.repeat)]
        title = f"CPU µs per delivery, least of {args.repeat} runs per round"
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for round_ in range(args.rounds):
        order = ["before", "after"] if round_ % 2 == 0 else ["after", "before"]
        for label in order:
            runs[label].append(_probe(trees[label], code, probe_args))
    print(f"{title}; median of {args.rounds} alternating rounds")
    print(f"  {'figure':42s} {'before':>8} {'after':>8} {'after/before':>13} {'paired':>8}")
    for name in runs["before"][0]:
        before = median([r[name] for r in runs["before"]])
        after = median([r[name] for r in runs["after"]])
        # each round's own ratio: load that drifts between rounds cancels out
        pairs = zip(runs["after"], runs["before"], strict=True)
        paired = median([a[name] / b[name] for a, b in pairs])
        print(f"  {name:42s} {before:8.3f} {after:8.3f} {after / before:13.3f} {paired:8.3f}")


if __name__ == "__main__":
    main()
