"""Smoke test of the benchmarks: each `--quick` run executes and emits valid JSON (no thresholds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import BENCHMARKS, validate_result  # noqa: E402

pytestmark = pytest.mark.benchmark

RESULT_KEYS = {"name", "params", "results", "targets", "machine"}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])]
    )
    return env


@pytest.mark.parametrize("name", BENCHMARKS)
def test_quick_run_emits_valid_json(name: str, tmp_path: Path) -> None:
    out = tmp_path / f"{name}.json"
    proc = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", "--quick", "--json", str(out)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result.keys() >= RESULT_KEYS
    assert result["name"] == name
    assert result["results"], "no result rows"
    assert validate_result(result) == []
    assert result["machine"]["nproc"] >= 1
    for entry in result["targets"].values():
        assert {"measured", "unit", "target", "goal", "met_target", "met_goal"} <= entry.keys()


def test_runner_and_parser(tmp_path: Path) -> None:
    import argparse

    from tether.bench import add_bench_parser, locate_benchmarks, run_benchmarks

    assert locate_benchmarks() == ROOT
    parser = argparse.ArgumentParser(prog="tether")
    add_bench_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--quick", "--json", "x.json", "hash_performance"])
    assert args.quick and args.json == "x.json" and args.names == ["hash_performance"]
    assert callable(args.func)

    out = tmp_path / "all.json"
    report = run_benchmarks(["hash_performance"], quick=True, json_path=str(out))
    assert report["errors"] == {}
    assert set(report["benchmarks"]) == {"hash_performance"}
    assert json.loads(out.read_text())["summary"]
    with pytest.raises(ValueError, match="unknown benchmark"):
        run_benchmarks(["nope"], quick=True, json_path=None)


def test_ab_trees_compares_two_trees_operation_by_operation() -> None:
    # The same tree on both sides: every figure is measured for both and put side by side.
    options = ["--rounds", "2", "--n", "300", "--repeat", "1"]
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.ab_trees", str(ROOT), str(ROOT), *options],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("  ")][1:]
    names = [" ".join(row[:-4]) for row in rows]
    assert names == [
        "send (plain, best-effort)",
        "broadcast (100 clients)",
        "send critical + ack (tether.v1)",
        "retry tick (1,000 due)",
        "broadcast, try_send (100 clients)",
        "critical broadcast, try_send (100 v1)",
    ]
    for row in rows:
        before, after, ratio, paired = map(float, row[-4:])
        assert before > 0 and after > 0 and ratio > 0 and paired > 0
        assert abs(ratio - after / before) < 0.01  # rounded figures, same ratio


@pytest.mark.parametrize("workload", ["send critical plain", "broadcast critical v1"])
def test_metrics_callgrind_native_timing_runs_its_workload(workload: str) -> None:
    # The part of `metrics_callgrind` that runs without valgrind: the workload on the
    # slowed clock, timed at native speed (what the clock's slowdown is computed from).
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.metrics_callgrind", "--child", workload, "on", "-", "0"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert 0 < float(proc.stdout.split()[-1]) < 1  # seconds per delivery


def test_metrics_callgrind_slowed_clock_runs_slower_by_its_factor_and_never_jumps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from benchmarks import metrics_callgrind

    real = iter([100.0, 100.0, 102.0, 102.0, 102.0, 102.0, 152.0])
    monkeypatch.setattr(metrics_callgrind, "_real_now", lambda: next(real))
    clock = metrics_callgrind._SlowedClock()  # reads 100.0
    assert clock.now() == 100.0
    assert clock.now() == 102.0  # factor 1: the real clock
    clock.slow_down(50.0)  # at real 102.0: continues from there
    assert clock.now() == 102.0
    assert clock.now() == 103.0  # 50 real seconds later: one slowed second
