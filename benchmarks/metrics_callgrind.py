"""Benchmark: metrics on vs off counted in instructions (valgrind callgrind) for the four critical
workloads of `metrics_overhead`; run `python -m benchmarks.metrics_callgrind`."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ._common import child_env

# The workloads of `metrics_overhead` whose goal is < 1 %: tether.v1 clients acking every
# 64 messages, and plain clients; 100 clients, a transport that takes frames at once.
WORKLOADS = (
    "send critical v1",
    "broadcast critical v1",
    "send critical plain",
    "broadcast critical plain",
)
# Deliveries per round: 64 per client, so each tether.v1 client acks exactly once a round
# and every round is alike (a round of 5,000 would end between acks).
MESSAGES = 6_400
ROUNDS = 4  # measured rounds, after one warm-up round
GOAL_PCT = 1.0
# Client requests (valgrind/callgrind.h): valgrind runs the interpreter's start-up, the
# imports and the warm-up uninstrumented, and counts exactly the measured rounds.
_HELPER_C = """
#include <valgrind/callgrind.h>
void tether_cg_start(void) { CALLGRIND_START_INSTRUMENTATION; CALLGRIND_ZERO_STATS; }
void tether_cg_stop(void) { CALLGRIND_STOP_INSTRUMENTATION; CALLGRIND_DUMP_STATS_AT("rounds"); }
void tether_cg_zero(void) { CALLGRIND_ZERO_STATS; }
"""


_real_now = time.monotonic


class _SlowedClock:
    """The real clock slowed down by valgrind's factor, so that the ages the hub measures
    are what they would be at native speed. Under callgrind a round runs ~50x slower:
    on the real clock a plain send written at once (~5 µs) would measure ~0.3 ms and be
    recorded as a message that waited, which at native speed it is not. Both hubs (on
    and off) read this clock alike; its arithmetic adds the same few instructions per
    reading to both. The factor is measured (a native run's time per delivery against an
    instrumented round's), so a count depends on it wherever a path depends on an age:
    the factors are printed; count more than once (`--repeat`)."""

    __slots__ = ("_base", "_real_base", "factor")

    def __init__(self) -> None:
        self._base = self._real_base = _real_now()
        self.factor = 1.0

    def now(self) -> float:
        return self._base + (_real_now() - self._real_base) / self.factor

    def slow_down(self, factor: float) -> None:
        self._base = self.now()
        self._real_base = _real_now()
        self.factor = factor

    def wall(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds * self.factor)


async def _child(workload: str, metrics_enabled: bool, helper: str, native: float) -> None:
    """One count under valgrind; `native`: seconds per delivery of this workload at
    native speed (0: measure that instead, not under valgrind, and print it)."""
    from .metrics_overhead import _hub

    lib = ctypes.CDLL(helper) if helper != "-" else None
    clock = _SlowedClock()
    # No timer may fire during the rounds: under valgrind they last minutes of wall-clock
    # time, and a retry pass each second would make the count depend on the machine's load.
    hub, run = await _hub(metrics_enabled, workload, clock=clock, retry_interval=3600.0)
    first = 0
    await run(first, MESSAGES)  # warm-up: outboxes, acks and folds in steady state
    first += MESSAGES
    gc.collect()
    if lib is None:  # the native timing: the median of the measured rounds
        per_delivery = []
        for _ in range(ROUNDS + 1):
            started = time.perf_counter()
            done = await run(first, MESSAGES)
            per_delivery.append((time.perf_counter() - started) / done)
            first += MESSAGES
        print(sorted(per_delivery)[len(per_delivery) // 2], flush=True)
        os._exit(0)
    lib.tether_cg_start()
    # One round instrumented (as the measured ones are) to find valgrind's slowdown, then
    # the hub's clock runs that much slower and the counts start again from zero.
    started = time.perf_counter()
    done = await run(first, MESSAGES)
    first += MESSAGES
    clock.slow_down((time.perf_counter() - started) / done / native)
    gc.collect()
    lib.tether_cg_zero()
    done = 0
    for _ in range(ROUNDS):
        done += await run(first, MESSAGES)
        first += MESSAGES
    hub.metrics.snapshot()  # every sample recorded in the rounds is binned, and counted
    lib.tether_cg_stop()
    print(done, f"{clock.factor:.1f}", flush=True)
    os._exit(0)  # no shutdown: nothing after the rounds is counted anyway


def _native(workload: str, enabled: bool) -> float:
    """Seconds per delivery of `workload` at native speed (median round)."""
    env = child_env()
    env["PYTHONHASHSEED"] = "0"
    cmd = [sys.executable, "-m", "benchmarks.metrics_callgrind", "--child", workload]
    cmd += ["on" if enabled else "off", "-", "0"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return float(proc.stdout.split()[-1])


def _helper(out_dir: Path) -> Path:
    """The client-request helper, compiled into `out_dir`."""
    source, lib = out_dir / "tether_cg.c", out_dir / "tether_cg.so"
    source.write_text(_HELPER_C)
    cc = os.environ.get("CC", "cc")
    subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(lib), str(source)], check=True)
    return lib


def _instructions(out_file: Path) -> int:
    text = out_file.read_text()
    found = re.search(r"^totals:\s*(\d+)", text, re.MULTILINE)
    if found is None:
        raise RuntimeError(f"no totals in {out_file}")
    return int(found.group(1))


def _count(workload: str, enabled: bool, run: int, out_dir: Path) -> tuple[int, int, Path, float]:
    """(instructions, deliveries counted by the child, callgrind output file, valgrind's
    slowdown that the hub's clock was given)."""
    native = _native(workload, enabled)
    tag = f"{workload.replace(' ', '_')}.{'on' if enabled else 'off'}.{run}"
    out_file = out_dir / f"callgrind.{tag}.out"
    env = child_env()
    env["PYTHONHASHSEED"] = "0"  # the same dict layouts in every run
    cmd = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out_file}",
        sys.executable,
        "-m",
        "benchmarks.metrics_callgrind",
        "--child",
        workload,
        "on" if enabled else "off",
        str(out_dir / "tether_cg.so"),
        repr(native),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{tag}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    deliveries, slowdown = proc.stdout.split()[-2:]
    dumped = out_dir / f"{out_file.name}.1"  # the dump at `tether_cg_stop`
    return _instructions(dumped), int(deliveries), dumped, float(slowdown)


def measure(
    workloads: Sequence[str], out_dir: Path, jobs: int, repeat: int
) -> list[tuple[str, list[float], list[float], list[float]]]:
    """(workload, instructions per delivery on, off: one per repeat, valgrind's slowdowns)
    per workload."""
    _helper(out_dir)
    plan = [(w, e, r) for r in range(repeat) for w in workloads for e in (True, False)]
    with ThreadPoolExecutor(jobs) as pool:
        counted = dict(zip(plan, pool.map(lambda p: _count(*p, out_dir), plan), strict=True))
    rows = []
    for workload in workloads:
        per = {
            enabled: [
                counted[workload, enabled, r][0] / counted[workload, enabled, r][1]
                for r in range(repeat)
            ]
            for enabled in (True, False)
        }
        slowdowns = [counted[workload, e, r][3] for r in range(repeat) for e in (True, False)]
        rows.append((workload, per[True], per[False], slowdowns))
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.metrics_callgrind", description=__doc__
    )
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument(
        "--workload", action="append", choices=WORKLOADS, help="only these (repeatable)"
    )
    parser.add_argument("--jobs", type=int, default=2, help="valgrind runs at a time (default 2)")
    parser.add_argument(
        "--repeat", type=int, default=1, help="count each figure this many times (repeatability)"
    )
    parser.add_argument("--keep", metavar="DIR", help="keep the callgrind output files here")
    args = parser.parse_args(argv)
    if args.child:
        workload, on_off, helper, native = args.child
        asyncio.run(_child(workload, on_off == "on", helper, float(native)))
        return
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed")
    out_dir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="tether-cg-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        rows = measure(args.workload or WORKLOADS, out_dir, args.jobs, args.repeat)
    finally:
        if not args.keep:
            shutil.rmtree(out_dir, ignore_errors=True)
    print(
        f"instructions per delivery over {MESSAGES * ROUNDS:,} deliveries to 100 clients "
        f"(callgrind), metrics on / off; goal < {GOAL_PCT:g} %"
    )
    print(f"{'workload':<26}{'on':>10}{'off':>10}{'overhead':>10}  runs")
    for workload, on, off, slowdowns in rows:
        pct = (on[0] / off[0] - 1) * 100
        verdict = "met" if pct < GOAL_PCT else "NOT met"
        runs = ", ".join(f"{a:,.0f}/{b:,.0f}" for a, b in zip(on, off, strict=True))
        slowed = "/".join(f"{f:.0f}x" for f in slowdowns)
        print(
            f"{workload:<26}{on[0]:>10,.0f}{off[0]:>10,.0f}{pct:>9.2f}%  {verdict}  [{runs}]"
            f"  clock slowed {slowed}"
        )


if __name__ == "__main__":
    main()
