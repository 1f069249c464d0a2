"""The Redis backend: outboxes, seqs, dedup keys, presence and routing shared by many hub nodes.

Key layout (every per-client key carries the client id as a hash tag, so one client's
keys live in one Redis Cluster slot and a Lua script may touch them together):

    {prefix}:{cid}:out        Stream, entry id "<seq>-0": the unacked critical messages
    {prefix}:{cid}:seq        INCR counter: the last seq handed out
    {prefix}:{cid}:acked      highest cumulative ack
    {prefix}:{cid}:dedup:<k>  SET NX PX dedup_window: an accepted dedup key
    {prefix}:{cid}:dead       List of dead letters (JSON), LTRIM'd to dead_letter_max_size
    {prefix}:{cid}:presence   node id holding the connection (PX presence_ttl), or
                              "~<node>" once that node let it go (a tombstone, so the
                              next node to claim it can tell the old one to drop its cache)
    {prefix}:clients          ZSET client id -> last seen (wall seconds): `members(None)`
    {prefix}:group:<name>     SET of client ids: `members(group)`

Pub/sub channels: {prefix}:node:<node_id> (doorbells, forwarded best-effort messages,
kicks) and {prefix}:broadcast (best-effort broadcasts). See docs/operations.md.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import orjson
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..clock import Clock, SystemClock
from ..config import HubConfig
from ..messages import DeadLetter, Envelope
from .base import Accepted, BackendError, BackendEvents, Refused, StoredOutbox

if TYPE_CHECKING:
    from ..session import ClientSession

log = logging.getLogger("tether.redis")

T = TypeVar("T")

# Errors that mean "Redis is not reachable right now" (as opposed to a bug or a script error).
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    TimeoutError,
)

DEAD_LETTER_TTL_MS = 7 * 86_400 * 1000  # dead letters are for inspection, not forever

# append: dedup check + seq + bound + add + dedup record + TTLs, atomically.
# KEYS: out, seq, acked, dedup (a dummy per-client key when there is no dedup key)
# ARGV: has_dedup, dedup_ms, max_size, policy, floor, keep_ms, known,
#       m (message id), d (data), t (type), x (expiry wall ms), c (created wall ms)
# Returns {0} duplicate, {-1} full, or {seq, evicted entries, gap entries}.
_APPEND = """
local out, seqk, acked, dd = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
if ARGV[1] == '1' and redis.call('EXISTS', dd) == 1 then return {0} end
local max = tonumber(ARGV[3])
local evicted = {}
local len = redis.call('XLEN', out)
if len >= max then
  if ARGV[4] ~= 'drop_oldest' then return {-1} end
  evicted = redis.call('XRANGE', out, '-', '+', 'COUNT', len - max + 1)
  for _, e in ipairs(evicted) do redis.call('XDEL', out, e[1]) end
end
local cur = redis.call('GET', seqk)
local floor = tonumber(ARGV[5])
if not cur and redis.call('EXISTS', out) == 1 then
  -- the counter vanished but the stream did not: never hand out an id below its top
  local info = redis.call('XINFO', 'STREAM', out)
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then
      local top = tonumber(string.match(info[i + 1], '^(%d+)'))
      if top > floor then floor = top end
    end
  end
end
if tonumber(cur or '0') < floor then redis.call('SET', seqk, floor) end
local seq = redis.call('INCR', seqk)
redis.call('XADD', out, seq .. '-0', 'm', ARGV[8], 'd', ARGV[9], 't', ARGV[10],
           'x', ARGV[11], 'c', ARGV[12])
if ARGV[1] == '1' then redis.call('SET', dd, '1', 'PX', ARGV[2]) end
local keep = tonumber(ARGV[6])
for _, k in ipairs({out, seqk, acked}) do
  if redis.call('EXISTS', k) == 1 and redis.call('PTTL', k) < keep then
    redis.call('PEXPIRE', k, keep)
  end
end
local known = tonumber(ARGV[7])
local gap = {}
if known >= 0 and seq > known + 1 then
  gap = redis.call('XRANGE', out, (known + 1) .. '-0', (seq - 1) .. '-0')
