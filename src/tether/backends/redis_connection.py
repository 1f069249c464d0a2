"""Connections to one Redis server, a Redis Cluster or a Sentinel-managed master, via redis-py.

The command client, pub/sub connections and batched script calls, for each topology.

`RedisConnections(config)` picks the topology from `HubConfig` (`redis_cluster`,
`redis_sentinels`) and builds redis-py's own client for it; nothing here talks to Redis
until first used:

    single server  `redis.asyncio.Redis` on a `BlockingConnectionPool(max_connections=N)`
    Redis Cluster  `redis.asyncio.cluster.RedisCluster` from the seed URL
    Sentinel       `Sentinel(...).master_for(service)` on a blocking Sentinel pool

Concurrency is bounded and waits, never fails: beyond `redis_max_connections` (N)
commands or pipelines in flight, the next one waits for a free connection instead of
raising "Too many connections" (`MaxConnectionsError`, which redis-py's own pools and
cluster nodes raise). Single server and Sentinel: a blocking pool of N connections.
Cluster: at most N commands / pipelines in flight across the command client (so at most
N + 4 connections per node, the 4 for topology discovery), and `run_script_batch` keeps
its own blocking pool of N per node. The wait is bounded only by `pool_timeout` (None:
until a connection frees up; callers bound it with their own timeout). Pub/sub
connections are extra, one each.

No silent retries. Every client is built so that a failed command raises at once and is
never re-sent behind the caller's back (a non-idempotent script must not run twice):

    Redis        `retry=Retry(NoBackoff(), 0)`. The default (redis-py 8) retries a
                 command - and a whole pipeline - up to 10 times on ConnectionError /
                 TimeoutError with jittered backoff, after reconnecting.
    RedisCluster `retry=Retry(NoBackoff(), 0)`: the cluster-level retry count (default
                 10) that re-runs a command, or a pipeline's failed and *falsy-result*
                 commands, after re-discovering the topology. Per-node connections never
                 retry (redis-py hard-codes 0 there). Redirections are still followed -
                 MOVED / ASK / TRYAGAIN (up to 16 hops): the server refused those
                 commands without running them, so following them is safe.
    Sentinel     the master client as Redis above; the sentinel clients too, else a dead
                 sentinel costs ~10 backoff retries on every master lookup. A connection
                 asks the sentinels for the master each time it connects, and a command
                 that reaches a demoted master (READONLY) drops the connection and raises
                 `ConnectionError`, so the next command follows the promotion by itself.

A failure therefore surfaces exactly once, as `redis.exceptions.ConnectionError` or
`TimeoutError` (outcome of what was in flight: unknown) or `ResponseError` (the server
answered: the command ran and failed, or never ran - NOSCRIPT, MOVED, CLUSTERDOWN).

Findings the backend relies on (redis-py 8.1, Redis 7.0; tests/test_redis_topologies.py
and benchmarks/redis_topology_pipeline.py show them):

- A `register_script` object cannot be called with a cluster pipeline as `client`:
  `ClusterPipeline.evalsha` is on redis-py's blocked list and raises
  `RedisClusterException` at once. `pipe.execute_command("EVALSHA", sha, nkeys, *keys,
  *args)` works and is routed by the call's keys (all keys of one call must share a
  slot: hash-tag them).
- A cluster pipeline groups its commands by node and sends the per-node pipelines
  concurrently (one task per node, `asyncio.gather`); results come back in call order.
  But it routes every command in Python twice (the slot of every key, per command):
  10,000 EVALSHA in pipelines of 500 ran at 0.65-0.73x a single server's rate on a
  3-master cluster on the same host (three runs). `run_script_batch` groups the calls by
  the cluster's slot map itself and sends one plain pipeline per master, concurrently:
  0.78-1.01x the single server in the same runs. A MOVED call is re-read in the slot map
  and sent once to the node named (refused unrun, so that is safe); an ASK / TRYAGAIN one
  (its slot migrating) is reported not run: the calls declare a bucket key that never
  exists, so following ASK would start a second stream on the importing node.
- Per script round, redis-py's own client path is most of the cost in this process:
  taking a pooled connection (a condition, a timeout scope, a liveness probe), its
  observability events, and a task per socket write (`wait_for`, for the write timeout).
  One EVALSHA through `Redis.execute_command` cost ~400,000 instructions (callgrind), a
  3-node round through one client per node ~1.3 M. `run_script_batch` writes every node's
  pipeline on a connection it keeps between rounds, then reads the replies with
  `read_response`: ~200,000 and ~520,000. Still redis-py's connections, parser and
  errors; only the per-command wrapper is skipped.
- EVALSHA of an unknown script in a pipeline yields `NoScriptError` for those calls only
  (with `raise_on_error=False`); the script did not run, so loading it and re-running
  just those calls is safe (`run_script_batch` does). There is no automatic NOSCRIPT
  fallback in any pipeline; a single-server `Pipeline` handed a script object instead runs
  `SCRIPT EXISTS` (one extra round trip) before every `execute`. Scripts are not
  replicated: a replica promoted by Sentinel or Cluster failover, or a restarted server,
  answers NOSCRIPT.
- When a node dies, redis-py's cluster pipeline reports the calls routed to it as
  `ConnectionError` results if its connection was already open, but raises
  `ConnectionError` for the whole pipeline if it had to connect - and then the other
  nodes' calls ran or not (unknown). `run_script_batch` fails only the dead node's calls.
- With no cluster node reachable, redis-py raises `RedisClusterException` ("Redis Cluster
  cannot be connected"), which is not a `RedisError`; the client here raises
  `ConnectionError` instead (the original as its cause).
- redis-py's cluster client routes the commands it gets before it has discovered the
  slots to a random node; under concurrency the MOVED replies make it close every
  connection under the in-flight commands ("Connection closed by server", "Error UNKNOWN
  while writing to socket"). The bounded client here discovers first. A CLUSTERDOWN or
  uncovered-slot reply also makes redis-py close every connection of the client (in-flight
  commands on healthy nodes then fail with `ConnectionError`: unknown outcome); MOVED
  would too, every 5th time, unless `reinitialize_steps=0`, which this client sets.
- A single-server or Sentinel pipeline whose connection breaks mid-flight raises
  `ConnectionError` ("Connection closed by server." or "Error while reading from ...
  Connection reset by peer"); a prefix of it may have been applied and even replicated
  (one run: 217 of 500 INCRs of the cut pipeline were on the promoted replica, another: 0).
  Killing the Sentinel master: in-flight pipeline -> `ConnectionError`; then
  `ConnectionError` ("Error 111 connecting", ~1 s) while the sentinels still name the
  dead master, `MasterNotFoundError` (a `ConnectionError` subclass) while it is marked
  down, and writes succeed on the promoted replica ~2.3 s after the kill (down-after 1 s).
- Pub/sub on Cluster: a classic PUBLISH on any node reaches subscribers on every node (the
  cluster bus forwards it), but PUBLISH's reply counts only the receiving node's
  subscribers. PUBLISH through the cluster client goes to its default node; when that
  node dies one PUBLISH fails with `ConnectionError` before it moves on. redis-py's
  `RedisCluster.pubsub()` pins its connection to the node owning the first channel's slot
  and borrows it from that node's command pool; once that node dies it can only reconnect
  to the dead node. `pubsub()` here connects to any live node on a dedicated connection
  instead; after that node dies, `get_message` raises and the next `pubsub()` lands on a
  live node (messages published in between are lost).
- redis-py 8 speaks RESP3 by default (HELLO 3) and sends INCR as INCRBY key 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import hashlib
import logging
import random
from collections.abc import Awaitable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.connection import (
    AbstractConnection,
    BlockingConnectionPool,
    ConnectionPool,
    SSLConnection,
    parse_url,
)
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..config import HubConfig

__all__ = [
    "CommandClient",
    "LuaScript",
    "NotRun",
    "NotSent",
    "RedisConnections",
    "ScriptCall",
    "Topology",
    "redact_url",
    "refused",
    "slot_of",
]

K = TypeVar("K", str, bytes)

CommandClient = Redis | RedisCluster
"""What `RedisConnections.commands` is: both share the command methods and `pipeline()`."""

# A node that could not be reached (as opposed to one that answered with an error).
_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)

# Connections a cluster node may open beyond the command bound: topology discovery
# (CLUSTER SLOTS) borrows one from the node it asks while commands hold the rest.
_NODE_HEADROOM = 4


class Topology(StrEnum):
    """Which kind of Redis deployment the connections talk to."""

    SINGLE = "single"
    CLUSTER = "cluster"
    SENTINEL = "sentinel"


def _no_retry() -> Retry:
    return Retry(NoBackoff(), 0)


# Most keys asked about are the 128 bucket keys of batched calls, once per call or send:
# redis-py's CRC16 is pure Python (microseconds per key), a cache hit is not.
@functools.lru_cache(maxsize=4096)
def slot_of(key: str | bytes) -> int:
    """The Redis Cluster hash slot (0..16383) of `key`, honouring `{hash tags}`."""
    return int(key_slot(key.encode() if isinstance(key, str) else key))


def redact_url(url: str) -> str:
    """`url` without its password, for logs and `describe()`."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{parts.username or ''}:***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


