"""BackgroundServer: run an ASGI app under uvicorn as a task of the current event loop."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from typing import Any

import uvicorn


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

    Options go to `uvicorn.Config` (e.g. `ws_ping_interval`). `stop()` asks uvicorn to
    shut down gracefully (WebSockets get close code 1012) and waits for it.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, **options: Any) -> None:
        options.setdefault("log_level", "warning")
        options.setdefault("lifespan", "on")
        self.host = host
        self.requested_port = port
        self.config = uvicorn.Config(app, host=host, port=port, **options)
        self.server = _QuietServer(self.config)
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

    async def __aenter__(self) -> BackgroundServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