end
return {seq, evicted, gap}
"""

# ack: trim everything <= seq and raise the acked floor. KEYS: out, acked. ARGV: seq, keep_ms
_ACK = """
local seq = tonumber(ARGV[1])
redis.call('XTRIM', KEYS[1], 'MINID', (seq + 1) .. '-0')
local cur = tonumber(redis.call('GET', KEYS[2]) or '0')
if seq > cur then redis.call('SET', KEYS[2], seq, 'PX', ARGV[2]) end
return cur
"""

# claim: this node holds the connection now; returns the previous holder (maybe "~node").
# KEYS: presence, seq, acked, out. ARGV: node, presence_ms, keep_ms
# Keep the client's stream keys (KEYS[2..4]) alive at least ARGV[3] ms.
_KEEP_STREAM = """
for i = 2, 4 do
  if redis.call('EXISTS', KEYS[i]) == 1 and redis.call('PTTL', KEYS[i]) < tonumber(ARGV[3]) then
    redis.call('PEXPIRE', KEYS[i], ARGV[3])
  end
end
"""

_CLAIM = """
local old = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
""" + _KEEP_STREAM + """
return old
"""

# refresh: keep our presence alive (never steal it back). Same KEYS/ARGV as claim.
_REFRESH = """
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] or cur == false or cur == '~' .. ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
""" + _KEEP_STREAM + """
return cur
"""

# release: leave a tombstone only if the presence is still ours. KEYS: presence.
# ARGV: node, tombstone_ms
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], '~' .. ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""


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


class RedisBackend:
    """Shared, durable storage and routing for a cluster of hub nodes on one Redis.

    Failure policy: while Redis is unreachable every operation raises `BackendError`
    (counted in `errors`), so critical sends are REJECTED with "backend unavailable: …"
    rather than accepted into a store that could lose them; connections and
    best-effort delivery to clients on this node keep working; the pub/sub listener
    reconnects by itself with backoff and, once back, rings every local client in
    case a doorbell was missed.
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
        self._socket_timeout = socket_timeout
        self._connect_timeout = connect_timeout
        cfg = self.config
        self._policy = cfg.overflow_policy.value
        self._max = cfg.max_queue_size
        self._dedup_ms = _ms(cfg.dedup_window)
        self._presence_ms = _ms(cfg.presence_ttl)
        # Keys of a client outlive its last activity by client_ttl (or the message TTL):
        # an abandoned client's data goes away on its own.
        self._keep_ms = _ms(max(cfg.client_ttl, cfg.message_ttl) + 60)
        # A tombstone must outlive the old node's cached outbox, which lives at most a TTL.
        self._tombstone_ms = _ms(max(cfg.presence_ttl, cfg.message_ttl))
        self._node_channel = f"{prefix}:node:{self.node_id}"
        self._broadcast_channel = f"{prefix}:broadcast"
        self._events: BackendEvents | None = None
        self._redis: Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._claimed: set[str] = set()  # clients connected to this node
        self._bells: set[str] = set()  # doorbells scheduled but not yet handled
        self._tasks: list[asyncio.Task[None]] = []
        self._handlers: set[asyncio.Task[Any]] = set()
        self._ok = False  # the last command reached Redis
        self._listening = False  # the pub/sub listener is subscribed
        self._fail_fast_until = 0.0
        self._closed = False
        self.listener_reconnects = 0

    # ------------------------------------------------------------------ keys

    def _key(self, client_id: str, part: str) -> str:
        return f"{self.prefix}:{{{client_id}}}:{part}"

    def _channel(self, node: str) -> str:
        return f"{self.prefix}:node:{node}"

    # ------------------------------------------------------------------ lifecycle

    def _client(self) -> Redis:
        return Redis.from_url(
            self.url,
            socket_timeout=self._socket_timeout,
            socket_connect_timeout=self._connect_timeout,
            # No silent retries: a failure is counted by us, and a non-idempotent
            # script (append) must never run twice behind the caller's back.
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
            # Named, so `CLIENT LIST` shows which node holds which connection.
            client_name=f"tether:{self.prefix}:{self.node_id}",
        )

    async def start(self, events: BackendEvents) -> None:
        self._events = events
        self._redis = self._client()
        for name, source in (
            ("append", _APPEND),
            ("ack", _ACK),
            ("claim", _CLAIM),
            ("refresh", _REFRESH),
            ("release", _RELEASE),
        ):
            self._scripts[name] = self._redis.register_script(source)
        try:
            await self._call("ping", self._redis.ping)
        except BackendError as exc:  # run degraded; the listener keeps trying to get in
            log.warning("tether: Redis at %s unreachable at start: %s", _redact(self.url), exc)
        self._tasks = [
            asyncio.create_task(self._listen(), name="tether-redis-listener"),
            asyncio.create_task(self._refresh_loop(), name="tether-redis-presence"),
        ]

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
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
            # Leave tombstones for our clients so other nodes stop naming us as owner.
            with contextlib.suppress(BackendError):
                for client_id in list(self._claimed):
                    await self._release_presence(client_id)
            self._claimed.clear()
            with contextlib.suppress(Exception):
                await self._redis.aclose()
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
            "url": _redact(self.url),
            "prefix": self.prefix,
            "local_clients": len(self._claimed),
            "listener_reconnects": self.listener_reconnects,
        }

    # ------------------------------------------------------------------ calling Redis

    def _failed(self, what: str, exc: BaseException) -> None:
        self.errors += 1
        self._ok = False
        log.warning("tether: Redis %s failed: %r", what, exc)

    async def _call(self, what: str, op: Callable[[], Awaitable[T]], *, retry: bool = True) -> T:
        """Run one Redis operation. An idempotent one gets one more try on a fresh
        connection (a connection killed under us is not an outage); two failures in a
        row mean Redis is down, and for a moment later calls fail fast instead of each
        waiting for a connect timeout."""
        if self._redis is None:
            raise BackendError("backend not started or closed")
        if time.monotonic() < self._fail_fast_until:
            self.errors += 1
            raise BackendError("Redis unreachable (retrying shortly)")
        attempts = 2 if retry else 1
        for attempt in range(attempts):
            try:
                result = await op()
            except _UNAVAILABLE as exc:
                self._failed(what, exc)
                if attempt + 1 == attempts:
                    if retry:
                        self._fail_fast_until = time.monotonic() + 0.25
                    raise BackendError(f"Redis {what} failed: {exc}") from exc
                continue
            except RedisError as exc:
                self._failed(what, exc)
                raise BackendError(f"Redis {what} failed: {exc}") from exc
            self._ok = True
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    @property
    def _r(self) -> Redis:
        if self._redis is None:
            raise BackendError("backend not started or closed")
        return self._redis

    # ------------------------------------------------------------------ envelopes

    def _wall(self, monotonic: float) -> int:
        """A hub-clock deadline as wall-clock milliseconds (comparable across processes)."""
        return int((monotonic - self.clock.now() + self.clock.wall()) * 1000)

    def _local(self, wall_ms: int) -> float:
        return wall_ms / 1000 - self.clock.wall() + self.clock.now()

    @staticmethod
    def _kind(envelope: Envelope) -> tuple[str, bytes]:
        if isinstance(envelope.data, bytes):
            return "b", envelope.data
        data = envelope.data.encode("utf-8", "surrogatepass")
        return ("j" if envelope.data_json is not None else "s"), data

    @staticmethod
    def _data(kind: str, raw: bytes) -> tuple[str | bytes, bytes | None, str | None]:
        if kind == "b":
            return raw, None, "base64"
        text = raw.decode("utf-8", "surrogatepass")
        return text, (raw if kind == "j" else None), None

    def _from_entry(self, entry: Any) -> Envelope:
        entry_id, fields = entry
        seq = int(entry_id.split(b"-", 1)[0])
        f = {k.decode(): v for k, v in fields.items()} if isinstance(fields, dict) else {}
        if not f:  # RESP2 scripts return fields as a flat list
            flat = list(fields)
            f = {flat[i].decode(): flat[i + 1] for i in range(0, len(flat), 2)}
        data, data_json, enc = self._data(f["t"].decode(), f["d"])
        return Envelope(
            message_id=f["m"].decode(),
            data=data,
            data_json=data_json,
            critical=True,
            created_at=self._local(int(f["c"])),
            expires_at=self._local(int(f["x"])),
            enc=enc,
            seq=seq,
        )

    def _to_wire(self, envelope: Envelope) -> dict[str, Any]:
        kind, raw = self._kind(envelope)
        return {
            "i": envelope.message_id,
            "t": kind,
            "d": base64.b64encode(raw).decode("ascii")
            if kind == "b"
            else raw.decode("utf-8", "surrogatepass"),
            "x": self._wall(envelope.expires_at),
            "c": self._wall(envelope.created_at),
            "k": envelope.dedup_key,
            "q": envelope.seq,
            "r": envelope.critical,
        }

    def _from_wire(self, wire: dict[str, Any]) -> Envelope:
        kind = wire["t"]
        raw = (
            base64.b64decode(wire["d"])
            if kind == "b"
            else wire["d"].encode("utf-8", "surrogatepass")
        )
        data, data_json, enc = self._data(kind, raw)
        return Envelope(
            message_id=wire["i"],
            data=data,
            data_json=data_json,
            critical=bool(wire.get("r", False)),
            created_at=self._local(int(wire["c"])),
            expires_at=self._local(int(wire["x"])),
            enc=enc,
            seq=wire.get("q"),
            dedup_key=wire.get("k"),
        )

    # ------------------------------------------------------------------ critical messages

    async def append(
        self, session: ClientSession, envelope: Envelope, *, local: bool
    ) -> Accepted | Refused:
        cid = session.client_id
        key = envelope.dedup_key
        kind, raw = self._kind(envelope)
        ttl_ms = _ms(max(0.001, envelope.expires_at - self.clock.now()))
        # With `local` the session mirrors the stream: seqs below its next_seq are
        # already in it, and anything between that and ours was stored by other nodes
        # (a doorbell still on its way) and comes back as the gap, to keep FIFO.
        known = session.next_seq - 1 if local else -1
        floor = session.next_seq - 1 if local else 0
        keys = [
            self._key(cid, "out"),
            self._key(cid, "seq"),
            self._key(cid, "acked"),
            self._key(cid, "dedup:" + (key or "")),
        ]
        args: list[Any] = [
            "1" if key is not None and session.dedup is not None else "0",
            self._dedup_ms,
            self._max,
            self._policy,
            floor,
            max(self._keep_ms, ttl_ms),
            known,
            envelope.message_id,
            raw,
            kind,
            self._wall(envelope.expires_at),
            self._wall(envelope.created_at),
        ]
        script = self._scripts["append"]
        # Not retried: the script may have run before the connection died, and running
        # it twice would store the message twice. The caller gets REJECTED and may
        # resend (with a message id, dedup makes that safe).
        reply = await self._call("append", lambda: script(keys=keys, args=args), retry=False)
        head = int(reply[0])
        if head == 0:
            return Refused.DUPLICATE
        if head == -1:
            return Refused.FULL
        envelope.seq = head
        evicted = tuple(self._from_entry(e) for e in reply[1])
        if local:
            for missing in reply[2]:
                self._mirror(session, self._from_entry(missing))
            self._mirror(session, envelope)
            session.next_seq = max(session.next_seq, head + 1)
        if key is not None and session.dedup is not None:
            session.dedup.record(key)  # the local window answers best-effort checks cheaply
        return Accepted(head, evicted)

    @staticmethod
    def _mirror(session: ClientSession, envelope: Envelope) -> None:
        outcome = session.outbox.push(envelope)
        if not outcome.accepted:
            # Redis accepted it (Redis is the record and its bound already held), so the
            # local copy must not refuse it either.
            session.outbox.queue.append(envelope)

    async def ack(self, session: ClientSession, seq: int) -> None:
        cid = session.client_id
        keys = [self._key(cid, "out"), self._key(cid, "acked")]
        script = self._scripts["ack"]
        await self._call("ack", lambda: script(keys=keys, args=[seq, self._keep_ms]))

    async def discard(self, session: ClientSession, envelopes: list[Envelope]) -> None:
        ids = [f"{e.seq}-0" for e in envelopes if e.seq is not None]
        if ids:
            out = self._key(session.client_id, "out")
            await self._call("discard", lambda: self._r.xdel(out, *ids))

    async def dead_letter(self, session: ClientSession, letter: DeadLetter) -> None:
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
        key = self._key(session.client_id, "dead")
        size = self.config.dead_letter_max_size

        async def op() -> None:
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.lpush(key, orjson.dumps(record))
                pipe.ltrim(key, 0, size - 1)
                pipe.pexpire(key, DEAD_LETTER_TTL_MS)
                await pipe.execute()

        await self._call("dead_letter", op)

    async def dead_letters(self, client_id: str) -> list[dict[str, Any]]:
        """The client's dead letters as stored in Redis, newest first (for inspection)."""
        key = self._key(client_id, "dead")
        raw = await self._call("dead_letters", lambda: self._r.lrange(key, 0, -1))
        return [orjson.loads(item) for item in raw]

    async def load(self, session: ClientSession, *, after: int = 0) -> StoredOutbox | None:
        cid = session.client_id
        out, seqk, acked = (self._key(cid, p) for p in ("out", "seq", "acked"))

        async def op() -> list[Any]:
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.get(seqk)
                pipe.get(acked)
                pipe.xrange(out, f"{after + 1}-0" if after > 0 else "-", "+")
                result: list[Any] = await pipe.execute()
                return result

        last, floor, entries = await self._call("load", op)
        now = self.clock.now()
        # Reuse the objects the session already holds for the same message: they keep
        # their attempt counts (for dead-lettering) and cached frames.
        cached = {(e.seq, e.message_id): e for e in session.outbox}
        stored = StoredOutbox(next_seq=int(last or 0) + 1, acked=int(floor or 0))
        for entry in entries:
            envelope = self._from_entry(entry)
            envelope = cached.get((envelope.seq, envelope.message_id), envelope)
            if envelope.expires_at <= now:
                stored.expired.append(envelope)
            else:
                stored.envelopes.append(envelope)
        if stored.expired:
            with contextlib.suppress(BackendError):  # expired either way; retried next load
                await self.discard(session, stored.expired)
        return stored

    async def pending_count(self, client_id: str) -> int | None:
        out = self._key(client_id, "out")
        return int(await self._call("pending_count", lambda: self._r.xlen(out)))

    # ------------------------------------------------------------------ best-effort dedup

    async def seen(self, session: ClientSession, key: str) -> bool:
        if session.dedup is not None and session.dedup.seen(key):
            return True  # this node accepted it: no round trip needed
        dd = self._key(session.client_id, "dedup:" + key)
        return bool(await self._call("seen", lambda: self._r.exists(dd)))

    async def remember(self, session: ClientSession, key: str) -> None:
        if session.dedup is not None:
            session.dedup.record(key)
        dd = self._key(session.client_id, "dedup:" + key)
        await self._call("remember", lambda: self._r.set(dd, b"1", px=self._dedup_ms))

    # ------------------------------------------------------------------ presence, routing

    def _presence_keys(self, client_id: str) -> list[str]:
        return [self._key(client_id, p) for p in ("presence", "seq", "acked", "out")]

    async def claim(self, client_id: str) -> None:
        # First: if Redis is down now, the listener's recovery still rings this client.
        self._claimed.add(client_id)
        keys = self._presence_keys(client_id)
        script = self._scripts["claim"]
        args = [self.node_id, self._presence_ms, self._keep_ms]

        async def op() -> Any:
            async with self._r.pipeline(transaction=False) as pipe:
                await script(keys=keys, args=args, client=pipe)
                pipe.zadd(f"{self.prefix}:clients", {client_id: time.time()})
                return (await pipe.execute())[0]

        old = await self._call("claim", op)
        holder = old.decode() if isinstance(old, bytes) else None
        if holder is not None:
            holder = holder.removeprefix("~")
            if holder != self.node_id:
                # The previous node must close its stale connection (if any) and drop its
                # cached outbox: this node holds the stream now.
                message = orjson.dumps({"t": "k", "c": client_id, "n": self.node_id})
                channel = self._channel(holder)
                await self._call("kick", lambda: self._r.publish(channel, message))

    async def release(self, client_id: str) -> None:
        self._claimed.discard(client_id)
        await self._release_presence(client_id)

    async def _release_presence(self, client_id: str) -> None:
        key = self._key(client_id, "presence")
        script = self._scripts["release"]
        args = [self.node_id, self._tombstone_ms]
        await self._call("release", lambda: script(keys=[key], args=args))

    async def owner(self, client_id: str) -> str | None:
        key = self._key(client_id, "presence")
        value = await self._call("owner", lambda: self._r.get(key))
        if isinstance(value, bytes):
            value = value.decode()
        if value is None or value.startswith("~"):
            return None
        return value

    async def notify(self, node: str, client_id: str) -> None:
        message = orjson.dumps({"t": "n", "c": client_id})
        channel = self._channel(node)
        await self._call("notify", lambda: self._r.publish(channel, message))

    async def forward(self, node: str, client_id: str, envelope: Envelope) -> None:
        message = orjson.dumps({"t": "f", "c": client_id, "e": self._to_wire(envelope)})
        channel = self._channel(node)
        await self._call("forward", lambda: self._r.publish(channel, message))

    async def publish_broadcast(self, envelope: Envelope, group: str | None) -> None:
        message = orjson.dumps({"e": self._to_wire(envelope), "g": group, "o": self.node_id})
        channel = self._broadcast_channel
        await self._call("publish_broadcast", lambda: self._r.publish(channel, message))

    async def join(self, client_id: str, group: str) -> None:
        # The hub calls join/leave in the background: report, never raise into a lost task.
        key = f"{self.prefix}:group:{group}"
        try:
            await self._call("join", lambda: self._r.sadd(key, client_id))
        except BackendError as exc:
            log.warning("tether: %s not recorded in group %s: %s", client_id, group, exc)

    async def leave(self, client_id: str, group: str) -> None:
        key = f"{self.prefix}:group:{group}"
        try:
            await self._call("leave", lambda: self._r.srem(key, client_id))
        except BackendError as exc:
            log.warning("tether: %s not removed from group %s: %s", client_id, group, exc)

    async def members(self, group: str | None) -> set[str] | None:
        if group is None:
            key = f"{self.prefix}:clients"
            since = time.time() - self.config.client_ttl
            raw: Iterable[Any] = await self._call(
                "members", lambda: self._r.zrangebyscore(key, since, "+inf")
            )
        else:
            gkey = f"{self.prefix}:group:{group}"
            raw = await self._call("members", lambda: self._r.smembers(gkey))
        return {m.decode() if isinstance(m, bytes) else str(m) for m in raw}

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
        script = self._scripts["refresh"]
        args = [self.node_id, self._presence_ms, self._keep_ms]
        ids = list(clients)
        now = time.time()

        async def op() -> None:
            async with self._r.pipeline(transaction=False) as pipe:
                for cid in ids:
                    await script(keys=self._presence_keys(cid), args=args, client=pipe)
                pipe.zadd(f"{self.prefix}:clients", dict.fromkeys(ids, now))
                await pipe.execute()

        await self._call("refresh", op)

    async def _listen(self) -> None:
        """The pub/sub listener. It never dies quietly: any failure is counted, the
        connection is rebuilt with backoff and the channels re-subscribed; a connection
        that goes silent is caught by a ping."""
        failures = 0
        ping_every = 2.0
        first = True
        while not self._closed:
            pubsub: PubSub | None = None
            try:
                pubsub = self._r.pubsub()
                await pubsub.subscribe(self._node_channel, self._broadcast_channel)
                self._listening = True
                self._ok = True
                if not first:
                    self.listener_reconnects += 1
                    log.warning("tether: Redis pub/sub listener reconnected")
                    self._ring_everyone()  # doorbells sent while we were away are lost
                first = False
                failures = 0
                last_heard = time.monotonic()
                last_ping = last_heard
                while not self._closed:
                    message = await pubsub.get_message(timeout=0.5)
                    now = time.monotonic()
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
        async def guarded() -> None:
            try:
                await coroutine
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("tether: handling a cluster event failed")

        task = asyncio.ensure_future(guarded())
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

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
        name = channel.decode() if isinstance(channel, bytes) else channel
        if name == self._broadcast_channel:
            origin = message.get("o", "")
            if origin != self.node_id:
                envelope = self._from_wire(message["e"])
                self._spawn(events.broadcast(envelope, message.get("g"), origin))
            return
        kind, client_id = message.get("t"), message.get("c")
        if not isinstance(client_id, str):
            return
        if kind == "n":
            self._bell(client_id)
        elif kind == "f":
            self._spawn(events.forwarded(client_id, self._from_wire(message["e"])))
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
