"""The README's code runs as written: the docs may never drift from the code again."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import httpx

from tether import Client, SendStatus
from tether.monitoring import BackgroundServer
from tether.testing import MockWebSocket

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def python_block(after_heading: str) -> str:
    """The first ```python block after a heading of the README."""
    section = README[README.index(after_heading) :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"no python block after {after_heading!r}"
    return match.group(1)


async def test_fastapi_example_delivers_to_a_tether_client() -> None:
    namespace: dict[str, Any] = {}
    exec(
        compile(python_block("## Thirty seconds with FastAPI"), "README-fastapi", "exec"), namespace
    )
    app, hub = namespace["app"], namespace["hub"]
    async with BackgroundServer(app, lifespan="on", log_level="warning") as server:
        client = Client(server.ws_url + "/ws", client_id="alice", backoff_base=0.05)
        async with client:
            await client.wait_connected()
            async with httpx.AsyncClient(base_url=server.url) as http:
                answer = (await http.post("/orders/alice/shipped")).json()
            assert answer["status"] == SendStatus.SENT
            async with asyncio.timeout(5):
                message = await anext(aiter(client))
    assert message.seq == 1 and message.data == {"id": "ship-alice", "text": "your order shipped"}
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
