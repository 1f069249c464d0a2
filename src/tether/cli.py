"""The `tether` command: `tether serve` runs a delivery server with monitoring, `tether demo`
adds simulated clients. One function per command; add more via `build_parser`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TextIO

from ._version import __version__
from .backends import BackendError
from .bench import add_bench_parser
from .config import ConfigError, HubConfig
from .hub import Hub
from .messages import ShutdownStats

Command = Callable[[argparse.Namespace], int]

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


# --------------------------------------------------------------------------- parser


def _add_server_options(parser: argparse.ArgumentParser, *, log_default: str) -> None:
    parser.add_argument(
        "--host",
        help="address to bind (default: TETHER_HOST or 127.0.0.1; beyond loopback "
        "TETHER_API_TOKEN is required)",
    )
    parser.add_argument(
        "--port", type=int, help="port to bind, 0 for any free one (default: TETHER_PORT or 8765)"
    )
    parser.add_argument(
        "--log-level", choices=LOG_LEVELS, default=log_default, help=f"default: {log_default}"
    )


def build_parser() -> argparse.ArgumentParser:
    """The `tether` argument parser; each subcommand sets `func` to its command function."""
    parser = argparse.ArgumentParser(
        prog="tether",
        description="Resilient WebSocket delivery: a server with per-client outboxes, retries, "
        "circuit breakers and a live dashboard. Settings come from TETHER_* variables.",
    )
    parser.add_argument("--version", action="version", version=f"tether {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser(
        "serve",
        help="run a delivery server: /ws, the publish API, /metrics and the dashboard on one port",
        description="Run a hub with its WebSocket endpoint (/ws), HTTP publish API "
        "(POST /api/send, /api/broadcast), /health, /metrics and /dashboard on one port. "
        "Stop with Ctrl-C or SIGTERM: pending messages are flushed first.",
        epilog="Where queued messages live (TETHER_BACKEND): memory (default) is fastest "
        "but loses them when the process stops; sqlite keeps them in one file "
        "(TETHER_SQLITE_PATH, default tether.db) across restarts and crashes, for a single "
        "server process; redis shares them between several server processes (and survives "
        "a restart of any of them). See docs/configuration.md.",
    )
    _add_server_options(serve, log_default="warning")
    serve.set_defaults(func=cmd_serve)

    demo = commands.add_parser(
        "demo",
        help="`serve` plus simulated clients (churn, failures, slow peers) so the dashboard moves",
        description="Run `tether serve` with simulated clients: healthy, slow and flaky ones, "
        "outages that open circuit breakers, reconnects, and a producer mixing critical and "
        "best-effort messages and broadcasts. Open the printed dashboard URL to watch.",
    )
    _add_server_options(demo, log_default="error")
    demo.add_argument("--clients", type=_positive_int, default=24, help="simulated clients (24)")
    demo.add_argument("--rate", type=_positive_float, default=40.0, help="messages per second (40)")
    demo.add_argument(
        "--duration",
        type=_positive_float,
        default=None,
        help="seconds to run (default: until Ctrl-C)",
    )
    demo.add_argument("--seed", type=int, default=None, help="random seed for a reproducible run")
    demo.set_defaults(func=cmd_demo)

    add_bench_parser(commands)
    _add_soak_parser(commands)
    return parser


def _add_soak_parser(commands: Any) -> None:
    soak = commands.add_parser(
        "soak",
        help="minutes of mixed load and chaos; checks every critical message arrived once "
        "or was reported lost (needs a source checkout: benchmarks/soak.py)",
        description="Run benchmarks/soak.py: tether.Clients over loopback with random "
        "drops, a stalled client, bad frames, floods and hub restarts. Exits 1 on any "
        "message neither delivered exactly once nor reported lost, or state left behind.",
    )
    soak.add_argument("--duration", type=_positive_float, default=120.0, help="seconds (120)")
    soak.add_argument("--clients", type=_positive_int, default=20, help="clients (20)")
    soak.add_argument("--seed", type=int, default=None, help="random seed (random)")
    soak.add_argument("--restarts", type=int, default=1, help="hub restarts (1)")
    soak.add_argument("--rate", type=_positive_float, default=300.0, help="messages/s (300)")
    soak.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    soak.set_defaults(func=cmd_soak)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tether` console script and `python -m tether`."""
    args = build_parser().parse_args(argv)
    command: Command = args.func
    return command(args)


# --------------------------------------------------------------------------- commands


def cmd_serve(args: argparse.Namespace) -> int:
    return _run(args, config_overrides={}, simulate=None)


def cmd_soak(args: argparse.Namespace) -> int:
    from .bench import BenchmarksNotFoundError, locate_benchmarks

    try:
        locate_benchmarks()  # the soak lives beside the benchmarks, not in the wheel
    except BenchmarksNotFoundError as exc:
        print(f"tether: {exc}", file=sys.stderr)
        return 2
    from benchmarks import soak  # type: ignore[import-not-found,unused-ignore]

    result: int = soak.run_from_args(args)
    return result


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DEMO_CONFIG, DemoSimulation

    def simulate(hub: Hub) -> DemoSimulation:
        return DemoSimulation(hub, clients=args.clients, rate=args.rate, seed=args.seed)

    return _run(args, config_overrides=dict(DEMO_CONFIG), simulate=simulate, duration=args.duration)


