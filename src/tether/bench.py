"""`tether bench`: runs the benchmarks of a source checkout with progress bars and a results table.

    tether bench [--quick] [--json PATH] [NAME ...]

The benchmarks live in the repository's `benchmarks/` package (beside `src/`), not in the
installed wheel; run this from a checkout installed with `pip install -e '.[bench]'`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = [
    "BenchmarksNotFoundError",
    "add_bench_parser",
    "cmd_bench",
    "locate_benchmarks",
    "run_benchmarks",
]


class BenchmarksNotFoundError(RuntimeError):
    """`tether bench` was run without a source checkout holding `benchmarks/`."""


def _candidates() -> list[Path]:
    here = Path(__file__).resolve()
    # src/tether/bench.py -> the checkout root is two levels above the package.
    return [here.parents[2], Path.cwd()]


def locate_benchmarks() -> Path:
    """The checkout root whose `benchmarks/` package is used; made importable."""
    for root in _candidates():
        if (root / "benchmarks" / "__init__.py").is_file() and (
            root / "benchmarks" / "_common.py"
        ).is_file():
            if str(root) not in sys.path:
                sys.path.insert(0, str(root))
            return root
    looked = ", ".join(str(p / "benchmarks") for p in _candidates())
    raise BenchmarksNotFoundError(
        "tether bench needs a source checkout: no benchmarks/ package was found "
        f"(looked in {looked}). Clone the repository, `pip install -e '.[bench]'` in it, "
        "and run `tether bench` from there."
    )


def _package() -> ModuleType:
    locate_benchmarks()
    return importlib.import_module("benchmarks")


def available_benchmarks() -> tuple[str, ...]:
    names: tuple[str, ...] = _package().BENCHMARKS
    return names


def run_benchmarks(
    names: list[str] | None, *, quick: bool, json_path: str | None
) -> dict[str, Any]:
    """Run the named benchmarks (all when None or empty), print their tables, return
    `{"quick", "machine", "benchmarks": {name: result}, "summary": [...]}` and write it as
    JSON to `json_path` if given. A benchmark that fails is reported and the rest still run."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    known = available_benchmarks()
    selected = list(names) if names else list(known)
    unknown = [n for n in selected if n not in known]
    if unknown:
        raise ValueError(
            f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(known)}"
        )
    common = importlib.import_module("benchmarks._common")
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    results: dict[str, Any] = {}
    errors: dict[str, str] = {}
    durations: dict[str, float] = {}
    with Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        title = "tether bench" + (" --quick" if quick else "")
        overall = progress.add_task(title, total=len(selected))
        for name in selected:
            current = progress.add_task(name, total=1)
            started = time.perf_counter()
            try:
                module = importlib.import_module(f"benchmarks.{name}")
                result = module.run(quick)
                problems = common.validate_result(result)
                if problems:
                    raise RuntimeError("; ".join(problems))
                results[name] = result
            except Exception as exc:  # one broken benchmark must not hide the others
                errors[name] = f"{type(exc).__name__}: {exc}"
                progress.console.print(f"[red]{name} failed: {errors[name]}")
            durations[name] = round(time.perf_counter() - started, 2)
            progress.update(current, completed=1)
            progress.update(overall, advance=1)
    for result in results.values():
        common.print_table(result, console)
    summary = summarize(results)
    console.print(summary_table(summary))
    report: dict[str, Any] = {
        "quick": quick,
        "machine": common.machine_info(),
        "benchmarks": results,
        "durations_s": durations,
        "errors": errors,
        "summary": summary,
    }
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"JSON written to {json_path}")
    return report


def summarize(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per target across all benchmarks."""
    rows: list[dict[str, Any]] = []
    for name, result in results.items():
        for metric, entry in result.get("targets", {}).items():
            rows.append({"benchmark": name, "metric": metric, **entry})
    return rows


def summary_table(summary: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    def fmt(value: Any) -> str:
        if value is None:
            return "—"
        if isinstance(value, bool):
            return "yes" if value else "[red]NO[/red]"
        if isinstance(value, float):
            return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
        return str(value)

    table = Table(title="tether bench: targets and goals")
    for col in ("benchmark", "metric", "measured", "unit", "target", "met", "goal", "met goal"):
        table.add_column(col, justify="left" if col in ("benchmark", "metric") else "right")
    for row in summary:
        table.add_row(
            row["benchmark"],
            row["metric"],
            fmt(row.get("measured")),
            str(row.get("unit", "")),
            fmt(row.get("target")),
            fmt(row.get("met_target")),
            fmt(row.get("goal")),
            fmt(row.get("met_goal")),
        )
    return table


def cmd_bench(args: argparse.Namespace) -> int:
    """The `tether bench` command: 0 when every benchmark ran (goals are reported, not enforced)."""
    try:
        report = run_benchmarks(args.names or None, quick=args.quick, json_path=args.json)
    except (BenchmarksNotFoundError, ValueError) as exc:
        print(f"tether bench: {exc}", file=sys.stderr)
        return 2
    return 1 if report["errors"] else 0


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `bench` to the `tether` subcommands: `add_bench_parser(commands)` in build_parser."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "bench",
        help="run the benchmarks (from a source checkout) and print the results table",
        description="Run Tether's benchmarks: hashing, breaker, cleanup, metrics, end-to-end "
        "throughput against raw websockets (through both adapters: websockets, and Starlette "
        "under uvicorn as FastAPI apps and `tether serve` run it) and peer libraries, scale "
        "and recovery. Results are ratios from one run and medians of repetitions; goals are "
        "reported, not enforced.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a small smoke run (seconds; for CI, no thresholds)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write all results as JSON to PATH")
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help="benchmarks to run (default: all): hash_performance circuit_breaker_latency "
        "cleanup_performance metrics_overhead e2e_throughput peers scale recovery",
    )
    parser.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m tether.bench` (the same as `tether bench`)."""
    parser = argparse.ArgumentParser(prog="tether")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(argv if argv is not None else sys.argv[1:])])
    return cmd_bench(args)


if __name__ == "__main__":
    sys.exit(main())