# --------------------------------------------------------------------------- bounded clients


class _BlockingSentinelConnectionPool(SentinelConnectionPool, BlockingConnectionPool):
    """A Sentinel master pool that waits for a free connection instead of raising
    "Too many connections" (redis-py ships only the non-blocking Sentinel pool)."""


# Set while a task holds a bounded cluster client's permit, so commands the client issues
# on its own behalf inside that call (redirection fallbacks of a pipeline) do not wait for
# a second permit and deadlock when every permit is taken.
_holding: contextvars.ContextVar[object | None] = contextvars.ContextVar(
    "tether_redis_cluster_permit", default=None
)


class _BoundedRedisCluster(RedisCluster):
    """`RedisCluster` with at most `concurrency` commands and pipelines in flight; the
    rest wait (redis-py's cluster raises `MaxConnectionsError` instead)."""

    def __init__(self, *args: Any, concurrency: int = 64, **kwargs: Any) -> None:
        kwargs["max_connections"] = concurrency + _NODE_HEADROOM
        # 0: a MOVED reply only re-points its slot. Every 5th MOVED (the default) would
        # close every connection of the client, failing the commands in flight on the
        # healthy nodes too - with an unknown outcome.
        kwargs.setdefault("reinitialize_steps", 0)
        super().__init__(*args, **kwargs)
        self._permits = asyncio.Semaphore(concurrency)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if _holding.get() is self:
            return await super().execute_command(*args, **kwargs)
        if self._initialize:
            # Discover the slots before routing: redis-py resolves a command's routing
            # before its own lazy discovery, so the first commands of a fresh (or reset)
            # client go to a random node, bounce with MOVED and, several at once, make it
            # close every connection under the others' feet ("Connection closed by server").
            await self.initialize()
        async with self._permits:
            token = _holding.set(self)
            try:
                return await super().execute_command(*args, **kwargs)
            finally:
                _holding.reset(token)

    async def initialize(self, *args: Any, **kwargs: Any) -> RedisCluster:
        """Discover the topology; no reachable node raises `ConnectionError` (redis-py
        raises `RedisClusterException`, which is not even a `RedisError`)."""
        try:
            return await super().initialize(*args, **kwargs)
        except RedisClusterException as exc:
            if isinstance(exc.__cause__, _UNREACHABLE):
                raise RedisConnectionError(str(exc)) from exc
            raise

    def pipeline(
        self, transaction: Any | None = None, shard_hint: Any | None = None
    ) -> ClusterPipeline:
        if shard_hint:  # same refusal as the base class
            return super().pipeline(transaction, shard_hint)
        return _BoundedClusterPipeline(self, transaction)  # type: ignore[abstract]


