"""Where a hub keeps outboxes, sequence numbers and dedup keys: in memory, or shared in Redis."""

from .base import (
    Accepted,
    Backend,
    BackendError,
    BackendEvents,
    OutcomeUnknown,
    Refused,
    StoredOutbox,
)
from .memory import MemoryBackend

__all__ = [
    "Accepted",
    "Backend",
    "BackendError",
    "BackendEvents",
    "MemoryBackend",
    "OutcomeUnknown",
    "Refused",
    "StoredOutbox",
    "create_backend",
]


def create_backend(kind: str, **options: object) -> Backend:
    """The backend named by `TETHER_BACKEND` (`memory` or `redis`)."""
    if kind == "memory":
        return MemoryBackend()
    if kind == "redis":
        from .redis import RedisBackend

        return RedisBackend(**options)  # type: ignore[arg-type]
    raise ValueError(f"unknown backend {kind!r}: expected 'memory' or 'redis'")
