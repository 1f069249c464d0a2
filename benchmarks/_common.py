"""Shared benchmark helpers: repetitions and medians, the JSON result schema, machine facts,
a rich results table, JSON-line child processes and the `--quick/--json` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
import timeit
from collections.abc import Callable, Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent

# Libraries whose versions go into every result (absent ones are reported as None).
LIBRARIES = (
    "tether",
    "websockets",
    "orjson",
    "xxhash",
    "uvloop",
    "python-socketio",
    "python-engineio",
    "aiohttp",
    "fastapi-websocket-stabilizer",
    "fastapi",
    "starlette",
    "uvicorn",
    "rich",
)

Row = dict[str, Any]
Result = dict[str, Any]


# ---------------------------------------------------------------------------- statistics


def median(values: Iterable[float]) -> float:
    data = list(values)
    return float(statistics.median(data)) if data else float("nan")


def timeit_ns(
    stmt: str, namespace: dict[str, Any], *, number: int, repeat: int
) -> dict[str, float]:
    """Nanoseconds per execution of `stmt` (median and min over `repeat` runs of `number`).

    `stmt` is compiled into timeit's own loop, so no function-call overhead is added;
    the figure still includes the ~10 ns of the loop itself (reported as `loop_ns`).
    """
    timer = timeit.Timer(stmt, globals=namespace)
    empty = timeit.Timer("pass")
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        runs = [t / number * 1e9 for t in timer.repeat(repeat=repeat, number=number)]
        loop = min(t / number * 1e9 for t in empty.repeat(repeat=3, number=number))
    finally:
        if was_enabled:
            gc.enable()
    return {"median_ns": median(runs), "min_ns": min(runs), "loop_ns": loop}


def rate(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def rnd(value: float, digits: int = 3) -> float:
    """Round to `digits` significant digits (keeps JSON and tables readable)."""
    if value == 0 or value != value or value in (float("inf"), float("-inf")):
        return value

    return round(value, -math.floor(math.log10(abs(value))) + digits - 1)


# ---------------------------------------------------------------------------- result schema


def check(
    measured: float,
    *,
    unit: str,
    target: float | None = None,
    goal: float | None = None,
    higher_is_better: bool = False,
    note: str = "",
) -> dict[str, Any]:
    """A `targets` entry: the measured figure beside its seed target and product goal."""

    def met(bound: float | None) -> bool | None:
        if bound is None or measured != measured:
            return None
        return measured >= bound if higher_is_better else measured < bound

    entry: dict[str, Any] = {
        "measured": rnd(measured),
        "unit": unit,
        "target": target,
        "goal": goal,
        "direction": "higher is better" if higher_is_better else "lower is better",
        "met_target": met(target),
        "met_goal": met(goal),
    }
    if note:
        entry["note"] = note
    return entry


def make_result(
    name: str,
    params: dict[str, Any],
    results: list[Row],
    targets: dict[str, dict[str, Any]],
) -> Result:
    """The JSON result every benchmark returns: name, params, results, targets, machine."""
    return {
        "name": name,
        "params": params,
        "results": results,
        "targets": targets,
        "machine": machine_info(),
    }


def validate_result(result: Any) -> list[str]:
    """Problems with a result's shape (empty when it follows the schema)."""
    problems: list[str] = []
    if not isinstance(result, dict):
        return ["result is not an object"]
    for key, kind in (
        ("name", str),
        ("params", dict),
        ("results", list),
        ("targets", dict),
        ("machine", dict),
    ):
        if not isinstance(result.get(key), kind):
            problems.append(f"{key!r} missing or not a {kind.__name__}")
    for i, row in enumerate(result.get("results") or []):
        if not isinstance(row, dict) or not row:
            problems.append(f"results[{i}] is not a non-empty object")
    for key, entry in (result.get("targets") or {}).items():
        if not isinstance(entry, dict) or "measured" not in entry or "unit" not in entry:
            problems.append(f"targets[{key!r}] lacks measured/unit")
    try:
        json.dumps(result, allow_nan=True)
    except (TypeError, ValueError) as exc:
        problems.append(f"not JSON-serialisable: {exc}")
    return problems


_MACHINE: dict[str, Any] | None = None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    global _MACHINE
    if _MACHINE is None:
        _MACHINE = {
            "nproc": os.cpu_count(),
            "cpu_model": _cpu_model(),
            "python": platform.python_version(),
            "implementation": platform.python_implementation(),
            "platform": platform.platform(),
            "libraries": {name: _version(name) for name in LIBRARIES},
        }
    return dict(_MACHINE)