class _BoundedClusterPipeline(ClusterPipeline):
    """A cluster pipeline whose `execute` takes one permit of its client's bound."""

    async def execute(
        self, raise_on_error: bool = True, allow_redirections: bool = True
    ) -> list[Any]:
        client = self.cluster_client
        assert isinstance(client, _BoundedRedisCluster)
        if _holding.get() is client:
            return await super().execute(raise_on_error, allow_redirections)
        async with client._permits:
            token = _holding.set(client)
            try:
                return await super().execute(raise_on_error, allow_redirections)
            finally:
                _holding.reset(token)


# --------------------------------------------------------------------------- scripts


@dataclass(frozen=True)
class LuaScript:
    """A Lua script by source and SHA1, for `RedisConnections.run_script_batch`."""

    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())


class ReplicationShortfall(RedisError):
    """The call ran on the master, but fewer replicas than required confirmed its writes
    within the timeout (WAIT): a failover now could lose it."""


class NotSent(RedisConnectionError):
    """A round that never left this process: no connection could be had for it (a pool
    exhausted past its wait, a node refusing connections). Nothing of it ran."""


class NotRun(ResponseError):
    """The server refused a call without running it, and following the refusal is not
    safe: ASK / TRYAGAIN while its slot migrates (a call re-run on the importing node
    would create a second stream there). Retryable once the migration is over."""


# Refusals before a script ran: nothing of it was stored. A script that had written
# something is never failed by these (Redis 7 checks them only before its first write).
_REFUSED_CODES = ("BUSY ", "NOREPLICAS ", "MISCONF ", "MASTERDOWN ", "CLUSTERDOWN ")


def refused(exc: BaseException) -> bool:
    """Whether `exc`, a call's error reply, means the server did not run the call (so
    nothing of it was stored): over maxmemory (OOM), a read-only replica, a cluster or
    master down, a busy server, too few replicas, a failing disk, a migrating slot.
    NOSCRIPT is also not run, but is handled (loaded and re-sent) where it arrives."""
    if isinstance(exc, OutOfMemoryError | ReadOnlyError | ClusterDownError | NotRun):
        return True
    return isinstance(exc, ResponseError) and str(exc).startswith(_REFUSED_CODES)


