"""Test toolkit: mock transports with latency and failure injection, and assertion helpers."""

from ..clock import ManualClock
from .helpers import (
    assert_backoff_schedule,
    assert_metrics_delta,
    connect_mock_clients,
    create_mock_clients,
    drive_until,
    wait_for_circuit_state,
)
from .mock import MockSendError, MockWebSocket

__all__ = [
    "ManualClock",
    "MockSendError",
    "MockWebSocket",
    "assert_backoff_schedule",
    "assert_metrics_delta",
    "connect_mock_clients",
    "create_mock_clients",
    "drive_until",
    "wait_for_circuit_state",
]
