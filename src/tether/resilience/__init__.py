"""Delivery policies as small pure objects that take a clock: breaker, retry, dedup, outbox."""

from .breaker import BreakerPolicy, CircuitBreaker, CircuitState
from .dedup import DedupWindow, content_key
from .outbox import Outbox, PushOutcome
from .retry import RetryPolicy

__all__ = [
    "BreakerPolicy",
    "CircuitBreaker",
    "CircuitState",
    "DedupWindow",
    "Outbox",
    "PushOutcome",
    "RetryPolicy",
    "content_key",
]