ScriptCall = tuple[Sequence[Any], Sequence[Any]]
"""One script invocation: (keys, args). All keys of one call must share a cluster slot."""


# --------------------------------------------------------------------------- connections


class RedisConnections:
    """The command client and pub/sub connections for the Redis deployment in `config`.

    `commands` is redis-py's own client (`Redis` or `RedisCluster`), bounded and without
    silent retries (see the module docstring). Construction does no I/O; the first
    command connects. Raises `ValueError` for a URL redis-py cannot use.
    """

    def __init__(
        self,
        config: HubConfig,
        *,
        socket_timeout: float = 2.0,
        connect_timeout: float = 1.0,
        client_name: str | None = None,
        pool_timeout: float | None = None,
    ) -> None:
        self.config = config
        self.max_connections = config.redis_max_connections
        self._url = config.redis_url
        url_options: dict[str, Any] = dict(parse_url(config.redis_url))
        url_options.pop("max_connections", None)  # the configured bound wins
        # URL query options win over ours, as in redis-py's from_url.
        self._connection_options: dict[str, Any] = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": connect_timeout,
            "retry": _no_retry(),
            "health_check_interval": 0,
            "client_name": client_name,
            **url_options,
        }
        self._sentinel: Sentinel | None = None
        self._master_options: dict[str, Any] = {}
        self._node_clients: dict[str, Redis] = {}
        # Connections the script rounds hold between rounds, per pool (see `_borrow`): at
        # most a quarter of the bound (none below 4), so commands and other rounds that
        # wait on the pool always get connections back.
        self._idle: dict[int, list[AbstractConnection]] = {}
        self._keep = min(4, self.max_connections // 4)
        self._pool_timeout = pool_timeout
        self._commands: CommandClient
        self._cluster: RedisCluster | None = None
        if config.redis_cluster:
            self.topology = Topology.CLUSTER
            self._commands = self._cluster = self._cluster_client()
        elif config.redis_sentinels:
            self.topology = Topology.SENTINEL
            self._sentinel, self._commands = self._sentinel_client(pool_timeout)
        else:
            self.topology = Topology.SINGLE
            pool = BlockingConnectionPool(
                max_connections=self.max_connections,
                timeout=pool_timeout,
                **self._connection_options,
            )
            self._commands = Redis.from_pool(pool)

    def _cluster_client(self) -> RedisCluster:
        options = {**self._connection_options}
        options.pop("db", None)  # db 0 only; the config refuses anything else
        if options.pop("connection_class", None) is SSLConnection:
            options["ssl"] = True  # rediss://
        return _BoundedRedisCluster(concurrency=self.max_connections, **options)

    def _sentinel_client(self, pool_timeout: float | None) -> tuple[Sentinel, Redis]:
        master_options = {
            key: value
            for key, value in self._connection_options.items()
            if key not in ("host", "port", "path", "connection_class")
        }
        if self._connection_options.get("connection_class") is SSLConnection:
            master_options["ssl"] = True  # rediss://: TLS to the master
        self._master_options = master_options
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(self.config.redis_sentinels),
            sentinel_kwargs={
                "socket_timeout": self._connection_options["socket_timeout"],
                "socket_connect_timeout": self._connection_options["socket_connect_timeout"],
                "retry": _no_retry(),
            },
        )
        master = sentinel.master_for(
            self.config.redis_sentinel_service,
            connection_pool_class=_BlockingSentinelConnectionPool,
            max_connections=self.max_connections,
            timeout=pool_timeout,
            **master_options,
        )
        return sentinel, master

    # ------------------------------------------------------------------ surface

    @property
    def commands(self) -> CommandClient:
        """The bounded command client (`Redis` or `RedisCluster`)."""
        return self._commands

    def describe(self) -> str:
        """Where the connections go, without secrets, e.g. for logs and `/health`."""
        url = redact_url(self._url)
        if self.topology is Topology.CLUSTER:
            assert isinstance(self._commands, RedisCluster)
            known = len(self._commands.get_nodes())
            seen = f", {known} nodes known" if known else ""
            return f"Redis Cluster via seed {url}{seen}"
        if self.topology is Topology.SENTINEL:
            sentinels = ",".join(f"{host}:{port}" for host, port in self.config.redis_sentinels)
            parts = urlsplit(url)
            db = parts.path.lstrip("/") or "0"
            return (
                f"Redis Sentinel service {self.config.redis_sentinel_service!r} via "
                f"{sentinels} (db {db})"
            )
        return f"Redis {url}"

    async def pubsub(self) -> PubSub:
        """A connected pub/sub connection of its own (not taken from the command bound).

        Single server: to the server. Sentinel: to the master the sentinels name now.
        Cluster: to a live node, tried in random order. It does not reconnect by itself:
        when its node fails, `get_message` raises `ConnectionError`; close it and call
        `pubsub()` again, which finds the current master / a live node. Raises
        `redis.exceptions.ConnectionError` or `TimeoutError` when no node is reachable.
        """
        if self.topology is Topology.CLUSTER:
            return await self._cluster_pubsub()
        pool: ConnectionPool
        if self._sentinel is not None:
            # Its own Sentinel pool: it asks the sentinels for the master as it connects.
            pool = SentinelConnectionPool(  # type: ignore[no-untyped-call]
                self.config.redis_sentinel_service,
                self._sentinel,
                is_master=True,
                max_connections=1,
                **self._master_options,
            )
        else:
            pool = ConnectionPool(max_connections=1, **self._connection_options)
        return await self._connected(PubSub(connection_pool=pool))

    async def _cluster_pubsub(self) -> PubSub:
        cluster = self._commands
        assert isinstance(cluster, RedisCluster)
        nodes = [(node.host, node.port) for node in cluster.get_nodes()]
        if not nodes:
            await cluster.initialize()  # first use: discover the nodes from the seed
            nodes = [(node.host, node.port) for node in cluster.get_nodes()]
        random.shuffle(nodes)
        options = {**self._connection_options}
        options.pop("db", None)
        last_error: Exception | None = None
        for host, port in nodes:
            pool = ConnectionPool(max_connections=1, **{**options, "host": host, "port": port})
            try:
                return await self._connected(PubSub(connection_pool=pool))
            except (RedisError, OSError) as exc:
                last_error = exc
        if last_error is None:
            raise RedisConnectionError("no Redis Cluster node is known")
        raise last_error

    @staticmethod
    async def _connected(pubsub: PubSub) -> PubSub:
        try:
            await pubsub.connect()  # type: ignore[no-untyped-call]
        except BaseException:
            await pubsub.aclose()  # type: ignore[no-untyped-call]
            raise
        return pubsub

    def node_of_slot(self, slot: int) -> str | None:
        """The cluster node ("host:port") serving hash slot `slot` by the current slot
        map; None on a single server or Sentinel, before the map is known or while the
        slot is not covered. Asked once per batched write: a plain lookup in redis-py's
        slot map (its `get_node_from_slot` and an `isinstance` check of the client, a
        Protocol, cost several times more)."""
        cluster = self._cluster
        if cluster is None:
            return None
        try:
            return str(cluster.nodes_manager.slots_cache[slot][0].name)
        except (KeyError, IndexError, TypeError):
            return None

    async def refresh_slots(self) -> None:
        """Re-read the cluster's slot map (after a call found its keys elsewhere)."""
        if isinstance(self._commands, RedisCluster):
            with contextlib.suppress(RedisError, OSError):
                await self._commands.nodes_manager.initialize()

    async def group_by_node(self, keys: Iterable[K]) -> dict[str, list[K]]:
        """`keys` grouped by the node ("host:port") serving them, in their given order.

        One group on a single server or Sentinel (named by the configured URL's address;
        the master may change). On Cluster the topology is discovered first if needed
        (raises `ConnectionError` when no node answers).
        """
        items = list(keys)
        if not isinstance(self._commands, RedisCluster):
            return {self._server_name(): items} if items else {}
        cluster = self._commands
        if not cluster.get_nodes():
            await cluster.initialize()
        groups: dict[str, list[K]] = {}
        for key in items:
            node = cluster.nodes_manager.get_node_from_slot(slot_of(key))
            groups.setdefault(node.name, []).append(key)
        return groups

    def _server_name(self) -> str:
        if self.topology is Topology.SENTINEL:
            return f"sentinel:{self.config.redis_sentinel_service}"
        host = self._connection_options.get("host", "127.0.0.1")
        return f"{host}:{self._connection_options.get('port', 6379)}"

    async def load_script(self, script: LuaScript) -> None:
        """Load `script` into the script cache (of every primary, on Cluster)."""
        await self._commands.script_load(script.source)

    async def run_script_batch(
        self,
        script: LuaScript,
        calls: Sequence[ScriptCall],
        *,
        replicas: int = 0,
        replica_timeout_ms: int = 0,
    ) -> list[Any]:
        """Run `script` once per (keys, args) call, all in one pipeline round: split per
        node and sent concurrently on Cluster.

        Returns one entry per call, in order: the script's reply, or the exception that
        call got - a `ResponseError` means the script ran and raised (or the server refused
        the call without running it); a `ConnectionError` / `TimeoutError` entry means
        that call's outcome is unknown. Calls answered NOSCRIPT (a node that never saw the
        script: restarted, freshly promoted) did not run; they are loaded and re-run once,
        which is why this never double-applies. Raises `ConnectionError` / `TimeoutError`
        when the round failed as a whole: then every call's outcome is unknown.

        With `replicas`, each pipeline ends with `WAIT replicas replica_timeout_ms`; the
        calls of a pipeline that fewer replicas confirmed come back as
        `ReplicationShortfall` (they ran on the master). It costs one round of
        replication latency per pipeline, not per call.
        """
        if not calls:
            return []
        wait = (replicas, replica_timeout_ms) if replicas > 0 else None
        results = await self._evalsha_round(script, calls, wait)
        missing = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
        if missing:
            retried: list[Any]
            try:
                await self.load_script(script)
                retried = await self._evalsha_round(script, [calls[i] for i in missing], wait)
            except Exception as exc:  # only these calls: the others ran and keep their replies
                retried = [exc] * len(missing)
            for index, result in zip(missing, retried, strict=True):
                results[index] = result
        return results

    async def _evalsha_round(
        self, script: LuaScript, calls: Sequence[ScriptCall], wait: tuple[int, int] | None
    ) -> list[Any]:
        cluster = self._cluster
        if cluster is not None:
            return await self._evalsha_round_per_node(cluster, script, calls, wait)
        single = self._commands
        assert not isinstance(single, RedisCluster)
        pool = single.connection_pool
        outcome = (await self._evalsha_on_pools(script, [(pool, calls)], wait))[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def _evalsha_round_per_node(
        self,
        cluster: RedisCluster,
        script: LuaScript,
        calls: Sequence[ScriptCall],
        wait: tuple[int, int] | None = None,
    ) -> list[Any]:
        """One plain pipeline per master, routed by the cluster's slot map and written
        straight on a connection of that node (not through `RedisCluster`'s per-command
        routing and retry machinery). A dead node fails only its own calls."""
        if not cluster.get_nodes():
            await cluster.initialize()
        slots = cluster.nodes_manager.slots_cache
        nodes: dict[str, ClusterNode] = {}
        groups: dict[str, list[int]] = {}
        for index, (keys, _) in enumerate(calls):
            try:
                node = slots[slot_of(keys[0])][0] if keys else cluster.get_random_node()
            except (KeyError, IndexError, TypeError):  # not covered: redis-py says so
                node = cluster.nodes_manager.get_node_from_slot(slot_of(keys[0]))
            name = node.name
            indices = groups.get(name)
            if indices is None:
                nodes[name] = node
                indices = groups[name] = []
            indices.append(index)
        # sorted by node: rounds running at once borrow connections in one order, so a
        # tight pool bound cannot make two of them wait for each other
        names = sorted(groups)
        jobs = [
            (
                self._node_pool(nodes[name]),
                [calls[index] for index in groups[name]] if len(groups) > 1 else calls,
            )
            for name in names
        ]
        outcomes = await self._evalsha_on_pools(script, jobs, wait)
        results: list[Any] = [None] * len(calls)
        node_failed = False
        for name, outcome in zip(names, outcomes, strict=True):
            indices = groups[name]
            if isinstance(outcome, Exception):
                # (a pool with every connection busy says nothing of the slot map)
                node_failed = node_failed or (
                    isinstance(outcome, _UNREACHABLE) and not _pool_busy(outcome)
                )
                for index in indices:
                    results[index] = outcome  # this node's calls: outcome unknown
            else:
                for index, result in zip(indices, outcome, strict=True):
                    results[index] = result
        if node_failed:
            with contextlib.suppress(RedisError, OSError):
                await cluster.nodes_manager.initialize()  # re-read the slot map
        # MOVED / ASK / TRYAGAIN: the node refused without running the call. MOVED (a
        # resharding or failover our map missed): re-sent once to the slot's owner. ASK /
        # TRYAGAIN (its slot is migrating): not followed - the calls declare a bucket key
        # that never exists, so the source always redirects, and a call re-run on the
        # importing node (ASKING) would start a second stream there while the first still
        # migrates. Reported as not run (retryable) instead.
        moved: list[int] = []
        for index, result in enumerate(results):
            if isinstance(result, MovedError):
                moved.append(index)
            elif isinstance(result, AskError | TryAgainError):
                results[index] = NotRun(
                    f"slot {_slot_named(calls[index])} migrating; retry ({result!r})"
                )
        if moved:
            with contextlib.suppress(RedisError, OSError):
                await cluster.nodes_manager.initialize()  # re-read the slot map
            for index in moved:
                results[index] = await self._resend_moved(
                    cluster, script, calls[index], results[index], wait
                )
        return results

    async def _resend_moved(
        self,
        cluster: RedisCluster,
        script: LuaScript,
        call: ScriptCall,
        moved: MovedError,
        wait: tuple[int, int] | None,
    ) -> Any:
        """`call`, answered MOVED, sent once to the node the redirection names; a second
        redirection is reported as not run."""
        node = cluster.get_node(host=moved.host, port=moved.port) or ClusterNode(
            moved.host, moved.port
        )
        job = (self._node_pool(node), [call])
        outcome = (await self._evalsha_on_pools(script, [job], wait))[0]
        result = outcome if isinstance(outcome, Exception) else outcome[0]
        if isinstance(result, AskError | TryAgainError):  # MOVED again, or migrating
            return NotRun(f"slot {_slot_named(call)} moving; retry ({result!r})")
        return result

    def _node_pool(self, node: ClusterNode) -> ConnectionPool:
        """The connection pool of one cluster node, bounded like the rest (per node)."""
        client = self._node_clients.get(node.name)
        if client is None:
            options = {**self._connection_options, "host": node.host, "port": node.port}
            options.pop("db", None)
            pool = BlockingConnectionPool(
                max_connections=self.max_connections, timeout=self._pool_timeout, **options
            )
            client = self._node_clients[node.name] = Redis.from_pool(pool)
        return client.connection_pool

    async def _borrow(self, pool: ConnectionPool) -> AbstractConnection:
        """A connection for a script round: one this round's predecessors left (it is
        either disconnected or has every reply read), else one from `pool`.

        Script rounds keep their connections instead of going through the pool for
        every round: taking and returning a pooled connection (condition variable,
        timeout scope, liveness probe, events) costs more than the round's own work.
        They keep at most as many as rounds ever ran at once (the batcher sends two),
        and never more than a quarter of the pool's bound, counted against it like any
        borrowed connection (the rest go back to the pool); `aclose` closes them with the
        pool."""
        idle = self._idle.get(id(pool))
        if idle:
            connection = idle.pop()
            reader = getattr(connection, "_reader", None)
            if reader is not None and reader.at_eof():
                # closed by the server while kept (idle `timeout`, CLIENT KILL): as the
                # pool would, reconnect instead of failing the round on a dead socket
                await connection.disconnect(nowait=True)
            return connection
        fresh: AbstractConnection = await pool.get_connection()  # type: ignore[no-untyped-call]
        return fresh

    async def _evalsha_on_pools(
        self,
        script: LuaScript,
        jobs: Sequence[tuple[ConnectionPool, Sequence[ScriptCall]]],
        wait: tuple[int, int] | None,
    ) -> list[list[Any] | Exception]:
        """Each job's calls of `script` as one pipeline on a connection of its pool, one
        entry per job: the replies (a call's `ResponseError` in its place), or the
        exception that job got - a `ConnectionError` / `TimeoutError` means its outcome is
        unknown unless it happened while connecting. Every pipeline is written before any
        reply is read, so the servers run them at the same time, with no task per server."""
        sha = script.sha
        outcomes: list[list[Any] | Exception] = []
        held: list[tuple[ConnectionPool, AbstractConnection] | None] = []
        unread: set[int] = set()  # jobs whose pipeline went out and is not fully read
        try:
            for pool, calls in jobs:
                commands: list[tuple[Any, ...]] = [
                    ("EVALSHA", sha, len(keys), *keys, *args) for keys, args in calls
                ]
                if wait is not None:
                    commands.append(("WAIT", *wait))
                try:
                    connection = await self._borrow(pool)
                except Exception as exc:  # no connection: nothing of this job was sent
                    unsent = NotSent(f"not sent, no connection: {exc}")
                    unsent.__cause__ = exc
                    outcomes.append(unsent)
                    held.append(None)
                    continue
                held.append((pool, connection))
                outcomes.append([])
                unread.add(len(held) - 1)
                try:
                    await _write(connection, connection.pack_commands(commands))
                except Exception as exc:
                    outcomes[-1] = await _in_doubt(connection, exc)
                    unread.discard(len(held) - 1)
            for number, entry in enumerate(held):
                if number not in unread:
                    continue
                assert entry is not None
                connection = entry[1]
                replies = outcomes[number]
                assert isinstance(replies, list)
                count = len(jobs[number][1]) + (wait is not None)
                try:
                    while len(replies) < count:
                        try:
                            replies.append(await connection.read_response())
                        except ResponseError as exc:  # that call's entry; the rest follow
                            replies.append(exc)
                except Exception as exc:  # redis-py has dropped the connection
                    outcomes[number] = await _in_doubt(connection, exc)
                else:
                    outcomes[number] = _confirmed(replies, wait)
                unread.discard(number)
        finally:
            for number, entry in enumerate(held):
                if entry is None:
                    continue
                pool, connection = entry
                if number in unread:  # cancelled with replies pending: never reuse it
                    await connection.disconnect(nowait=True)
                idle = self._idle.setdefault(id(pool), [])
                if len(idle) < self._keep:
                    idle.append(connection)
                else:
                    await pool.release(connection)
        return outcomes

    async def aclose(self) -> None:
        """Close every connection (the sentinel clients too). Idempotent."""
        try:
            await self._commands.aclose()
            for client in self._node_clients.values():
                await client.aclose()
            self._node_clients.clear()
            self._idle.clear()  # closed with their pools
        finally:
            if self._sentinel is not None:
                await self._sentinel.aclose()


async def _write(connection: AbstractConnection, packed: list[bytes]) -> None:
    """Write a packed pipeline on `connection`; on failure the connection is dropped
    and `ConnectionError` / `TimeoutError` raised (the server may have read part of it).

    redis-py's `send_packed_command` runs every write in a task of its own (`wait_for`,
    for its timeout) and so costs two event-loop turns; a socket write that fits in the
    transport's buffer does not wait at all. So a connected connection is written
    directly, and only a write that has to wait for the socket gets the timeout."""
    if not connection.is_connected:
        # `connect()`, as the pool does: a Sentinel connection asks for the master there
        # (writing on a dropped connection would reconnect to the old address)
        await connection.connect()  # type: ignore[no-untyped-call]
    writer = getattr(connection, "_writer", None)
    if writer is None:  # another redis-py's connection
        await connection.send_packed_command(packed, check_health=False)
        return
    try:
        writer.writelines(packed)
        if writer.transport.get_write_buffer_size():
            async with asyncio.timeout(connection.socket_timeout):
                await writer.drain()
        elif writer.transport.is_closing():
            raise ConnectionResetError("connection lost")
    except TimeoutError:
        await connection.disconnect(nowait=True)
        raise RedisTimeoutError("Timeout writing to socket") from None
    except OSError as exc:
        await connection.disconnect(nowait=True)
        raise RedisConnectionError(f"Error while writing to socket: {exc!r}") from exc
    except BaseException:
        await connection.disconnect(nowait=True)
        raise


def _pool_busy(exc: BaseException) -> bool:
    """Whether `exc` is a pool's "every connection is busy" (Redis itself is fine)."""
    return isinstance(exc, NotSent) and "No connection available" in str(exc)


def _slot_named(call: ScriptCall) -> int | str:
    keys = call[0]
    return slot_of(keys[0]) if keys else "?"


async def _in_doubt(connection: AbstractConnection, exc: Exception) -> Exception:
    """The failure of a pipeline that may have been (partly) written: what ran is
    unknown. Anything but a connection error or timeout (an unparsable reply, say) is
    reported as a `ConnectionError`, so that no caller takes it for a refusal; the
    connection is dropped (its replies no longer line up)."""
    if isinstance(exc, _UNREACHABLE):
        return exc
    await connection.disconnect(nowait=True)
    unknown = RedisConnectionError(f"reply unreadable, outcome unknown: {exc!r}")
    unknown.__cause__ = exc
    return unknown


def _confirmed(results: list[Any], wait: tuple[int, int] | None) -> list[Any]:
    """A pipeline's call results without its trailing WAIT reply; with fewer replicas
    than asked, the calls that ran become `ReplicationShortfall`."""
    if wait is None:
        return results
    acked, results = results[-1], results[:-1]
    if isinstance(acked, int) and acked >= wait[0]:
        return results
    shortfall = ReplicationShortfall(
        f"not confirmed by {wait[0]} replica(s) within {wait[1]} ms (got {acked!r})"
    )
    return [r if isinstance(r, Exception) else shortfall for r in results]


def never_sent(exc: BaseException) -> bool:
    """Whether a failed call certainly never reached Redis (so nothing was written): the
    connection could not be made, or none could be borrowed from the pool. Anything else
    after the call was written — a timeout, a connection lost mid-reply, a reply that
    could not be parsed — leaves the outcome unknown."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError | NotSent):
            return True
        if isinstance(seen, RedisConnectionError) and str(seen) == "No connection available.":
            return True  # redis-py's BlockingConnectionPool: waited, got none
        if isinstance(seen, RedisConnectionError) and "connecting to" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def spawn_logged(
    tasks: set[asyncio.Task[Any]], coroutine: Awaitable[Any], logger: logging.Logger, what: str
) -> None:
    """Run `coroutine` as a task kept in `tasks` until it ends; a failure is logged (never
    lost in an unawaited task), a cancellation passes."""

    async def guarded() -> None:
        try:
            await coroutine
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("tether: %s failed", what)

    task = asyncio.ensure_future(guarded())
    tasks.add(task)
    if isinstance(coroutine, Coroutine):
        # A task cancelled before it ran never awaited `coroutine`: close it, quietly.
        task.add_done_callback(lambda done: coroutine.close() if done.cancelled() else None)
    task.add_done_callback(tasks.discard)
