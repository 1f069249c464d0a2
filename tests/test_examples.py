"""The examples as a user runs them: each stops on SIGTERM the way `tether serve` does (flush,
close clients, print shutdown statistics), the servers echo what is published, and the browser
example's page loads without a single 404 (favicon included)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest_asyncio
from playwright.async_api import Browser, Response

from tether import Client

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Example:
    """One example script running in its own process."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []

    async def wait_for_line(self, fragment: str, timeout: float = 30.0) -> str:
        assert self.process.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.process.stdout.readline()
                assert raw, f"exited before printing {fragment!r}: {self.lines}"
                line = raw.decode().rstrip()
                self.lines.append(line)
                if fragment in line:
                    return line

    async def terminate(self) -> dict[str, int]:
        """SIGTERM; returns the shutdown statistics it printed."""
        self.process.send_signal(signal.SIGTERM)
        line = await self.wait_for_line("shutdown stats: ")
        async with asyncio.timeout(30):
            code = await self.process.wait()
        assert code == 0, self.lines
        stats: dict[str, int] = json.loads(line.split("shutdown stats: ", 1)[1])
        return stats


RunExample = Callable[..., Awaitable[Example]]


@pytest_asyncio.fixture
async def run_example() -> AsyncIterator[RunExample]:
    started: list[Example] = []
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("TETHER_")}

    async def run(script: str, *args: str) -> Example:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-u", script, *args,
            cwd=ROOT, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        example = Example(process)
        started.append(example)
        return example

    yield run
    for example in started:
        if example.process.returncode is None:
            example.process.kill()
            await example.process.wait()


async def test_websockets_example_echoes_and_stops_gracefully_on_sigterm(
    run_example: RunExample,
) -> None:
    port = free_port()
    example = await run_example("examples/websockets_server.py", "--port", str(port))
    await example.wait_for_line("serving tether.v1")
    async with Client(f"ws://127.0.0.1:{port}/", client_id="alice", backoff_base=0.05) as client:
        await client.publish("hello")
        seen = []
        async with asyncio.timeout(10):
            async for message in client:
                seen.append(message.data)
                if {"echo": "hello"} in seen:
                    break
        await example.wait_for_line("alice says 'hello'")
        stats = await example.terminate()
    assert stats["connections_closed"] == 1
    assert "Shutting down: flushing pending messages…" in example.lines


async def test_browser_example_echoes_publishes_has_a_favicon_and_stops_on_sigterm(
    browser: Browser, run_example: RunExample
) -> None:
    port = free_port()
    example = await run_example("examples/browser/serve.py", "--port", str(port))
    await example.wait_for_line("open http://127.0.0.1:")
    page = await browser.new_page()
    failures: list[str] = []

    def check(response: Response) -> None:
        if response.status >= 400:
            failures.append(f"{response.status} {response.url}")

    page.on("response", check)
    try:
        await page.goto(f"http://127.0.0.1:{port}/")
        await page.wait_for_function(
            "() => document.getElementById('state').dataset.state === 'connected'",
            timeout=10_000,
        )
        await page.fill("#text", "hello from the page")
        await page.press("#text", "Enter")
        await page.wait_for_function(
            "() => [...document.querySelectorAll('#messages li')]"
            ".some(li => li.textContent.includes('you said: hello from the page'))",
            timeout=10_000,
        )
        icon = await page.request.get(f"http://127.0.0.1:{port}/favicon.ico")
        assert icon.status == 200 and icon.headers["content-type"].startswith("image/svg+xml")
        linked = await page.evaluate("() => document.querySelector('link[rel=icon]').href")
        assert (await page.request.get(linked)).status == 200
        assert failures == []
        stats = await example.terminate()
        assert stats["connections_closed"] == 1  # the page, closed with 1001 before exit
        await page.wait_for_function(
            "() => document.getElementById('state').dataset.state !== 'connected'",
            timeout=10_000,
        )
    finally:
        await page.close()
