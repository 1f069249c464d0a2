"""Opt-in pytest plugin: the `clock`, `hub_config`, `hub` and `mock_ws` fixtures.

Nothing loads it on its own (an installed library must not add fixtures to every test
suite in the environment). Turn it on with `pytest -p tether.testing.plugin`, or in a
conftest.py: `pytest_plugins = ["tether.testing.plugin"]`.

`clock`, `hub_config` and `mock_ws` need pytest only. `hub` is an async fixture and needs
pytest-asyncio; without it, a test that asks for `hub` fails with a message saying so
(the other fixtures still work).
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from ..clock import ManualClock
from ..config import HubConfig
from ..hub import Hub
from .mock import MockWebSocket

MISSING_PYTEST_ASYNCIO = (
    "the `hub` fixture of tether.testing.plugin is async and needs pytest-asyncio: "
    "install it (pip install pytest-asyncio), or build a Hub in your own async fixture"
)


@pytest.fixture
def clock() -> ManualClock:
    """A ManualClock: advance it instead of sleeping."""
    return ManualClock()


@pytest.fixture
def hub_config() -> HubConfig:
    """Override in a test module to change the `hub` fixture's settings."""
    return HubConfig(backend="memory")


@pytest.fixture
def mock_ws(clock: ManualClock) -> MockWebSocket:
    """A MockWebSocket whose latency (if set) runs on the test's manual clock."""
    return MockWebSocket(clock=clock)


async def started_hub(hub_config: HubConfig, clock: ManualClock) -> AsyncIterator[Hub]:
    """A started Hub on the manual clock, shut down after the test."""
    instance = Hub(hub_config, clock=clock)
    await instance.start()
    await asyncio.sleep(0)  # the background loops now wait on the manual clock
    try:
        yield instance
    finally:
        await instance.shutdown(timeout=0.25)


def hub_unavailable(hub_config: HubConfig, clock: ManualClock) -> Hub:
    """Stands in for `hub` when pytest-asyncio is not installed.

    Raises:
        pytest.fail.Exception: always, naming what to install.
    """
    pytest.fail(MISSING_PYTEST_ASYNCIO, pytrace=False)


def _hub_fixture() -> Callable[..., Any]:
    """The `hub` fixture: async through pytest-asyncio when it is installed."""
    if importlib.util.find_spec("pytest_asyncio") is None:
        return pytest.fixture(name="hub")(hub_unavailable)
    import pytest_asyncio

    return pytest_asyncio.fixture(name="hub")(started_hub)


hub = _hub_fixture()