# ---------------------------------------------------------------------------- output


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "—" if value is None else ("yes" if value else "NO")
    if isinstance(value, float):
        if value != value:
            return "n/a"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{rnd(value):g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def print_table(result: Result, console: Any = None) -> None:
    """Print a result's rows and its targets as rich tables."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=160)
    rows: list[Row] = result.get("results", [])
    columns: list[str] = []
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    table = Table(title=f"{result['name']}  {_params_line(result.get('params', {}))}")
    for col in columns:
        table.add_column(col, justify="left" if col in ("case", "library", "mode") else "right")
    for row in rows:
        table.add_row(*(_fmt(row.get(col)) for col in columns))
    console.print(table)
    targets = result.get("targets") or {}
    if targets:
        console.print(targets_table(result["name"], targets))


def targets_table(name: str, targets: dict[str, dict[str, Any]]) -> Any:
    from rich.table import Table

    table = Table(title=f"{name}: targets and goals")
    for col in ("metric", "measured", "unit", "target", "met", "goal", "met goal"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for metric, entry in targets.items():
        table.add_row(
            metric,
            _fmt(entry.get("measured")),
            str(entry.get("unit", "")),
            _fmt(entry.get("target")),
            _fmt(entry.get("met_target")),
            _fmt(entry.get("goal")),
            _fmt(entry.get("met_goal")),
        )
    return table


def _params_line(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items() if not isinstance(v, dict | list))


def write_json(result: Result | dict[str, Any], path: str | os.PathLike[str]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")


def cli_main(name: str, run: Callable[[bool], Result], argv: Sequence[str] | None = None) -> Result:
    """`python -m benchmarks.<name> [--quick] [--json PATH]`."""
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=run.__doc__)
    parser.add_argument("--quick", action="store_true", help="a small smoke run (CI)")
    parser.add_argument("--json", metavar="PATH", help="write the JSON result here")
    args = parser.parse_args(argv)
    result = run(args.quick)
    print_table(result)
    if args.json:
        write_json(result, args.json)
    return result


# ---------------------------------------------------------------------------- processes


def raise_fd_limit(wanted: int = 1 << 20) -> int:
    """Raise RLIMIT_NOFILE's soft limit towards the hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(wanted, hard) if hard != resource.RLIM_INFINITY else wanted
    if target > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def child_env() -> dict[str, str]:
    """Environment for a child interpreter that can import `benchmarks` and `tether`."""
    env = dict(os.environ)
    paths = [str(REPO_ROOT), str(REPO_ROOT / "src")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class Child:
    """A Python child process speaking JSON lines on stdin/stdout (the receivers, servers).

    Every wait has a timeout and `close()` kills the process if it has not exited, so a
    benchmark can never hang on a child.
    """

    def __init__(self, proc: asyncio.subprocess.Process, label: str) -> None:
        self.proc = proc
        self.label = label

    @classmethod
    async def start(cls, module: str, config: dict[str, Any], *, label: str = "") -> Child:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            module,
            json.dumps(config),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=None,
            env=child_env(),
            cwd=str(REPO_ROOT),
            limit=1 << 24,
        )
        return cls(proc, label or module)

    async def recv(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while True:
            try:
                line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
            except TimeoutError:
                raise TimeoutError(f"{self.label}: no answer within {timeout:g}s") from None
            if not line:
                code = await self.proc.wait()
                raise RuntimeError(f"{self.label} exited (code {code}) before answering")
            text = line.decode().strip()
            if text.startswith("{"):
                message: dict[str, Any] = json.loads(text)
                if message.get("error"):
                    raise RuntimeError(f"{self.label}: {message['error']}")
                return message

    async def expect(self, event: str, timeout: float) -> dict[str, Any]:
        message = await self.recv(timeout)
        if message.get("event") != event:
            raise RuntimeError(f"{self.label}: expected {event!r}, got {message!r}")
        return message

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(message) + "\n").encode())

    async def close(self, timeout: float = 10.0) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                self.send({"cmd": "exit"})
                if self.proc.stdin is not None:
                    self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


def emit(message: dict[str, Any]) -> None:
    """Child side of `Child`: one JSON line on stdout."""
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def read_commands() -> asyncio.StreamReader:
    """Child side of `Child`: an asyncio reader on stdin."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def next_command(reader: asyncio.StreamReader, timeout: float) -> dict[str, Any]:
    line = await asyncio.wait_for(reader.readline(), timeout)
    if not line:
        return {"cmd": "exit"}
    command: dict[str, Any] = json.loads(line)
    return command


def run_loop(main: Callable[[], Any], *, use_uvloop: bool = False) -> Any:
    """Run a coroutine function on asyncio's loop or uvloop's."""
    if use_uvloop:
        import uvloop

        return uvloop.run(main())
    return asyncio.run(main())


def monotonic() -> float:
    """CLOCK_MONOTONIC seconds: comparable across processes on one Linux machine."""
    return time.monotonic()


def free_port_server_port(server: Any) -> int:
    """The port of a listening asyncio/websockets server bound to port 0."""
    sockets = getattr(server, "sockets", None) or server.server.sockets
    port: int = sockets[0].getsockname()[1]
    return port
