"""The `tether` command as a user runs it: help texts, `serve` answering and stopping cleanly on
SIGTERM with shutdown statistics, `demo` for a fixed duration, and start-up errors."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
import pytest_asyncio
import websockets

from tether.cli import build_parser


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    env.update(extra)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.mark.parametrize("args", [["--help"], ["serve", "--help"], ["demo", "--help"]])
def test_help(args: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tether", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(),
    )
    assert done.returncode == 0, done.stderr
    assert "usage: tether" in done.stdout
    if args == ["--help"]:
        assert "serve" in done.stdout and "demo" in done.stdout
    if args[0] == "demo":
        for option in ("--clients", "--rate", "--duration", "--seed", "--port"):
            assert option in done.stdout
    if args[0] == "serve":  # when to pick which backend
        text = " ".join(done.stdout.split())
        for needle in ("TETHER_BACKEND", "memory", "sqlite", "TETHER_SQLITE_PATH", "redis"):
            assert needle in text


def test_parser_is_extensible() -> None:
    # another command (e.g. `bench`) is one more subparser with a `func`
    parser = build_parser()
    args = parser.parse_args(["demo", "--clients", "3", "--rate", "5", "--seed", "1"])
    assert (args.clients, args.rate, args.seed, args.duration) == (3, 5.0, 1, None)
    assert callable(args.func)
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--clients", "0"])


class Running:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []

    async def read_until(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        assert self.process.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.process.stdout.readline()
                if not raw:
                    raise AssertionError("process ended; output:\n" + "".join(self.lines))
                line = raw.decode()
                self.lines.append(line)
                found = re.search(pattern, line)
                if found:
                    return found

    async def finish(self, timeout: float = 20.0) -> tuple[int, str]:
        assert self.process.stdout is not None
        async with asyncio.timeout(timeout):
            rest = await self.process.stdout.read()
            code = await self.process.wait()
        return code, "".join(self.lines) + rest.decode()


Spawn = Callable[..., Awaitable[Running]]


@pytest_asyncio.fixture
async def spawn() -> AsyncIterator[Spawn]:
    started: list[asyncio.subprocess.Process] = []

    async def run(*args: str, **env: str) -> Running:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tether",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=clean_env(**env),
        )
        started.append(process)
        return Running(process)

    yield run
    for process in started:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
async def test_serve_answers_and_stops_cleanly(spawn: Spawn, stop_signal: signal.Signals) -> None:
    running: Running = await spawn("serve", "--port", "0")
    found = await running.read_until(r"dashboard\s+(http://\S+)/dashboard")
    base = found.group(1)
    await running.read_until("Press Ctrl-C")
    text = "".join(running.lines)
    for url in ("/metrics", "/health", "/ws?client_id="):
        assert url in text
    # On the default memory backend the banner says what a restart costs, and the way out.
    assert "queued messages do not survive a restart (TETHER_BACKEND=sqlite" in text

    async with httpx.AsyncClient(base_url=base, timeout=5) as client:
        health = await client.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        async with websockets.connect("ws" + base[4:] + "/ws?client_id=cli-1") as ws:
            async with asyncio.timeout(5):
                while (await client.get("/api/clients/cli-1")).status_code != 200:
                    await asyncio.sleep(0.05)
            sent = await client.post(
                "/api/send", json={"client_id": "cli-1", "data": "hi", "critical": True}
            )
            assert sent.json()["status"] == "sent"
            assert await asyncio.wait_for(ws.recv(), 5) == "hi"

            running.process.send_signal(stop_signal)
            # the hub closes its connections with 1001 (going away) before the server stops
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001

    code, output = await running.finish()
    assert code == 0, output
    stats = json.loads(re.search(r"shutdown stats: (\{.*\})", output).group(1))  # type: ignore[union-attr]
    assert stats["connections_closed"] == 1
    assert stats["pending_messages_dropped"] == 0
    assert "Traceback" not in output


async def test_demo_runs_for_a_duration(spawn: Spawn) -> None:
    running: Running = await spawn(
        "demo", "--port", "0", "--clients", "5", "--rate", "20", "--duration", "3", "--seed", "3"
    )
    found = await running.read_until(r"dashboard\s+(http://\S+)/dashboard")
    await running.read_until("Press Ctrl-C")
    async with httpx.AsyncClient(base_url=found.group(1), timeout=5) as client:
        async with asyncio.timeout(5):
            while (await client.get("/api/metrics")).json()["messages"]["sent"] == 0:
                await asyncio.sleep(0.1)
        clients = (await client.get("/api/clients")).json()
        assert clients["total"] >= 5
    code, output = await running.finish()
    assert code == 0, output
    assert "shutdown stats:" in output and "Simulating 5 clients" in output


async def test_bad_settings_fail_at_start(spawn: Spawn) -> None:
    bad_port: Running = await spawn("serve", TETHER_PORT="not-a-port")
    code, output = await bad_port.finish()
    assert code == 2 and "TETHER_PORT" in output

    public: Running = await spawn("serve", "--host", "0.0.0.0", "--port", "0")
    code, output = await public.finish()
    assert code == 2 and "TETHER_API_TOKEN" in output
