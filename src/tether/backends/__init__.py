"""Where a hub keeps outboxes, seqs and dedup keys: in memory, a SQLite file, or shared in Redis."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import (
    Accepted,
    Backend,
    BackendError,
    BackendEvents,
    OutcomeUnknown,
    Refused,
    StoredOutbox,
    StreamState,
)
from .memory import MemoryBackend

if TYPE_CHECKING:
    from ..clock import Clock
    from ..config import HubConfig

__all__ = [
    "Accepted",
    "Backend",
    "BackendError",
    "BackendEvents",
    "MemoryBackend",
    "OutcomeUnknown",
    "Refused",
    "StoredOutbox",
    "StreamState",
    "backend_for",
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

        from ..config import HubConfig as Config
        from .sqlite import SqliteBackend

        config = options.get("config")
        if not isinstance(config, Config):
            config = Config(backend="sqlite")
        clock = cast("Clock | None", options.get("clock"))
        return SqliteBackend(config.sqlite_path, config, clock=clock)
    raise ValueError(f"unknown backend {kind!r}: expected 'memory', 'sqlite' or 'redis'")


def backend_for(config: HubConfig, clock: Clock) -> Backend:
    """The backend a hub's config names. The clock turns hub-clock deadlines into
    wall-clock ones and back."""
    if config.backend.value == "memory":
        return MemoryBackend()
    return create_backend(
        config.backend.value,
        url=config.redis_url,
        prefix=config.redis_prefix,
        node_id=config.node_id,
        config=config,
        clock=clock,
    )
