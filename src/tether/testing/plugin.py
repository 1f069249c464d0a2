"""pytest plugin (entry point `pytest11`): `clock`, `hub_config`, `hub` and `mock_ws` fixtures."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from ..clock import ManualClock
from ..config import HubConfig
from ..hub import Hub
from .mock import MockWebSocket


@pytest.fixture
def clock() -> ManualClock:
    """A ManualClock: advance it instead of sleeping."""
    return ManualClock()


@pytest.fixture
def hub_config() -> HubConfig:
    """Override in a test module to change the `hub` fixture's settings."""
    return HubConfig(backend="memory")


@pytest_asyncio.fixture
async def hub(hub_config: HubConfig, clock: ManualClock) -> AsyncIterator[Hub]:
    """A started Hub on the manual clock, shut down after the test."""
    instance = Hub(hub_config, clock=clock)
    await instance.start()
    await asyncio.sleep(0)  # the background loops now wait on the manual clock
    try:
        yield instance
    finally:
        await instance.shutdown(timeout=0.25)


@pytest.fixture
def mock_ws(clock: ManualClock) -> MockWebSocket:
    """A MockWebSocket whose latency (if set) runs on the test's manual clock."""
    return MockWebSocket(clock=clock)
