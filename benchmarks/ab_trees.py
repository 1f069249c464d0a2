"""A/B: the hub-only hot-path costs of two source trees, measured alternately in one run.

    python -m benchmarks.ab_trees BEFORE_DIR AFTER_DIR [--rounds N] [--n N] [--repeat N]

Each tree is a checkout (or `git archive` of a commit) with `src/` and `benchmarks/`. Every
round runs `benchmarks.profile_hot_paths`'s operations (plain send, broadcast to 100
clients, critical send + ack, retry tick) once per tree in a fresh interpreter, the trees
in alternating order, so load on a shared machine falls on both alike, and counts CPU
time (`process_time`), which other processes disturb less than wall-clock time; within a
round each operation runs `--repeat` times and the least counts (interference only adds).
Prints the median over rounds of each tree, their ratio, and the median of each round's own
after/before ratio ("paired", the steadier figure); below 1.00 is faster.
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

_PROBE = """
import asyncio, gc, json, logging, sys, time
from benchmarks.profile_hot_paths import _ops
from tether import Hub
logging.getLogger("tether").setLevel(logging.ERROR)

async def cpu_us_per_delivery(factory):
    op, _, hub = await factory()
    gc.collect()
    start = time.process_time()
    done = await op()
    elapsed = time.process_time() - start
    await hub.shutdown(flush=False)
    return elapsed / max(1, done) * 1e6

n, repeat = int(sys.argv[1]), int(sys.argv[2])
print(json.dumps({
    name: min(asyncio.run(cpu_us_per_delivery(f)) for _ in range(repeat))
    for name, f in _ops(Hub, n).items()
}))
"""


def _probe(tree: Path, n: int, repeat: int) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), str(tree / "src")]))
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(n), str(repeat)],
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
    args = parser.parse_args(argv)
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for round_ in range(args.rounds):
        order = ["before", "after"] if round_ % 2 == 0 else ["after", "before"]
        for label in order:
            runs[label].append(_probe(trees[label], args.n, args.repeat))
    print(
        f"CPU µs per delivery: least of {args.repeat} runs per round, "
        f"median of {args.rounds} alternating rounds"
    )
    print(f"  {'operation':34s} {'before':>8} {'after':>8} {'after/before':>13} {'paired':>8}")
    for name in runs["before"][0]:
        before = median([r[name] for r in runs["before"]])
        after = median([r[name] for r in runs["after"]])
        # each round's own ratio: load that drifts between rounds cancels out
        pairs = zip(runs["after"], runs["before"], strict=True)
        paired = median([a[name] / b[name] for a, b in pairs])
        print(f"  {name:34s} {before:8.2f} {after:8.2f} {after / before:13.3f} {paired:8.3f}")


if __name__ == "__main__":
    main()
