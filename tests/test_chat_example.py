"""examples/chat as a user runs it: two pages in one room see each other's messages and
presence, and a reloaded page gets the room's history before new messages."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page

from test_examples import free_port

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "docs" / "chat.png"


@pytest_asyncio.fixture
async def chat() -> AsyncIterator[str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("TETHER_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-u", "examples/chat/app.py", "--port", str(port),
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        async with asyncio.timeout(30):
            while b"open http://" not in await process.stdout.readline():
                pass
            while True:  # the banner comes before uvicorn listens
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    await asyncio.sleep(0.05)
                    continue
                writer.close()
                break
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        await process.wait()


async def enter(browser: Browser, url: str, name: str) -> Page:
    page = await browser.new_page(viewport={"width": 900, "height": 600})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    setattr(page, "js_errors", errors)  # noqa: B010
    await page.goto(f"{url}/?name={name}")
    await page.wait_for_function("() => document.body.dataset.room === 'lobby'", timeout=15_000)
    return page


async def say(page: Page, text: str) -> None:
    await page.fill("#text", text)
    await page.press("#text", "Enter")


async def test_two_people_chat_with_presence_and_history(browser: Browser, chat: str) -> None:
    alice = await enter(browser, chat, "alice")
    bob = await enter(browser, chat, "bob")
    await alice.wait_for_function(
        "() => document.getElementById('people').textContent.includes('bob')"
    )
    assert await bob.locator("#people li").all_text_contents() == ["alice", "bob"]
    await say(alice, "hi bob")
    await say(bob, "hello alice")
    for page in (alice, bob):
        await page.wait_for_function("() => document.querySelectorAll('#log li').length === 2")
        assert await page.locator("#log li").all_text_contents() == [
            "alice: hi bob",
            "bob: hello alice",
        ]
    await bob.reload()  # history first, then live messages: nothing lost, nothing twice
    await bob.wait_for_function("() => document.body.dataset.room === 'lobby'")
    await say(alice, "welcome back")
    await bob.wait_for_function("() => document.querySelectorAll('#log li').length === 3")
    assert await bob.locator("#log li").all_text_contents() == [
        "alice: hi bob",
        "bob: hello alice",
        "alice: welcome back",
    ]
    if os.environ.get("CHAT_SCREENSHOT"):  # refresh docs/chat.png for the README
        await alice.wait_for_function("() => document.querySelectorAll('#log li').length === 3")
        await alice.screenshot(path=str(SCREENSHOT))
    await bob.close()
    await alice.wait_for_function(
        "() => !document.getElementById('people').textContent.includes('bob')"
    )
    assert alice.js_errors == [] and bob.js_errors == []  # type: ignore[attr-defined]
