"""HubConfig: every setting of a hub, from keywords, TETHER_* variables and `.env`, validated."""

from __future__ import annotations

import contextlib
import difflib
import ipaddress
import os
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

from dotenv import dotenv_values
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "TETHER_"
ENV_FILE = ".env"  # read from the working directory of the process, if it exists


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

    Each value comes from the first of: a keyword argument, a `TETHER_*` environment
    variable, a `TETHER_*` line of `.env` in the working directory, the default.

    Raises `ConfigError` when a value is invalid (the message names where it came from:
    the keyword, the command-line flag, the environment variable or the `.env` file), or
    when a keyword or a `TETHER_*` variable names no setting (with the closest valid
    name), so a misconfigured process fails at start-up rather than at 3 a.m.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=ENV_FILE,
        env_file_encoding="utf-8",
        case_sensitive=False,
        # Unknown keywords and TETHER_* names are refused by `ValueSources.unknown_names`
        # (with a suggestion); "ignore" lets a shared `.env` hold other programs' variables.
        extra="ignore",
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

    # channels
    channel_history_size: int = Field(1000, ge=1, le=10_000_000)
    channel_history_ttl: PositiveSeconds = 300.0
    channel_send_buffer: int = Field(1000, ge=1, le=10_000_000)

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
        sources = ValueSources.gather(values)
        unknown = sources.unknown_names()
        if unknown:
            raise ConfigError("\n".join(["invalid Tether configuration:", *unknown]))
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc, sources)) from None

    @classmethod
    def from_flags(cls, flags: Mapping[str, tuple[str, Any]], **values: Any) -> HubConfig:
        """A config where some values come from command-line flags.

        `flags` maps a field to `(flag, value)`, e.g. `{"port": ("--port", 70000)}`; the
        flag wins over keywords and the environment, and an error blames the flag.
        Raises `ConfigError` as `HubConfig()` does.
        """
        merged = {**values, **{field: value for field, (_, value) in flags.items()}}
        with _flag_names({field: flag for field, (flag, _) in flags.items()}):
            return cls(**merged)

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


# Set by `HubConfig.from_flags` while it builds a config: field -> the flag that set it.
_FLAGS: ContextVar[Mapping[str, str] | None] = ContextVar("tether_config_flags", default=None)


@contextlib.contextmanager
def _flag_names(names: Mapping[str, str]) -> Iterator[None]:
    token = _FLAGS.set(names)
    try:
        yield
    finally:
        _FLAGS.reset(token)


def _closest(name: str, valid: list[str]) -> str:
    # compared without the shared prefix, which would make every TETHER_* name look close
    bare = {v.removeprefix(ENV_PREFIX).lower(): v for v in valid}
    match = difflib.get_close_matches(
        name.removeprefix(ENV_PREFIX).lower(), list(bare), n=1, cutoff=0.6
    )
    return f"; did you mean {bare[match[0]]}?" if match else "; see docs/configuration.md"


class ValueSources:
    """Where each value of one `HubConfig(...)` call comes from, for exact error messages."""

    def __init__(
        self,
        keywords: Mapping[str, Any],
        flags: Mapping[str, str],
        environ: Mapping[str, str],
        dotenv: Mapping[str, str | None],
        dotenv_path: Path,
    ) -> None:
        self.keywords = keywords
        self.flags = flags
        # pydantic-settings matches names case-insensitively (case_sensitive=False)
        self.environ = {k.upper(): k for k in environ if k.upper().startswith(ENV_PREFIX)}
        self.dotenv = {k.upper(): k for k in dotenv if k.upper().startswith(ENV_PREFIX)}
        self.dotenv_path = dotenv_path

    @classmethod
    def gather(cls, keywords: Mapping[str, Any]) -> ValueSources:
        """Read the environment and `.env` (in the working directory) as pydantic-settings will."""
        path = Path.cwd() / ENV_FILE
        dotenv = dotenv_values(path, encoding="utf-8") if path.is_file() else {}
        return cls(keywords, _FLAGS.get() or {}, os.environ, dotenv, path)

    def unknown_names(self) -> list[str]:
        """One line per keyword or `TETHER_*` variable that names no setting."""
        fields = list(HubConfig.model_fields)
        variables = [env_name(f) for f in fields]
        lines = []
        for key in self.keywords:
            if key not in HubConfig.model_fields:
                where = self.flags.get(key) or f"HubConfig({key}=...)"
                lines.append(f"  {where}: no such setting{_closest(key, fields)}")
        for upper, original in sorted(self.environ.items()):
            if upper not in variables:
                lines.append(
                    f"  {original} (environment variable): no such setting"
                    f"{_closest(upper, variables)}"
                )
        for upper, original in sorted(self.dotenv.items()):
            if upper not in variables:
                lines.append(
                    f"  {original} (in {self.dotenv_path}): no such setting"
                    f"{_closest(upper, variables)}"
                )
        return lines

    def describe(self, field: str) -> str:
        """Where `field`'s value came from, as the user would name it."""
        if field in self.flags:
            return f"{self.flags[field]} (command-line flag)"
        if field in self.keywords:
            return f"HubConfig({field}=...)"
        variable = env_name(field)
        if variable in self.environ:
            return f"{self.environ[variable]} (environment variable)"
        if variable in self.dotenv:
            return f"{self.dotenv[variable]} (in {self.dotenv_path})"
        return f"{variable} (default)"


def describe_validation_error(exc: ValidationError, sources: ValueSources | None = None) -> str:
    """The lines of a `ConfigError`: each bad value, where it came from, and why."""
    sources = sources or ValueSources({}, {}, os.environ, {}, Path(ENV_FILE))
    lines = ["invalid Tether configuration:"]
    for error in exc.errors():
        location = [str(part) for part in error.get("loc", ()) if part != "__root__"]
        name = sources.describe(location[0]) if location else "TETHER_* (combination)"
        value = error.get("input")
        secret = bool(location) and location[0] in SECRET_FIELDS
        shown = "" if isinstance(value, dict) or value is None or secret else f" (got {value!r})"
        lines.append(f"  {name}: {error.get('msg', 'invalid value')}{shown}")
    return "\n".join(lines)


def format_bytes(size: int) -> str:
    """A size for people: 1048576 -> "1 MiB", 1536 -> "1.5 KiB", 100 -> "100 bytes"."""
    value = float(size)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            if unit == "bytes":
                return f"{size} bytes"
            return f"{value:.1f}".rstrip("0").rstrip(".") + f" {unit}"
        value /= 1024
    raise AssertionError("unreachable")