def _run(
    args: argparse.Namespace,
    *,
    config_overrides: dict[str, Any],
    simulate: Callable[[Hub], Any] | None,
    duration: float | None = None,
) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    flags: dict[str, tuple[str, Any]] = {}
    if args.host is not None:
        flags["host"] = ("--host", args.host)
    if args.port is not None:
        flags["port"] = ("--port", args.port)
    try:
        config = HubConfig.from_flags(flags, **config_overrides)
    except ConfigError as exc:
        print(f"tether: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_serve(config, args.log_level, simulate, duration))
    except ConfigError as exc:
        print(f"tether: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"tether: cannot listen on {config.host}:{config.port}: {exc}", file=sys.stderr)
        return 1


async def _serve(
    config: HubConfig,
    log_level: str,
    simulate: Callable[[Hub], Any] | None,
    duration: float | None,
    out: TextIO = sys.stdout,
) -> int:
    from .monitoring import BackgroundServer, create_app

    hub = Hub(config)
    app = create_app(hub)  # raises ConfigError for a public bind without an API token
    try:
        await hub.start()  # opens the store: a file that cannot be used fails here, clearly
    except BackendError as exc:
        print(f"tether: cannot start the {config.backend.value} backend: {exc}", file=sys.stderr)
        return 1
    server = BackgroundServer(
        app,
        config.host,
        config.port,
        log_level=log_level,
        access_log=log_level == "debug",
        # heartbeats, frame size, handshake timeout and connection limits come from
        # `uvicorn_options(config)`, which BackgroundServer applies to a hub's app
    )
    stop = asyncio.Event()
    signals = _SignalWatch(stop, server)
    signals.install()
    simulation = None
    try:
        await server.start()
        _print_urls(server, config, out)
        if simulate is not None:
            simulation = simulate(hub)
            await simulation.start()
            print(
                f"Simulating {len(simulation.clients)} clients at ~{simulation.rate:g} msg/s, plus "
                f"short-lived guest-* clients (listed until {config.client_ttl:g} s after they "
                "leave).",
                file=out,
            )
        print("Press Ctrl-C to stop.", file=out, flush=True)
        waiters: list[Awaitable[Any]] = [stop.wait()]
        if server.task is not None:
            waiters.append(server.task)  # uvicorn ending on its own also ends the command
        if duration is not None:
            waiters.append(asyncio.sleep(duration))
        tasks = [asyncio.ensure_future(w) for w in waiters]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            if task is not server.task:
                task.cancel()
        print("Shutting down: flushing pending messages…", file=out, flush=True)
    finally:
        if simulation is not None:
            await simulation.stop()
        # The hub first (it flushes and closes /ws clients with 1001), then the server.
        stats = await hub.shutdown()
        await server.stop(grace_seconds=config.shutdown_timeout + 5)
        signals.remove()
    _print_stats(stats, out)
    return 0


class _SignalWatch:
    """First SIGINT/SIGTERM: graceful stop. A second one: uvicorn stops without waiting."""

    def __init__(self, stop: asyncio.Event, server: Any) -> None:
        self.stop = stop
        self.server = server
        self.installed: list[signal.Signals] = []

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):  # e.g. Windows
                loop.add_signal_handler(sig, self._fired)
                self.installed.append(sig)

    def _fired(self) -> None:
        if self.stop.is_set():
            self.server.server.force_exit = True
        self.stop.set()

    def remove(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in self.installed:
            loop.remove_signal_handler(sig)
        self.installed = []


def _print_urls(server: Any, config: HubConfig, out: TextIO) -> None:
    host = server.host
    shown = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    if ":" in shown:
        shown = f"[{shown}]"
    base = f"http://{shown}:{server.port}"
    ws = "ws" + base[4:]
    lines = [
        f"Tether {__version__} listening on {host}:{server.port}"
        + (" (all interfaces)" if host in ("0.0.0.0", "::", "") else ""),
        f"  dashboard  {base}/dashboard"
        + ("   (asks for TETHER_MONITOR_TOKEN)" if config.monitor_token else ""),
        f"  websocket  {ws}/ws?client_id=<id>   (subprotocol tether.v1, or plain)",
        f"  publish    POST {base}/api/send   POST {base}/api/broadcast",
        f"  metrics    {base}/metrics",
        f"  health     {base}/health",
        _storage_line(config),
    ]
    print("\n".join(lines), file=out, flush=True)


def _storage_line(config: HubConfig) -> str:
    """What the backend keeps across a restart, in one line."""
    kind = config.backend.value
    if kind == "memory":
        return (
            "  storage    memory: queued messages do not survive a restart "
            "(TETHER_BACKEND=sqlite keeps them in a file)"
        )
    if kind == "sqlite":
        from pathlib import Path

        return f"  storage    sqlite file {Path(config.sqlite_path).resolve()} (survives restarts)"
    return f"  storage    {kind} (shared by every node; survives restarts)"


def _print_stats(stats: ShutdownStats, out: TextIO) -> None:
    import json

    print(
        f"Stopped: {stats.pending_messages_flushed} pending messages flushed, "
        f"{stats.pending_messages_persisted} persisted, {stats.pending_messages_dropped} dropped; "
        f"{stats.connections_closed} connections closed in {stats.duration_seconds:.2f} s.",
        file=out,
    )
    print("shutdown stats: " + json.dumps(stats.to_dict()), file=out, flush=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
