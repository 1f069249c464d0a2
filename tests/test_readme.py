"""The README's code runs as written: the docs may never drift from the code again. Its FastAPI
recipe is served in-process, then by a real uvicorn process that is restarted under a page in
Chromium: on Redis the page gets every message across the restart; on memory it is told."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page

from tether import Client, SendStatus
from tether.monitoring import BackgroundServer
from tether.testing import MockWebSocket

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def block(after_heading: str, language: str = "python") -> str:
    """The first ```language block after a heading of the README."""
    section = README[README.index(after_heading) :]
    match = re.search(rf"```{language}\n(.*?)```", section, re.S)
    assert match, f"no {language} block after {after_heading!r}"
    return match.group(1)


def python_block(after_heading: str) -> str:
    return block(after_heading, "python")


FASTAPI = "## Thirty seconds with FastAPI"


def curl_path() -> str:
    """The path the README's `curl` ships an order to."""
    match = re.search(r"curl -X POST 'localhost:8000(/orders/[^']+)'", block(FASTAPI, "bash"))
    assert match, "the FastAPI section ships an order with curl"
    return match.group(1)


def test_quick_start_is_two_commands() -> None:
    commands = [
        line.split("#")[0].strip()
        for line in block("## Quick start", "bash").splitlines()
        if line.split("#")[0].strip()
    ]
    assert commands == ["make demo", "make test"]


async def test_fastapi_example_delivers_to_a_tether_client() -> None:
    namespace: dict[str, Any] = {}
    exec(compile(python_block(FASTAPI), "README-fastapi", "exec"), namespace)
    app, hub = namespace["app"], namespace["hub"]
    async with BackgroundServer(app, lifespan="on", log_level="warning") as server:
        client = Client(server.ws_url + "/ws", client_id="alice", backoff_base=0.05)
        async with client, httpx.AsyncClient(base_url=server.url) as http:
            await client.wait_connected()
            first = (await http.post(curl_path())).json()
            assert (
                first["status"] == SendStatus.SENT and first["message_id"] == "order-1234-shipped"
            )
            # another order to the same user is another message, not a "duplicate"
            second = (await http.post("/orders/1235/shipped?user=alice")).json()
            assert second["status"] == SendStatus.SENT
            # a retried POST for the same order is recognised and not delivered twice
            again = (await http.post(curl_path())).json()
            assert again["status"] == SendStatus.DUPLICATE
            script = await http.get("/static/tether.js")
            assert script.status_code == 200
            assert script.headers["content-type"].startswith("text/javascript")
            assert "export class TetherClient" in script.text
            async with asyncio.timeout(5):
                messages = [await anext(aiter(client)) for _ in range(2)]
    assert [(m.seq, m.data["text"]) for m in messages] == [
        (1, "order 1234 shipped"),
        (2, "order 1235 shipped"),
    ]
    assert hub.closing  # the lifespan shut the hub down with the app


async def test_api_at_a_glance_runs_as_written() -> None:
    code = python_block("## Public API at a glance")
    transport = MockWebSocket()
    namespace: dict[str, Any] = {"transport": transport}
    # The block is top-level `async with`: run it as the body of a coroutine.
    body = "async def _glance():\n" + "".join(f"    {line}\n" for line in code.splitlines())
    body += "    return stats\n"
    exec(compile(body, "README-glance", "exec"), namespace)
    stats = await namespace["_glance"]()
    assert transport.payloads[0] == {"id": "m1", "text": "hi"}
    assert stats.connections_closed == 1


# --------------------------------------------------------------------------- as a new user


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class UvicornApp:
    """`uvicorn app:app` in a directory holding the README's app.py and index.html."""

    def __init__(self, directory: Path, port: int, env: dict[str, str]) -> None:
        self.directory = directory
        self.port = port
        self.env = env
        self.process: asyncio.subprocess.Process | None = None
        self.url = f"http://127.0.0.1:{port}"

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "uvicorn", "app:app", "--port", str(self.port),
            cwd=self.directory, env=self.env,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        async with asyncio.timeout(30), httpx.AsyncClient() as http:
            while True:
                if self.process.returncode is not None:
                    assert self.process.stderr is not None
                    raise AssertionError((await self.process.stderr.read()).decode())
                try:
                    if (await http.get(self.url + "/static/tether.js")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)

    async def stop(self) -> None:
        """SIGTERM, as a deploy does: uvicorn runs the lifespan's graceful shutdown."""
        if self.process is None or self.process.returncode is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        assert self.process.stderr is not None
        async with asyncio.timeout(30):
            log = (await self.process.stderr.read()).decode()
            await self.process.wait()
        # uvicorn re-raises the signal once it has shut down, so the exit status is -15
        assert self.process.returncode in (0, -signal.SIGTERM), log
        assert "Application shutdown complete." in log, log


@pytest_asyncio.fixture
async def readme_app(tmp_path: Path) -> AsyncIterator[Any]:
    """Writes the README's files and starts `uvicorn app:app` with the given TETHER_* values."""
    (tmp_path / "app.py").write_text(python_block(FASTAPI))
    (tmp_path / "index.html").write_text(block(FASTAPI, "html"))
    started: list[UvicornApp] = []
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith("TETHER_")}

    def make(port: int, **tether: str) -> UvicornApp:
        app = UvicornApp(tmp_path, port, {**base, **tether})
        started.append(app)
        return app

    yield make
    for app in started:
        await app.stop()


async def log_lines(page: Page) -> list[str]:
    return await page.locator("#log li").all_text_contents()


async def wait_for_line(page: Page, text: str) -> None:
    await page.wait_for_function(
        "t => [...document.querySelectorAll('#log li')].some(li => li.textContent === t)",
        arg=text,
        timeout=20_000,
    )


async def ship(base_url: str, path: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
        answer = await http.post(path)
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


async def test_readme_page_gets_critical_messages_across_a_restart_on_redis(
    browser: Browser, readme_app: Any, redis_url: str, redis_prefix: str
) -> None:
    port = free_port()
    settings = {
        "TETHER_BACKEND": "redis",
        "TETHER_REDIS_URL": redis_url,
        "TETHER_REDIS_PREFIX": redis_prefix,
    }
    first = readme_app(port, **settings)
    await first.start()
    page = await browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        await page.goto(first.url + "/")
        shipped = await ship(first.url, curl_path())
        assert shipped["status"] in ("sent", "queued")
        await wait_for_line(page, "#1 order 1234 shipped")

        await first.stop()  # a deploy: SIGTERM, graceful shutdown
        second = readme_app(port, **settings)
        await second.start()
        # shipped right after the restart, usually before the page is back: it waits in Redis
        assert (await ship(second.url, "/orders/1235/shipped?user=alice"))["status"] in (
            "sent",
            "queued",
        )
        await wait_for_line(page, "#2 order 1235 shipped")
        await ship(second.url, "/orders/1236/shipped?user=alice")
        await wait_for_line(page, "#3 order 1236 shipped")
        # the retried POST of an order shipped before the restart is still recognised
        assert (await ship(second.url, curl_path()))["status"] == "duplicate"
        assert await log_lines(page) == [
            "#1 order 1234 shipped",
            "#2 order 1235 shipped",
            "#3 order 1236 shipped",
        ]
        assert errors == []
    finally:
        await page.close()


async def test_readme_page_is_told_when_a_memory_restart_lost_its_state(
    browser: Browser, readme_app: Any
) -> None:
    port = free_port()
    first = readme_app(port)
    await first.start()
    page = await browser.new_page()
    try:
        await page.goto(first.url + "/")
        await ship(first.url, curl_path())
        await wait_for_line(page, "#1 order 1234 shipped")
        await first.stop()
        second = readme_app(port)
        await second.start()
        await page.wait_for_function(
            "() => [...document.querySelectorAll('#log li')]"
            ".some(li => li.textContent.startsWith('the server restarted without its memory'))",
            timeout=20_000,
        )
        lines = await log_lines(page)
        assert not any(line.startswith("lost 0") for line in lines), lines
    finally:
        await page.close()


@pytest.mark.parametrize("path", ["/static/tether.js"])
async def test_add_tether_leaves_the_apps_own_routes_alone(path: str) -> None:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    from tether import Hub, HubConfig
    from tether.transports.starlette import add_tether

    async def own(request: Any) -> PlainTextResponse:
        return PlainTextResponse("app's own")

    hub = Hub(HubConfig())
    app = Starlette(routes=[Mount("/static", routes=[Route("/app.css", own)])])
    add_tether(app, hub)
    async with (
        BackgroundServer(app, lifespan="off") as server,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        assert (await http.get(path)).status_code == 200
        assert (await http.get("/static/app.css")).text == "app's own"
    with pytest.raises(ValueError, match="start with '/'"):
        add_tether(app, hub, "ws")
    await hub.shutdown(timeout=1.0)
