"""BackgroundServer: run an ASGI app under uvicorn as a task of the current event loop,
with the connection limits `tether serve` uses (`uvicorn_options`)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import time
from collections.abc import Iterator
from typing import Any

import uvicorn
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from ..config import HubConfig
from ..transports.connection import OVERSIZE_SLACK
from ..transports.guard import ConnectionGuard, GuardStats, connection_guard
from .protocols import TetherH11Protocol, TetherWebSocketProtocol

log = logging.getLogger("tether.server")

# At most one "out of file descriptors" warning per this many seconds.
EMFILE_WARNING_INTERVAL = 10.0


def uvicorn_options(config: HubConfig, guard: ConnectionGuard | None = None) -> dict[str, Any]:
    """`uvicorn.Config` keyword arguments for serving a hub of `config` (what `tether
    serve` uses): the hardened protocol classes, heartbeats, the frame size limit and
    the concurrency limit. Attach the guard with `attach_guard(uvicorn_config, guard)`.

    `TetherWebSocketProtocol` keeps uvicorn's `send`, so the Starlette adapter's
    synchronous write (`tether.transports.starlette.UvicornStarletteTransport`) applies."""
    guard = guard or connection_guard(config)
    return {
        "http": TetherH11Protocol,
        "ws": TetherWebSocketProtocol,
        # ASGI gives the app no ping/pong, so uvicorn runs heartbeats with the hub's timing
        "ws_ping_interval": config.heartbeat_interval,
        "ws_ping_timeout": config.heartbeat_timeout,
        # Frames a little over the limit are read so the session can explain its refusal
        "ws_max_size": config.max_message_size + OVERSIZE_SLACK,
        # In-flight tasks (requests and WebSockets); connections themselves are bounded
        # at accept time by the guard, since uvicorn only checks once a request arrives.
        "limit_concurrency": (guard.max_total or config.max_connections) + 1,
    }


def attach_guard(config: uvicorn.Config, guard: ConnectionGuard) -> None:
    """Make the Tether protocol classes of a uvicorn `config` use `guard`."""
    config.tether_guard = guard  # type: ignore[attr-defined]


class GuardCollector(Collector):
    """Prometheus counters of what a server's guard refused (`tether_connections_*`)."""

    def __init__(self, stats: GuardStats) -> None:
        self.stats = stats

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        docs = {
            "handshake_timeouts": "Connections closed for not sending a request in time",
            "handshakes_evicted": "Waiting connections dropped to make room for new ones",
            "refused": "Connections closed at accept: the file-descriptor budget was full",
            "accept_errors": "accept() failures for lack of file descriptors",
            "flood_closes": "Connections closed for ping floods or an unread write buffer",
        }
        for name, value in self.stats.to_dict().items():
            yield CounterMetricFamily(f"tether_connections_{name}", docs[name], value=value)


class AcceptErrorHandler:
    """A loop exception handler that turns asyncio's "accept() out of system resource"
    report (a traceback per retry) into a counted, rate-limited one-line warning.

    asyncio's own loop only: under uvloop, libuv accepts and closes the connections it has
    no descriptor for (its reserve-descriptor trick) and reports nothing, so they are
    neither counted nor warned about. `tether serve` runs asyncio's loop."""

    def __init__(self, stats: GuardStats, previous: Any) -> None:
        self.stats = stats
        self.previous = previous
        self.warned_at: float | None = None
        self.suppressed = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
            self.stats.accept_errors += 1
            now = time.monotonic()
            if self.warned_at is None or now - self.warned_at >= EMFILE_WARNING_INTERVAL:
                log.warning(
                    "tether: cannot accept connections: %s (%d more since the last warning); "
                    "raise RLIMIT_NOFILE or lower TETHER_MAX_CONNECTIONS",
                    exc.strerror,
                    self.suppressed,
                )
                self.warned_at = now
                self.suppressed = 0
            else:
                self.suppressed += 1
            return
        if self.previous is not None:
            self.previous(loop, context)
        else:
            loop.default_exception_handler(context)


class _QuietServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to its owner (a test, or the CLI)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on host:port (port 0: the OS picks one).

    Binding here, not inside uvicorn, turns "address in use" into an OSError the
    caller can report, instead of uvicorn's sys.exit inside a task.
    """
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.set_inheritable(True)
    except OSError:
        sock.close()
        raise
    return sock


class BackgroundServer:
    """`async with BackgroundServer(app) as server:` serves `app` on `server.url`.

    Options go to `uvicorn.Config` (e.g. `ws_ping_interval`). For an app made by
    `create_app`, the defaults are `uvicorn_options(hub.config)`: the connection guard,
    the hardened protocols and the hub's heartbeats and frame limit (`harden=False`
    leaves uvicorn's own defaults). `stop()` asks uvicorn to shut down gracefully
    (WebSockets get close code 1012) and waits for it.
    """

    def __init__(
        self,
        app: Any,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        harden: bool = True,
        **options: Any,
    ) -> None:
        options.setdefault("log_level", "warning")
        options.setdefault("lifespan", "on")
        self.host = host
        self.requested_port = port
        hub = getattr(getattr(app, "state", None), "hub", None)
        self.guard: ConnectionGuard | None = None
        if harden and hub is not None:
            self.guard = connection_guard(hub.config)
            for key, value in uvicorn_options(hub.config, self.guard).items():
                options.setdefault(key, value)
            with contextlib.suppress(ValueError):  # already registered (a second server)
                hub.metrics.prometheus_registry.register(GuardCollector(self.guard.stats))
        self.config = uvicorn.Config(app, host=host, port=port, **options)
        if self.guard is not None:
            attach_guard(self.config, self.guard)
        self.server = _QuietServer(self.config)
        self._handler: AcceptErrorHandler | None = None
        self._task: asyncio.Task[None] | None = None
        self._sock: socket.socket | None = None
        self.port = port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return "ws" + self.url[4:]

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task

    async def start(self, startup_seconds: float = 10.0) -> None:
        if self.guard is not None:
            loop = asyncio.get_running_loop()
            self._handler = AcceptErrorHandler(self.guard.stats, loop.get_exception_handler())
            loop.set_exception_handler(self._handler)
        self._sock = bind_socket(self.host, self.requested_port)
        self.port = self._sock.getsockname()[1]
        self._task = asyncio.create_task(
            self.server.serve(sockets=[self._sock]), name="tether-uvicorn"
        )
        async with asyncio.timeout(startup_seconds):
            while not self.server.started:
                if self._task.done():
                    self._task.result()  # re-raise why it stopped
                    raise RuntimeError("uvicorn stopped during start-up")
                await asyncio.sleep(0.01)

    async def stop(self, grace_seconds: float = 10.0) -> None:
        task = self._task
        if task is None:
            return
        self.server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(task), grace_seconds)
        except TimeoutError:
            self.server.force_exit = True
            await task
        finally:
            self._task = None
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            if self._handler is not None:
                loop = asyncio.get_running_loop()
                if loop.get_exception_handler() is self._handler:
                    loop.set_exception_handler(self._handler.previous)
                self._handler = None

    async def __aenter__(self) -> BackgroundServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
