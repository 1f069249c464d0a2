"""The Redis backend: outboxes, seqs, dedup keys, presence and routing shared by many hub nodes.

The key layout is in `redis_keys`, the scripts in `redis_scripts`, the stream-entry and
pub/sub formats in `redis_wire`, the write batching in `redis_batch`. See
docs/operations.md for what each failure mode costs and what Tether reports.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import random
import secrets
import uuid
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from itertools import islice
from struct import Struct
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import orjson
from redis.asyncio.client import PubSub
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..clock import Clock, SystemClock
from ..config import HubConfig
from ..messages import DeadLetter, Envelope
from .base import (
    Accepted,
    BackendError,
    BackendEvents,
    NotReplicated,
    OutcomeUnknown,
    Refused,
    StoredOutbox,
    StreamState,
)
from .redis_batch import PIPELINE_ITEMS, Request, StreamBatcher
from .redis_connection import (
    CommandClient,
    LuaScript,
    RedisConnections,
    never_sent,
    slot_of,
    spawn_logged,
)
from .redis_keys import BUCKETS, RedisKeys
from .redis_scripts import SCRIPTS
from .redis_wire import WireCodec

log = logging.getLogger("tether.redis")

T = TypeVar("T")

# Errors that mean "Redis is not reachable right now" (as opposed to a bug or a script error),
# or a reply that could not be parsed (redis-py drops that connection): either way the
# command may have run, and an idempotent one is tried again.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    TimeoutError,
    InvalidResponse,
)

DEAD_LETTER_TTL_MS = 7 * 86_400 * 1000  # dead letters are for inspection, not forever
_LUA = {name: LuaScript(source) for name, source in SCRIPTS.items()}
MAX_UNKNOWN = 10_000  # appends with an unknown outcome remembered for a probing resend
# How far past the evicted entries' count `_own` looks at the head of a session's outbox:
# the copies the same append found expired (up to 64) may still be there ahead of them.
_OWN_SLACK = 72
_DIRECT = Accepted(0, direct=True)  # read-only: one answer for every direct write
# A binary append item (see `redis_scripts.APPEND`): flags, floor, known, keep ms and the
# base key's length, then the base key and the expected epoch, each after its length as a
# big-endian uint16 (both are short: checked client id and prefix, a hex epoch), and the
# dedup key after its length as a uint32 (a message id has no length limit of its own).
_ITEM_HEAD = Struct(">BqqqH")
_LENGTH = Struct(">H")
_KEY_LENGTH = Struct(">I")
_NO_TEXT = _LENGTH.pack(0)  # an empty epoch
_NO_KEY = _KEY_LENGTH.pack(0)  # no dedup key


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _redact(url: str) -> str:
    """The URL without its password, for describe() and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{user}:***@{host}" if user else f":***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisBackend:
    """Shared, durable storage and routing for a cluster of hub nodes on one Redis.

    Failure policy: while Redis is unreachable every operation raises `BackendError`
    (counted in `errors`), so critical sends are REJECTED with "backend unavailable: …"
    rather than accepted into a store that could lose them — or, when a write was sent
    and its reply never came, `OutcomeUnknown`; connections and best-effort delivery to
    clients on this node keep working; the pub/sub listener reconnects by itself with
    backoff and, once back, rings every local client in case a doorbell was missed.

    Concurrency into Redis is bounded (`redis_max_connections`): callers wait for a
    connection instead of failing, and stream writes are coalesced into pipelines by
    `StreamBatcher`.
    """

    name = "redis"
    durable = True
    shared = True

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        prefix: str = "tether",
        node_id: str | None = None,
        config: HubConfig | None = None,
        *,
        clock: Clock | None = None,
        socket_timeout: float = 2.0,
        connect_timeout: float = 1.0,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.node_id = node_id or f"node-{uuid.uuid4().hex[:12]}"
        self.config = config if config is not None else HubConfig(backend="redis")
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.errors = 0
        self.keys = RedisKeys(prefix)
        self._prefix_bytes = prefix.encode("utf-8")
        self.wire = WireCodec(self.clock)
        self._socket_timeout = socket_timeout
        self._connect_timeout = connect_timeout
        cfg = self.config
        self._policy = cfg.overflow_policy.value
        self._max = cfg.max_queue_size
        self._dedup_ms = _ms(cfg.dedup_window)
        self._dedup_on = cfg.dedup_mode.value != "off"
        self._dedup_by_id = cfg.dedup_mode.value == "id"
        self._presence_ms = _ms(cfg.presence_ttl)
        # Keys of a client outlive its last activity by client_ttl (or the message TTL):
        # an abandoned client's data goes away on its own.
        self._keep_ms = _ms(max(cfg.client_ttl, cfg.message_ttl))
        # A tombstone must outlive the old node's cached outbox, which lives at most a TTL.
        self._tombstone_ms = _ms(max(cfg.presence_ttl, cfg.message_ttl))
        self._replicas = cfg.redis_min_replicas
        self._replica_timeout_ms = _ms(cfg.redis_replica_timeout)
        self._cluster = cfg.redis_cluster
        self._node_keys: dict[str, str] = {}  # a key served by each Cluster node
        self._bucket_keys = [self.keys.slot_key(bucket) for bucket in range(BUCKETS)]
        self._bucket_slots = [slot_of(key) for key in self._bucket_keys]
        self._conn: RedisConnections | None = None
        self._events: BackendEvents | None = None
        self._redis: CommandClient | None = None
        self._shas = {name: script.sha for name, script in _LUA.items()}
        self._batcher: StreamBatcher | None = None
        self._claimed: set[str] = set()  # clients connected to this node
        # (client id, message id) of appends whose outcome stayed unknown: a resend of
        # the same message looks for it in the stream before storing it again.
        self._unknown: dict[tuple[str, str], None] = {}
        self._bells: set[str] = set()  # doorbells scheduled but not yet handled
        self._tasks: list[asyncio.Task[None]] = []
        self._handlers: set[asyncio.Task[Any]] = set()
        self._ok = False  # the last command reached Redis
        self._listening = False  # the pub/sub listener is subscribed
        self._fail_fast_until = 0.0
        self._closed = False
        self.listener_reconnects = 0

    @property
    def store_slice(self) -> int | None:
        """A broadcast's copies per `append_many` call (see `Backend`): one pipeline's
        worth on a single server; on a Cluster one call, which the batcher splits per
        node (slices would multiply the pipelines by the number of nodes)."""
        return None if self._cluster else PIPELINE_ITEMS

    # ------------------------------------------------------------------ lifecycle

    def _connect(self) -> RedisConnections:
        """redis-py's own client for the configured topology (one server, Cluster or
        Sentinel): bounded, waiting for a free connection instead of failing with
        "Too many connections", and never retrying silently — a non-idempotent script
        (append) must never run twice behind our back. See `redis_connection`."""
        config = self.config
        if config.redis_url != self.url:
            config = config.model_copy(update={"redis_url": self.url})
        return RedisConnections(
            config,
            socket_timeout=self._socket_timeout,
            connect_timeout=self._connect_timeout,
            # Named, so `CLIENT LIST` shows which node holds which connection.
            client_name=f"tether:{self.prefix}:{self.node_id}",
            pool_timeout=self._socket_timeout,
        )

    async def start(self, events: BackendEvents) -> None:
        self._events = events
        self._conn = self._connect()
        self._redis = self._conn.commands
        # Two slots (the default): Redis runs one pipeline while the next waits, and
        # answers each on its own (see `StreamBatcher._start`).
        self._batcher = StreamBatcher(
            self._run_pipeline, regroup=self._bucket_of_item if self._cluster else None
        )
        try:
            await self._load_scripts()
        except BackendError as exc:  # run degraded; the listener keeps trying to get in
            log.warning("tether: Redis at %s unreachable at start: %s", _redact(self.url), exc)
        self._tasks = [
            asyncio.create_task(self._listen(), name="tether-redis-listener"),
            asyncio.create_task(self._refresh_loop(), name="tether-redis-presence"),
        ]

    async def _load_scripts(self) -> None:
        """Load every script (into every primary, on a Cluster). Needed again after a
        restart or a failover: scripts are not replicated."""

        async def op() -> None:
            assert self._conn is not None
            for script in _LUA.values():
                await self._conn.load_script(script)

        await self._call("script load", op)

    async def _eval(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """One script call (NOSCRIPT: loaded and run again — it did not run)."""
        sha = self._shas[name]

        async def op() -> Any:
            try:
                return await self._r.evalsha(sha, len(keys), *keys, *args)
            except NoScriptError:
                await self._r.script_load(_LUA[name].source)
                return await self._r.evalsha(sha, len(keys), *keys, *args)

        return await self._call(name, op)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._redis is not None and self._batcher is not None and self._claimed:
            # Leave tombstones for our clients so other nodes stop naming us as owner.
            entries = [(self._group(cid), self.keys.base(cid) + ";") for cid in self._claimed]
            with contextlib.suppress(BackendError):
                await self._batcher.submit("release", entries)
        self._claimed.clear()
        if self._batcher is not None:
            await self._batcher.close()
        pending = {*self._tasks, *self._handlers}
        # A cancel that lands as a library-level timeout fires can be swallowed (Python
        # 3.11's timeout/uncancel race): cancel again until every task has ended.
        for _ in range(50):
            pending = {task for task in pending if not task.done()}
            if not pending:
                break
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=0.1)
        self._tasks = []
        if self._redis is not None:
            with contextlib.suppress(Exception):
                assert self._conn is not None
                await self._conn.aclose()
            self._redis = None

    @property
    def healthy(self) -> bool:
        return self._ok and self._listening

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "durable": self.durable,
            "shared": self.shared,
            "node_id": self.node_id,
            "healthy": self.healthy,
            "errors": self.errors,
            "url": self._conn.describe() if self._conn is not None else _redact(self.url),
            "topology": self._conn.topology.value if self._conn is not None else None,
            "prefix": self.prefix,
            "local_clients": len(self._claimed),
            "listener_reconnects": self.listener_reconnects,
            "pipelines": self._batcher.pipelines if self._batcher else 0,
        }

    # ------------------------------------------------------------------ calling Redis

    def _failed(self, what: str, exc: BaseException) -> None:
        self.errors += 1
        self._ok = False
        log.warning("tether: Redis %s failed: %r", what, exc)

    def _gate(self) -> None:
        if self._redis is None:
            raise BackendError("backend not started or closed")
        # Real (loop) time, not the hub clock: sockets time out in real time.
        if self._fail_fast_until and asyncio.get_running_loop().time() < self._fail_fast_until:
            self.errors += 1
            raise BackendError("Redis unreachable (retrying shortly)")

    async def _call(self, what: str, op: Callable[[], Awaitable[T]], *, retry: bool = True) -> T:
        """Run one Redis operation. An idempotent one gets one more try on a fresh
        connection (a connection killed under us is not an outage); two failures in a
        row mean Redis is down, and for a moment later calls fail fast instead of each
        waiting for a connect timeout. A non-idempotent one (`retry=False`) that failed
        after it was sent raises `OutcomeUnknown`."""
        self._gate()
        attempts = 2 if retry else 1
        for attempt in range(attempts):
            try:
                result = await op()
            except _UNAVAILABLE as exc:
                self._failed(what, exc)
                if attempt + 1 == attempts:
                    if not retry and not never_sent(exc):
                        raise OutcomeUnknown(f"Redis {what}: no reply ({exc})") from exc
                    # Unreachable: for a moment, fail fast instead of waiting to connect
                    # (not for a pool whose connections are all busy: Redis is up).
                    if "No connection available" not in str(exc):
                        self._fail_fast_until = asyncio.get_running_loop().time() + 0.25
                    raise BackendError(f"Redis {what} failed: {exc}") from exc
                continue
            except RedisError as exc:
                self._failed(what, exc)
                raise BackendError(f"Redis {what} failed: {exc}") from exc
            self._ok = True
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    async def _run_pipeline(self, requests: list[Request]) -> list[Any]:
        """The batcher's runner: every call in one round (per node, concurrently, on a
        Cluster), replies or per-call errors in order. Not retried as a whole: the
        scripts may have run. A call answered NOSCRIPT did not run and is re-sent."""
        header = [self._max, self._policy, self._dedup_ms, self._fresh()]
        by_script: dict[str, list[int]] = {}
        calls: list[tuple[list[str], list[Any]]] = []
        for index, request in enumerate(requests):
            group = request.group
            key = [self._node_keys.get(group, group) if isinstance(group, str) else "-"]
            if request.script == "append":
                now_ms = self.wire.wall_ms(self.clock.now())
                args = [*header, request.payloads, request.items, now_ms]
            elif request.script == "release":
                args = [self.node_id, self._tombstone_ms, request.items]
            else:
                args = [request.items]
            calls.append((key, args))
            by_script.setdefault(request.script, []).append(index)

        async def op() -> list[Any]:
            assert self._conn is not None
            conn = self._conn
            batches = [
                conn.run_script_batch(
                    _LUA[name],
                    [calls[i] for i in indices] if len(by_script) > 1 else calls,
                    replicas=self._replicas if name == "append" else 0,
                    replica_timeout_ms=self._replica_timeout_ms,
                )
                for name, indices in by_script.items()
            ]
            # one script (the common case): awaited here, not in a task of its own
            rounds = [await batches[0]] if len(batches) == 1 else await asyncio.gather(*batches)
            replies: list[Any] = [None] * len(requests)
            for indices, results in zip(by_script.values(), rounds, strict=True):
                for index, result in zip(indices, results, strict=True):
                    replies[index] = result
            if any(isinstance(r, _UNAVAILABLE) for r in replies):
                self._failed("pipeline", next(r for r in replies if isinstance(r, _UNAVAILABLE)))
            if any(isinstance(r, ResponseError) and "non local key" in str(r) for r in replies):
                await conn.refresh_slots()  # a slot moved: the next batches group anew
            return replies

        return await self._call("pipeline", op, retry=False)

    @staticmethod
    def _fresh() -> str:
        return secrets.token_hex(6)

    @property
    def _r(self) -> CommandClient:
        if self._redis is None:
            raise BackendError("backend not started or closed")
        return self._redis

    @property
    def _b(self) -> StreamBatcher:
        if self._batcher is None:
            raise BackendError("backend not started or closed")
        return self._batcher

    # ------------------------------------------------------------------ critical messages

    def _group(self, client_id: str) -> Hashable:
        """The script call a client's item joins: one per Cluster node (the batched
        scripts may touch many slots of one node), one for everything on a single Redis.
        Asked for every write on a Cluster, so the client's bucket is remembered and the
        node is read straight from redis-py's live slot map (never a stale copy: a call
        grouped by an old map would touch keys of another node)."""
        if not self._cluster:
            return 0
        bucket = self.keys.bucket(client_id)
        assert self._conn is not None
        node = self._conn.node_of_slot(self._bucket_slots[bucket])
        if node is None:  # slot map not known yet: one call per bucket is always right
            return self._bucket_keys[bucket]
        self._node_keys[node] = self._bucket_keys[bucket]  # any key of that node routes it there
        return node

    def _bucket_of_item(self, item: Any) -> str:
        """The bucket key of a binary append item's client (its base key up to the
        bucket's hash tag: see `RedisKeys`), for a call sent again per bucket."""
        (length,) = _LENGTH.unpack_from(item, _ITEM_HEAD.size - _LENGTH.size)
        base: bytes = item[_ITEM_HEAD.size : _ITEM_HEAD.size + length]
        end = base.index(b"}", len(self._prefix_bytes) + 1) + 1
        return base[:end].decode("utf-8")

    def _items(
        self, items: Sequence[tuple[StreamState, Envelope, bool]], probe: bool
    ) -> list[bytes]:
        """Append items, binary-packed (see `redis_scripts.APPEND`), for envelopes that
        share their payload (one send, or a broadcast's copies: one message id, TTL and
        dedup key), so what is the same for every item is packed once — a broadcast packs
        1,000 per call. Binary, so that the script reads each number without converting
        text (a string-to-number conversion in Redis's Lua is a strtod)."""
        now = self.clock.now()
        first = items[0][1]
        # The keys live at least as long as the message (and client_ttl).
        keep = max(self._keep_ms, int((first.expires_at - now) * 1000))
        dedup = (first.dedup_key or "").encode("utf-8", "surrogatepass") if self._dedup_on else b""
        keyed_tail, plain_tail = _KEY_LENGTH.pack(len(dedup)) + dedup, _NO_KEY
        message_id = first.message_id
        unknown = self._unknown
        base_of = self.keys.base_bytes
        head = _ITEM_HEAD.pack
        length = _LENGTH.pack
        join = b"".join
        texts: list[bytes] = []
        add = texts.append
        for session, envelope, local in items:
            cid = session.client_id
            if dedup and session.dedup is not None:
                flags, tail = 1, keyed_tail
            else:
                flags, tail = 0, plain_tail
            if probe or (unknown and (cid, message_id) in unknown):
                flags |= 2  # an attempt whose reply was lost may have stored it: look first
            base = base_of(cid)
            # With `local` the session mirrors the stream: seqs below its next_seq are
            # already in it, and anything between that and ours was stored by other nodes
            # (a doorbell still on its way) and comes back as the gap, to keep FIFO.
            if local:
                if envelope.direct:
                    flags |= 4  # write it directly if nothing of the client's is held anywhere
                floor = session.next_seq - 1
                epoch = session.epoch
                expect = epoch.encode() if epoch else b""  # an epoch is hex: ASCII
                add(
                    join(
                        (
                            head(flags, floor, floor, keep, len(base)),
                            base,
                            length(len(expect)),
                            expect,
                            tail,
                        )
                    )
                )
            else:
                add(join((head(flags, 0, -1, keep, len(base)), base, _NO_TEXT, tail)))
        return texts

    def _submit_appends(
        self, items: Sequence[tuple[StreamState, Envelope, bool]], *, gate: bool = True
    ) -> asyncio.Future[list[Any]]:
        """One ticket for envelopes that share their payload (see `_items`)."""
        if gate:
            self._gate()
        texts = self._items(items, probe=not gate)
        payload = self.wire.payload(items[0][1])
        if not self._cluster:
            return self._b.submit_group("append", 0, texts, payload)
        group = self._group
        entries = [(group(s.client_id), t) for (s, _, _), t in zip(items, texts, strict=True)]
        return self._b.submit("append", entries, payload)

    def _accepted(self, session: StreamState, envelope: Envelope, reply: Any) -> Accepted | Refused:
        if reply.__class__ is int:
            if reply == 0:  # cleared for a direct write (a stored message's seq is >= 1)
                return _DIRECT
            # stored in the epoch the session mirrors (the item's), or for a client
            # connected nowhere, whose session mirrors nothing
            envelope.seq = reply
            return Accepted(reply, (), (), False, session.epoch, None)
        if isinstance(reply, list):
            head, evicted, gap, expired = reply
        else:
            head, evicted, gap, expired = reply, None, None, None
        text = head.decode() if isinstance(head, bytes) else str(head)
        first = text[0]
        if first == "D":
            return Refused.DUPLICATE
        if first == "F":
            return Refused.FULL
        seq_text, changed, epoch, holder_text = text.split("|", 3)
        seq = envelope.seq = int(seq_text)
        # none, or a tombstone: nobody to ring
        holder = None if not holder_text or holder_text[0] == "~" else holder_text
        rolled = int(changed[1:]) if changed[0] == "r" else None
        if evicted is None:
            return Accepted(seq, (), (), changed != "0", epoch, holder, rolled_back_to=rolled)
        from_entry = self.wire.from_entry
        return Accepted(
            seq,
            self._own(session, evicted) if evicted else (),
            tuple(from_entry(e) for e in gap) if gap else (),
            changed != "0",
            epoch,
            holder,
            expired=tuple(from_entry(e) for e in expired) if expired else (),
            rolled_back_to=rolled,
        )

    def _own(self, session: StreamState, entries: list[Any]) -> tuple[Envelope, ...]:
        """Evicted entries as the envelopes the session holds for the same messages (by
        seq and message id), as `_stored` does: only those know whether the message was
        written and awaits its ack — such a message is not dropped (see
        `DeliveryPipeline._refused`). Evicted entries are the stream's oldest, so they are
        looked for only at the head of the session's outbox (behind at most the expired
        ones the same call removed), not in a dict of all of it: a full outbox under
        drop_oldest evicts on every append."""
        from_entry = self.wire.from_entry
        wanted = {}
        for entry in entries:
            envelope = from_entry(entry)
            wanted[(envelope.seq, envelope.message_id)] = envelope
        missing = len(wanted)
        for held in islice(session.outbox, len(entries) + _OWN_SLACK):
            key = (held.seq, held.message_id)
            if key in wanted and wanted[key] is not held:
                wanted[key] = held
                missing -= 1
                if not missing:
                    break
        return tuple(wanted.values())

    async def append(
        self, session: StreamState, envelope: Envelope, *, local: bool
    ) -> Accepted | Refused:
        """Store a critical message (in a pipeline with whatever else this event-loop turn
        stores). Raises `BackendError` when it was certainly not stored and
        `OutcomeUnknown` when it may have been."""
        self._gate()
        item = self._items([(session, envelope, local)], probe=False)[0]
        group = self._group(session.client_id) if self._cluster else 0
        future = self._b.submit_one("append", group, item, self.wire.payload(envelope))
        try:
            reply = await future
        except NotReplicated:  # stored on the master only: not accepted
            self._remember_unknown(session.client_id, envelope.message_id)
            raise
        except OutcomeUnknown as exc:
            outcome = (await self._resolve([(session, envelope, local)], exc))[0]
            if isinstance(outcome, BackendError):
                raise outcome from None
            if isinstance(outcome, Accepted) and outcome.holder not in (None, self.node_id):
                await self._ring_holders([(session, envelope, local)], [outcome])
            return outcome
        if self._unknown:
            self._unknown.pop((session.client_id, envelope.message_id), None)
        outcome = self._accepted(session, envelope, reply)
        if isinstance(outcome, Accepted) and outcome.holder not in (None, self.node_id):
            await self._ring_holders([(session, envelope, local)], [outcome])
        return outcome

    async def restore_append(
        self, session: StreamState, envelope: Envelope, epoch: str | None, seq: int | None
    ) -> Accepted | Refused | None:
        """Store again a copy its node held when the client's stream was found recreated
        or rolled back (see `DeliveryPipeline.restore`), which the caller found missing
        from the stream: its dedup key is recorded, not checked (it may have outlived the
        stream). None: skipped, as delivered — the stream is still `epoch` and its acked
        floor reached `seq` (another node delivered it from there meanwhile). Raises
        `BackendError` when it was not stored, or may not have been."""
        self._gate()
        dedup = b""
        if self._dedup_on and session.dedup is not None and envelope.dedup_key:
            dedup = envelope.dedup_key.encode("utf-8", "surrogatepass")
        flags = 8 | (1 if dedup else 0)
        expect = b""
        floor = 0
        if epoch and seq is not None:
            flags |= 16
            expect, floor = epoch.encode(), seq
        keep = max(self._keep_ms, int((envelope.expires_at - self.clock.now()) * 1000))
        base = self.keys.base_bytes(session.client_id)
        item = b"".join(
            (
                _ITEM_HEAD.pack(flags, floor, -1, keep, len(base)),
                base,
                _LENGTH.pack(len(expect)),
                expect,
                _KEY_LENGTH.pack(len(dedup)),
                dedup,
            )
        )
        group = self._group(session.client_id) if self._cluster else 0
        future = self._b.submit_one("append", group, item, self.wire.payload(envelope))
        try:
            reply = await future
        except OutcomeUnknown as exc:
            raise BackendError(f"outcome unknown: {exc}") from exc
        if reply == b"S" or reply == "S":
            return None
        outcome = self._accepted(session, envelope, reply)
        if isinstance(outcome, Accepted) and outcome.holder not in (None, self.node_id):
            await self._ring_holders([(session, envelope, False)], [outcome])
        return outcome

    async def append_many(
        self, items: Sequence[tuple[StreamState, Envelope, bool]]
    ) -> list[Accepted | Refused | BackendError]:
        """Store many envelopes sharing one payload (a broadcast's copies) in one ticket.
        An unknown outcome is settled by sending again: the dedup key makes that safe,
        and a duplicate answer means the first attempt stored it."""
        if not items:
            return []
        try:
            replies = await self._submit_appends(items)
        except NotReplicated as exc:  # stored on the master only: not accepted
            for session, envelope, _ in items:
                self._remember_unknown(session.client_id, envelope.message_id)
            return [exc] * len(items)
        except OutcomeUnknown as exc:
            resolved = await self._resolve(items, exc)
            await self._ring_holders(items, resolved)
            return resolved
        except BackendError as exc:
            return [exc] * len(items)
        unknown = self._unknown
        accepted = self._accepted
        outcomes: list[Accepted | Refused | BackendError] = []
        ring = False
        for (session, envelope, _), reply in zip(items, replies, strict=True):
            if reply.__class__ is BackendError:  # not run: its bucket's slot migrates
                outcomes.append(reply)
                continue
            if unknown:
                unknown.pop((session.client_id, envelope.message_id), None)
            outcome = accepted(session, envelope, reply)
            if not ring and isinstance(outcome, Accepted) and outcome.holder is not None:
                ring = outcome.holder != self.node_id
            outcomes.append(outcome)
        if ring:
            await self._ring_holders(items, outcomes)
        return outcomes

    async def _ring_holders(
        self,
        items: Sequence[tuple[StreamState, Envelope, bool]],
        outcomes: list[Accepted | Refused | BackendError],
    ) -> None:
        """Ring the nodes holding the connections of clients stored for here, before the
        producer hears QUEUED: a message it sends next (say, a best-effort broadcast) then
        cannot overtake the doorbell. One doorbell per node, naming all its clients. A lost
        doorbell is not a lost message: the listener rings everyone when it reconnects."""
        rings: dict[str, list[str]] = {}
        for (session, _, _), outcome in zip(items, outcomes, strict=True):
            if isinstance(outcome, Accepted) and outcome.holder not in (None, self.node_id):
                rings.setdefault(str(outcome.holder), []).append(session.client_id)
        for node, clients in rings.items():
            with contextlib.suppress(BackendError):
                await self._publish(self.keys.node_channel(node), self.wire.doorbell(clients))

    async def _publish(self, channel: str, message: bytes) -> None:
        await self._call("notify", lambda: self._r.publish(channel, message))

    async def _resolve(
        self, items: Sequence[tuple[StreamState, Envelope, bool]], unknown: OutcomeUnknown
    ) -> list[Accepted | Refused | BackendError]:
        """Send again, looking first: a message found already stored (its dedup key, or
        its id among the pending entries) was stored by the attempt whose reply was lost.
        When the second attempt fails too, the outcome stays unknown, and the next send of
        the same message id to the same client looks first as well."""
        try:
            replies = await self._submit_appends(items, gate=False)
        except BackendError as exc:
            again = OutcomeUnknown(f"{unknown}; a second attempt failed: {exc}")
            for session, envelope, _ in items:
                self._remember_unknown(session.client_id, envelope.message_id)
            return [again] * len(items)
        outcomes: list[Accepted | Refused | BackendError] = []
        stored_before: list[int] = []
        for (session, envelope, _), reply in zip(items, replies, strict=True):
            if isinstance(reply, BackendError):  # this attempt did not run (its slot moves)
                self._remember_unknown(session.client_id, envelope.message_id)
                outcomes.append(OutcomeUnknown(f"{unknown}; a second attempt failed: {reply}"))
                continue
            self._unknown.pop((session.client_id, envelope.message_id), None)
            head = _text(reply[0] if isinstance(reply, list) else reply)
            if head.startswith("D|"):  # the first attempt stored it
                envelope.seq = int(head[2:])
                stored_before.append(len(outcomes))
                outcomes.append(Accepted(envelope.seq, unmirrored=True))
            else:
                outcomes.append(self._accepted(session, envelope, reply))
        if stored_before:
            # A duplicate answer does not name the node holding the client's connection
            # (a stored reply does): asked for, so that the caller rings it.
            clients = list({items[index][0].client_id: None for index in stored_before})
            found = await asyncio.gather(*map(self._holder, clients))
            holders = dict(zip(clients, found, strict=True))
            for index in stored_before:
                holder = holders[items[index][0].client_id]
                if holder is not None:
                    seq = items[index][1].seq
                    assert seq is not None
                    outcomes[index] = Accepted(seq, holder=holder, unmirrored=True)
        return outcomes

    async def _holder(self, client_id: str) -> str | None:
        """The node holding `client_id`'s connection per presence; None when unknown."""
        with contextlib.suppress(BackendError):
            return await self.owner(client_id)
        return None

    def _remember_unknown(self, client_id: str, message_id: str) -> None:
        unknown = self._unknown
        unknown[(client_id, message_id)] = None
        while len(unknown) > MAX_UNKNOWN:  # bounded: the oldest are the least likely resent
            del unknown[next(iter(unknown))]

    async def ack(self, session: StreamState, seq: int) -> bool:
        cid = session.client_id
        group = self._group(cid) if self._cluster else 0
        item = f"{self.keys.base(cid)}|{seq}|{self._keep_ms}|{session.epoch or ''};"
        return int(await self._b.submit_one("ack", group, item)) >= 0

    async def ack_many(self, acks: Sequence[tuple[StreamState, int]]) -> list[bool]:
        keep = self._keep_ms
        entries = [
            (
                self._group(s.client_id),
                f"{self.keys.base(s.client_id)}|{seq}|{keep}|{s.epoch or ''};",
            )
            for s, seq in acks
        ]
        replies = await self._b.submit("ack", entries)
        return [int(reply) >= 0 for reply in replies]

    async def discard(self, session: StreamState, envelopes: list[Envelope]) -> None:
        await self._discard(session.client_id, session.epoch, envelopes)

    async def _discard(
        self, client_id: str, epoch: str | None, envelopes: Sequence[Envelope]
    ) -> None:
        """Delete stored copies of messages that left other than by delivery, each only
        while the stream is still `epoch` (the one the copies came from) and its entry at
        that seq is the same message: a stream recreated under this node numbers anew,
        and a stale copy's seq may now name another message (see `redis_scripts.DISCARD`)."""
        if not any(e.seq is not None for e in envelopes):
            return
        base = self.keys.base_bytes(client_id)
        expect = (epoch or "").encode()  # an epoch is hex: ASCII
        group = self._group(client_id) if self._cluster else 0
        entries: list[tuple[Hashable, bytes]] = []
        for envelope in envelopes:
            if envelope.seq is None:
                continue
            mid = envelope.message_id.encode("utf-8", "surrogatepass")
            head = b"%s|%s|%d|%d|" % (base, expect, envelope.seq, len(mid))
            entries.append((group, head + mid))
        self._gate()
        await self._b.submit("discard", entries)

    async def dead_letter(self, session: StreamState, letter: DeadLetter) -> None:
        data = letter.data
        record = {
            "client_id": letter.client_id,
            "message_id": letter.message_id,
            "seq": letter.seq,
            "attempts": letter.attempts,
            "reason": letter.reason,
            "failed_at": letter.failed_at,
            "data": base64.b64encode(data).decode("ascii") if isinstance(data, bytes) else data,
            "enc": "base64" if isinstance(data, bytes) else None,
        }
        key = self.keys.dead(session.client_id)
        size = self.config.dead_letter_max_size

        async def op() -> None:
            async with self._r.pipeline(transaction=False) as pipe:
                pipe.lpush(key, orjson.dumps(record))
                pipe.ltrim(key, 0, size - 1)
                pipe.pexpire(key, DEAD_LETTER_TTL_MS)
                await pipe.execute()

        await self._call("dead_letter", op)

    async def dead_letters(self, client_id: str) -> list[dict[str, Any]]:
        """The client's dead letters as stored in Redis (every node's), newest first."""
        key = self.keys.dead(client_id)
        raw = await self._call("dead_letters", lambda: self._r.lrange(key, 0, -1))
        return [orjson.loads(item) for item in raw]

    def _stored(self, session: StreamState, reply: list[Any], entries: Any) -> StoredOutbox:
        epoch, last, acked = reply[0], reply[1], reply[2]
        now = self.clock.now()
        # Reuse the objects the session already holds for the same message: they keep
        # their attempt counts (for dead-lettering) and cached frames.
        cached = {(e.seq, e.message_id): e for e in session.outbox}
        stored = StoredOutbox(
            next_seq=int(last or 0) + 1,
            acked=int(acked or 0),
            epoch=_text(epoch) if epoch else None,
        )
        for entry in entries:
            envelope = self.wire.from_entry(entry)
            envelope = cached.get((envelope.seq, envelope.message_id), envelope)
            if envelope.expires_at <= now:
                stored.expired.append(envelope)
            else:
                stored.envelopes.append(envelope)
        return stored

    async def _drop_expired(self, session: StreamState, stored: StoredOutbox) -> None:
        if stored.expired:
            with contextlib.suppress(BackendError):  # expired either way; retried next load
                # the epoch they were read from, which the session may not mirror yet
                await self._discard(session.client_id, stored.epoch, stored.expired)

    async def load(self, session: StreamState, *, after: int = 0) -> StoredOutbox | None:
        cid = session.client_id
        reply = await self._eval("load", [self.keys.meta(cid), self.keys.out(cid)], [after])
        stored = self._stored(session, reply, reply[3])
        await self._drop_expired(session, stored)
        return stored

    async def attach(
        self, session: StreamState, last_seq: int, epoch: str | None
    ) -> StoredOutbox | None:
        cid = session.client_id
        # Safe to retry: a second run finds the stream attached and settles nothing new.
        reply = await self._eval(
            "attach",
            [self.keys.meta(cid), self.keys.out(cid)],
            [
                last_seq,
                epoch or "",
                self._fresh(),
                self._keep_ms,
                self.wire.wall_ms(self.clock.now()),
            ],
        )
        stored = self._stored(session, reply, reply[4])
        stored.reset = bool(int(reply[3]))
        await self._drop_expired(session, stored)
        # a reset left out (and removed) what had expired: counted like the rest
        stored.expired.extend(self.wire.from_entry(entry) for entry in reply[5])
        return stored

    async def pending_count(self, client_id: str) -> int | None:
        out = self.keys.out(client_id)
        return int(await self._call("pending_count", lambda: self._r.xlen(out)))

    async def pending_counts(self, client_ids: list[str]) -> int | None:
        if not client_ids:
            return 0

        async def op() -> int:
            async with self._r.pipeline(transaction=False) as pipe:
                for cid in client_ids:
                    pipe.xlen(self.keys.out(cid))
                return sum(int(n) for n in await pipe.execute())

        return await self._call("pending_counts", op)

    # ------------------------------------------------------------------ best-effort dedup

    async def seen(self, session: StreamState, key: str) -> bool:
        if session.dedup is not None and session.dedup.seen(key):
            return True  # this node accepted it: no round trip needed
        dd = self.keys.dedup(session.client_id, key)
        return bool(await self._call("seen", lambda: self._r.exists(dd)))

    async def remember(self, session: StreamState, key: str) -> None:
        # The core has recorded it in the session's window (answers `seen` cheaply here).
        dd = self.keys.dedup(session.client_id, key)
        await self._call("remember", lambda: self._r.set(dd, b"1", px=self._dedup_ms))

    # ------------------------------------------------------------------ presence, routing

    def _presence_keys(self, client_id: str) -> list[str]:
        k = self.keys
        return [k.presence(client_id), k.meta(client_id), k.out(client_id)]

    async def claim(self, client_id: str) -> None:
        # First: if Redis is down now, the listener's recovery still rings this client.
        self._claimed.add(client_id)
        # A token of this claim: retried after a lost reply, the script answers the holder
        # the first run replaced (not this node), so that node is still kicked.
        token = secrets.token_hex(8)
        old = await self._eval(
            "claim",
            [*self._presence_keys(client_id), self.keys.claim(client_id)],
            [self.node_id, self._presence_ms, self._keep_ms, token],
        )
        seen = self.clock.wall()
        await self._call("clients", lambda: self._r.zadd(self.keys.clients, {client_id: seen}))
        holder = _text(old) if old else None
        if holder is not None:
            holder = holder.removeprefix("~")
            if holder != self.node_id:
                # The previous node must close its stale connection (if any) and drop its
                # cached outbox: this node holds the stream now.
                message = self.wire.kick(client_id, self.node_id)
                channel = self.keys.node_channel(holder)
                await self._call("kick", lambda: self._r.publish(channel, message))

    async def release(self, client_id: str) -> None:
        self._claimed.discard(client_id)
        await self._release_presence(client_id)

    async def _release_presence(self, client_id: str) -> None:
        """Tombstone our presence (batched with the other releases of this turn)."""
        group = self._group(client_id)
        await self._b.submit("release", [(group, self.keys.base(client_id) + ";")])

    async def owner(self, client_id: str) -> str | None:
        key = self.keys.presence(client_id)
        value = await self._call("owner", lambda: self._r.get(key))
        if value is None:
            return None
        holder = _text(value)
        return None if holder.startswith("~") else holder

    async def notify(self, node: str, client_id: str) -> None:
        message = self.wire.doorbell(client_id)
        channel = self.keys.node_channel(node)
        await self._call("notify", lambda: self._r.publish(channel, message))

    async def forward(self, node: str, client_id: str, envelope: Envelope) -> None:
        message = self.wire.forward(client_id, envelope)
        channel = self.keys.node_channel(node)
        await self._call("forward", lambda: self._r.publish(channel, message))

    async def publish_broadcast(self, envelope: Envelope, group: str | None) -> None:
        message = self.wire.broadcast(envelope, group, self.node_id)
        channel = self.keys.broadcast_channel
        await self._call("publish_broadcast", lambda: self._r.publish(channel, message))

    async def join(self, client_id: str, group: str) -> None:
        # The hub calls join/leave in the background: report, never raise into a lost task.
        key = self.keys.group(group)
        try:
            await self._call("join", lambda: self._r.sadd(key, client_id))
        except BackendError as exc:
            log.warning("tether: %s not recorded in group %s: %s", client_id, group, exc)

    async def leave(self, client_id: str, group: str) -> None:
        key = self.keys.group(group)
        try:
            await self._call("leave", lambda: self._r.srem(key, client_id))
        except BackendError as exc:
            log.warning("tether: %s not removed from group %s: %s", client_id, group, exc)

    async def members(self, group: str | None) -> set[str] | None:
        if group is None:
            key = self.keys.clients
            since = self.clock.wall() - self.config.client_ttl
            raw: Iterable[Any] = await self._call(
                "members", lambda: self._r.zrangebyscore(key, since, "+inf")
            )
        else:
            gkey = self.keys.group(group)
            raw = await self._call("members", lambda: self._r.smembers(gkey))
        try:  # redis-py answers bytes: decoded in C, 1,000 ids per critical broadcast
            return set(map(bytes.decode, raw))
        except TypeError:
            return {_text(m) for m in raw}

    # ------------------------------------------------------------------ background loops

    async def _refresh_loop(self) -> None:
        """Keep presence (and the keys of connected clients) alive while they are here."""
        interval = max(0.05, self.config.presence_ttl / 3)
        while not self._closed:
            await asyncio.sleep(interval)
            clients = list(self._claimed)
            if not clients or self._redis is None:
                continue
            try:
                await self._refresh(clients)
            except BackendError as exc:
                log.debug("tether: presence refresh failed: %s", exc)

    async def _refresh(self, clients: Iterable[str]) -> None:
        args = [self.node_id, self._presence_ms, self._keep_ms]
        ids = list(clients)
        now = self.clock.wall()

        async def op() -> list[Any]:
            assert self._conn is not None
            replies = await self._conn.run_script_batch(
                _LUA["refresh"], [(self._presence_keys(cid), args) for cid in ids]
            )
            await self._r.zadd(self.keys.clients, dict.fromkeys(ids, now))
            # Clients not seen for client_ttl leave the set a critical broadcast reaches.
            await self._r.zremrangebyscore(self.keys.clients, "-inf", now - self.config.client_ttl)
            return replies

        replies = await self._call("refresh", op)
        for cid, holder in zip(ids, replies, strict=False):
            if holder is None and cid in self._claimed:
                # Our presence had vanished, and with it (expiry, restart, FLUSHALL) maybe
                # the client's stream: ring ourselves, so the hub compares epochs and
                # closes a connection whose stream was recreated under it.
                self._bell(cid)

    async def _listen(self) -> None:
        """The pub/sub listener. It never dies quietly: any failure is counted, the
        connection is rebuilt with backoff and the channels re-subscribed; a connection
        that goes silent is caught by a ping."""
        failures = 0
        ping_every = 2.0
        first = True
        loop = asyncio.get_running_loop()
        while not self._closed:
            pubsub: PubSub | None = None
            try:
                assert self._conn is not None
                pubsub = await self._conn.pubsub()
                await pubsub.subscribe(
                    self.keys.node_channel(self.node_id), self.keys.broadcast_channel
                )
                self._listening = True
                self._ok = True
                if not first:
                    self.listener_reconnects += 1
                    log.warning("tether: Redis pub/sub listener reconnected")
                    with contextlib.suppress(BackendError):
                        await self._load_scripts()  # a failover or restart forgets them
                    self._ring_everyone()  # doorbells sent while we were away are lost
                first = False
                failures = 0
                # The loop's own clock: liveness of a socket is real time, not hub time.
                last_heard = loop.time()
                last_ping = last_heard
                while not self._closed:
                    message = await pubsub.get_message(timeout=0.5)
                    now = loop.time()
                    if message is not None:
                        last_heard = now
                        if message.get("type") == "message":
                            self._dispatch(message["channel"], message["data"])
                    if now - last_ping >= ping_every:
                        last_ping = now
                        await pubsub.ping()
                    if now - last_heard > 3 * ping_every:
                        raise RedisConnectionError("pub/sub connection went silent")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._listening = False
                if self._closed:
                    return
                self._failed("pub/sub listener", exc)
                failures += 1
                delay = random.uniform(0, min(5.0, 0.1 * 2 ** min(failures, 10)))
                await asyncio.sleep(delay)
            finally:
                self._listening = False
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _ring_everyone(self) -> None:
        for client_id in list(self._claimed):
            self._bell(client_id)

    def _spawn(self, coroutine: Awaitable[Any]) -> None:
        spawn_logged(self._handlers, coroutine, log, "handling a cluster event")

    def _bell(self, client_id: str) -> None:
        """Coalesce doorbells: one pending load per client is enough."""
        if client_id in self._bells or self._events is None:
            return
        self._bells.add(client_id)
        events = self._events

        async def ring() -> None:
            self._bells.discard(client_id)  # later doorbells schedule a new load
            await events.new_messages(client_id)

        self._spawn(ring())

    def _dispatch(self, channel: bytes | str, data: bytes | str) -> None:
        events = self._events
        if events is None:
            return
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError:
            log.warning("tether: ignoring a malformed cluster message on %r", channel)
            return
        name = _text(channel)
        if name == self.keys.broadcast_channel:
            origin = message.get("o", "")
            if origin != self.node_id:
                envelope = self.wire.from_wire(message["e"])
                self._spawn(events.broadcast(envelope, message.get("g"), origin))
            return
        kind, client_id = message.get("t"), message.get("c")
        if kind == "n" and isinstance(client_id, list):  # one doorbell for many clients
            for cid in client_id:
                if isinstance(cid, str):
                    self._bell(cid)
            return
        if not isinstance(client_id, str):
            return
        if kind == "n":
            self._bell(client_id)
        elif kind == "f":
            self._spawn(events.forwarded(client_id, self.wire.from_wire(message["e"])))
        elif kind == "k":
            self._spawn(self._kicked(client_id, str(message.get("n", "?"))))

    async def _kicked(self, client_id: str, node: str) -> None:
        # A kick can arrive after the client came back here: if the presence is ours
        # again, the kick is stale and must not close the new connection.
        if client_id in self._claimed:
            with contextlib.suppress(BackendError):
                if await self.owner(client_id) == self.node_id:
                    return
        self._claimed.discard(client_id)
        assert self._events is not None
        await self._events.kicked(client_id, node)


__all__ = ["RedisBackend"]
