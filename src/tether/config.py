"""HubConfig: every setting of a hub, read from TETHER_* environment variables and validated."""

from __future__ import annotations

import ipaddress
from enum import StrEnum
from typing import Annotated, Any

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "TETHER_"


class ConfigError(ValueError):
    """A configuration value is invalid; the message names each offending variable."""


class OverflowPolicy(StrEnum):
    """What a full outbox does with one more critical message."""

    DROP_OLDEST = "drop_oldest"
    DROP_NEWEST = "drop_newest"
    REJECT = "reject"


class DedupMode(StrEnum):
    """How duplicate sends are recognised: by message id, by content hash, or not at all."""

    ID = "id"
    CONTENT = "content"
    OFF = "off"


class BackendKind(StrEnum):
    """Where outboxes, sequence counters and dedup keys live."""

    MEMORY = "memory"
    REDIS = "redis"
    SQLITE = "sqlite"


class SqliteSynchronous(StrEnum):
    """When the SQLite backend fsyncs: at every commit (survives power loss), or only
    at checkpoints (survives a process crash; power loss may take the last commits)."""

    FULL = "FULL"
    NORMAL = "NORMAL"


PositiveSeconds = Annotated[float, Field(gt=0, le=86_400 * 365)]


class HubConfig(BaseSettings):
    """Settings of a `Hub`.

    `HubConfig()` reads `TETHER_*` environment variables (and a `.env` file if present);
    keyword arguments win over the environment. A bad value raises `ConfigError` naming
    the variable, so a misconfigured process fails at start-up rather than at 3 a.m.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        case_sensitive=False,
        extra="forbid",
        validate_default=True,
        frozen=True,
    )

    # outbox
    max_queue_size: int = Field(1000, ge=1, le=10_000_000)
    overflow_policy: OverflowPolicy = OverflowPolicy.DROP_OLDEST
    message_ttl: PositiveSeconds = 300.0
    dead_letter_max_size: int = Field(1000, ge=1, le=10_000_000)

    # retry
    retry_interval: PositiveSeconds = 1.0
    retry_base_delay: PositiveSeconds = 1.0
    retry_max_delay: PositiveSeconds = 60.0
    max_retries: int = Field(5, ge=0, le=1000)

    # circuit breaker
    failure_threshold: int = Field(5, ge=1, le=100_000)
    success_threshold: int = Field(2, ge=1, le=100_000)
    recovery_timeout: PositiveSeconds = 60.0
    half_open_max_calls: int = Field(3, ge=1, le=100_000)

    # deduplication
    dedup_mode: DedupMode = DedupMode.ID
    dedup_window: PositiveSeconds = 300.0
    dedup_max_entries: int = Field(100_000, ge=1, le=100_000_000)

    # connections
    send_timeout: PositiveSeconds = 5.0
    heartbeat_interval: PositiveSeconds = 20.0
    heartbeat_timeout: PositiveSeconds = 20.0
    hello_timeout: PositiveSeconds = 10.0
    max_message_size: int = Field(1_048_576, ge=64, le=256 * 1_048_576)
    max_connections: int = Field(10_000, ge=1, le=10_000_000)
    max_clients: int = Field(100_000, ge=1, le=100_000_000)
    max_inbound_rate: float = Field(1000.0, gt=0, le=1_000_000)
    allowed_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Host header allowlist (DNS rebinding): empty means the loopback names when bound to
    # loopback, and no check when bound beyond it (see `effective_allowed_hosts`).
    allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    handshake_timeout: PositiveSeconds = 10.0

    # housekeeping
    client_ttl: PositiveSeconds = 3600.0
    cleanup_interval: PositiveSeconds = 300.0
    metrics_enabled: bool = True
    shutdown_timeout: PositiveSeconds = 5.0

    # backend
    backend: BackendKind = BackendKind.MEMORY
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = Field("tether", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    node_id: str | None = Field(None, min_length=1, max_length=128)
    presence_ttl: PositiveSeconds = 30.0
    # SQLite backend (one process; see tether.backends.sqlite): the store file, created
    # with its WAL and lock file beside it, and its fsync policy. NORMAL (measured: 1.1-2.2x
    # FULL's sends/s under 100 concurrent producers) survives any process crash, as Redis
    # without fsync-always does; FULL also survives power loss (docs/configuration.md).
    sqlite_path: str = Field("tether.db", min_length=1, max_length=4096)
    sqlite_synchronous: SqliteSynchronous = SqliteSynchronous.NORMAL
    # Redis topology (see tether.backends.redis_connection): one server by default; true
    # makes redis_url any seed node of a Redis Cluster; sentinels set => Sentinel mode,
    # where redis_url contributes only credentials and db.
    redis_cluster: bool = False
    redis_sentinels: Annotated[tuple[tuple[str, int], ...], NoDecode] = ()
    redis_sentinel_service: str = Field(
        "mymaster", min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$"
    )
    # Bound on commands in flight (and so connections) per Redis node; more wait their turn.
    redis_max_connections: int = Field(64, ge=1, le=10_000)
    # Acknowledge a critical send only once this many replicas have its write (Redis WAIT):
    # then a failover cannot lose an accepted message. 0: the master's word is enough.
    redis_min_replicas: int = Field(0, ge=0, le=64)
    redis_replica_timeout: PositiveSeconds = 0.25

    # serving and monitoring
    host: str = "127.0.0.1"
    port: int = Field(8765, ge=0, le=65535)
    # repr=False: secrets stay out of reprs, logs and tracebacks
    monitor_token: str | None = Field(None, repr=False)
    api_token: str | None = Field(None, repr=False)
    # Signed-token authentication of WebSocket clients (see tether.auth): when set, a
    # client's id comes from its token and it can never choose one itself.
    auth_secret: str | None = Field(None, repr=False)

    @field_validator("allowed_origins", "allowed_hosts", mode="before")
    @classmethod
    def _split_origins(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @field_validator("redis_sentinels", mode="before")
    @classmethod
    def _parse_sentinels(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list | tuple):
            return tuple(_sentinel_address(item) for item in value)
        return value

    @field_validator("monitor_token", "api_token")
    @classmethod
    def _non_empty_token(cls, value: str | None) -> str | None:
        if value is not None and len(value) < 8:
            raise ValueError("a token must be at least 8 characters (unset it to disable)")
        return value

    @field_validator("auth_secret")
    @classmethod
    def _strong_secret(cls, value: str | None) -> str | None:
        # HMAC keys shorter than this are guessable offline from one captured token
        if value is not None and len(value) < 16:
            raise ValueError("the secret must be at least 16 characters (unset it to disable)")
        return value

    @model_validator(mode="after")
    def _check_relations(self) -> HubConfig:
        if self.retry_max_delay < self.retry_base_delay:
            raise ValueError("retry_max_delay must be >= retry_base_delay")
        if self.redis_cluster and self.redis_sentinels:
            raise ValueError(
                "TETHER_REDIS_CLUSTER=true and TETHER_REDIS_SENTINELS are exclusive: "
                "a Redis Cluster fails over by itself, without Sentinel"
            )
        if self.redis_cluster and not self.redis_url.startswith(("redis://", "rediss://")):
            raise ValueError("TETHER_REDIS_URL must be redis:// or rediss:// in cluster mode")
        return self

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc)) from None

    @property
    def effective_allowed_hosts(self) -> list[str]:
        """The Host names (no port) requests must carry: `allowed_hosts`, or the loopback
        names when unset and bound to loopback; empty (no check) when bound beyond it."""
        if self.allowed_hosts:
            return list(self.allowed_hosts)
        return list(LOOPBACK_HOSTS) if _is_loopback_bind(self.host) else []

    @property
    def heartbeat_deadline(self) -> float:
        """How long a silent connection may live: interval plus timeout."""
        return self.heartbeat_interval + self.heartbeat_timeout


def _sentinel_address(item: Any) -> tuple[str, int]:
    """One Sentinel address from "host:port" (or "[v6]:port", or a (host, port) pair)."""
    if isinstance(item, list | tuple) and len(item) == 2:
        host, port = str(item[0]), item[1]
    elif isinstance(item, str) and ":" in item:
        host, _, port = item.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
    else:
        raise ValueError(f"expected host:port, got {item!r}")
    try:
        number = int(port)
    except (TypeError, ValueError):
        raise ValueError(f"bad port in {item!r}") from None
    if not host or not 0 < number <= 65535:
        raise ValueError(f"expected host:port with a port in 1..65535, got {item!r}")
    return (host, number)


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")


def _is_loopback_bind(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def env_name(field: str) -> str:
    """The environment variable that sets a `HubConfig` field."""
    return ENV_PREFIX + field.upper()


# Fields whose values must never be echoed into an error message (and so into logs).
SECRET_FIELDS = frozenset({"monitor_token", "api_token", "auth_secret"})


def describe_validation_error(exc: ValidationError) -> str:
    lines = ["invalid Tether configuration:"]
    for error in exc.errors():
        location = [str(part) for part in error.get("loc", ()) if part != "__root__"]
        name = env_name(location[0]) if location else "TETHER_* (combination)"
        value = error.get("input")
        secret = bool(location) and location[0] in SECRET_FIELDS
        shown = "" if isinstance(value, dict) or value is None or secret else f" (got {value!r})"
        lines.append(f"  {name}: {error.get('msg', 'invalid value')}{shown}")
    return "\n".join(lines)
