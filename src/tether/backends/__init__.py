"""Where a hub keeps outboxes, seqs and dedup keys: in memory, a SQLite file, or shared in Redis."""

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
    """The backend named by `TETHER_BACKEND` (`memory`, `sqlite` or `redis`). The sqlite
    one takes `config` (its `sqlite_path` and `sqlite_synchronous`) and `clock` from
    `options` and ignores the Redis ones. Raises ValueError for an unknown kind."""
    if kind == "memory":
        return MemoryBackend()
    if kind == "redis":
        from .redis import RedisBackend

        return RedisBackend(**options)  # type: ignore[arg-type]
    if kind == "sqlite":
        from typing import cast

        from ..clock import Clock
        from ..config import HubConfig
        from .sqlite import SqliteBackend

        config = options.get("config")
        if not isinstance(config, HubConfig):
            config = HubConfig(backend="sqlite")
        clock = cast("Clock | None", options.get("clock"))
        return SqliteBackend(config.sqlite_path, config, clock=clock)
    raise ValueError(f"unknown backend {kind!r}: expected 'memory', 'sqlite' or 'redis'")
