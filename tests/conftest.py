"""Shared test setup; the `tether.testing` plugin provides the clock, hub and mock_ws fixtures."""

from __future__ import annotations

import os

import pytest

# In CI a missing service or browser is a failure, never a skip.
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
