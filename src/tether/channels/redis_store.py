"""Channel streams and presence in Redis: a Stream per channel under its own hash tag.

Keys of channel `<name>` (one hash tag, so each script call stays in one Cluster slot):

    <prefix>:{ch:<name>}:m    Hash: `epoch`, `top` (the last offset). Kept for a day
                              (`model.POSITION_KEPT`) after the last publish or subscribe.
    <prefix>:{ch:<name>}:s    Stream, entry id "<offset>-0", fields i (message id), d (the
                              payload's JSON text), e (encoding or ""), t (wall ms).
                              Trimmed to the history size and TTL by every publish.
    <prefix>:{ch:<name>}:i    Hash message id -> offset, for the ids the stream holds (dedup).
    <prefix>:{ch:<name>}:p    ZSET client id -> presence expiry (wall ms); refreshed by the
                              node holding the subscription, so a dead node's entries expire
                              (dropped, with a leave event, by the next read of the members).
    <prefix>:{ch:<name>}:pi   Hash client id -> presence info (JSON).
    <prefix>:{ch:<name>}:pn   Hash client id -> the node that wrote the entry (only that
                              node's refresh keeps it, only that node's leave removes it).
    <prefix>:channels         ZSET channel -> last activity (wall ms), for `channels()`.

A publish is **one** script call, whatever the number of subscribers: it trims, dedups,
appends and PUBLISHes the message on `<prefix>:chan-events`, from which every node's
listener learns of it (and of presence changes). A node that misses a notification sees
a hole in the offsets and reads it back from the stream (see `service.Channels`); after
its listener reconnects it re-reads every channel it serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable
from typing import Any

import orjson
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..backends.base import BackendError, OutcomeUnknown
from ..backends.redis_connection import LuaScript, RedisConnections, never_sent, spawn_logged
from ..clock import Clock
from ..config import HubConfig
from .model import POSITION_KEPT, ChannelMessage, Position, Recovery, new_epoch, recover
from .store import Appended, ChannelInfo, StoreEvents

__all__ = ["RedisChannelStore"]

log = logging.getLogger("tether.channels")

_UNAVAILABLE: tuple[type[BaseException], ...] = (RedisConnectionError, RedisTimeoutError, OSError)
_FAILURES: tuple[type[BaseException], ...] = (*_UNAVAILABLE, RedisError)
_LIST_SLICE = 500  # channels read per pipelined round trip when listing

# Shared by the scripts: create the stream's position when missing, drop expired entries.
_PRELUDE = """
local m, s, ids = KEYS[1], KEYS[2], KEYS[3]
local function position(candidate)
  local epoch = redis.call('HGET', m, 'epoch')
  if not epoch then
    epoch = candidate
    redis.call('DEL', s, ids)
    redis.call('HSET', m, 'epoch', epoch, 'top', 0)
  end
  return epoch
end
local function offset_of(entry_id)
  return tonumber(string.match(entry_id, '^(%d+)'))
end
local function drop(entry)
  local f = entry[2]
  if redis.call('HGET', ids, f[2]) == tostring(offset_of(entry[1])) then
    redis.call('HDEL', ids, f[2])
  end
  redis.call('XDEL', s, entry[1])
end
local function trim(deadline)
  while true do
    local entries = redis.call('XRANGE', s, '-', '+', 'COUNT', 64)
    local dropped = 0
    for _, entry in ipairs(entries) do
      if tonumber(entry[2][8]) > deadline then return end
      drop(entry)
      dropped = dropped + 1
    end
    if dropped < 64 then return end
  end
end
"""

# KEYS m s ids; ARGV epoch candidate, message id, data JSON, enc, now ms, ttl ms, size,
# keep ms, events channel, channel name, origin node.
_PUBLISH = LuaScript(
    _PRELUDE
    + """
local now, ttl, size = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local epoch = position(ARGV[1])
trim(now - ttl)
local held = redis.call('HGET', ids, ARGV[2])
if held then
  local entry = redis.call('XRANGE', s, held .. '-0', held .. '-0')
  if #entry > 0 then
    return {epoch, tonumber(held), 1, entry[1][2][4], entry[1][2][6], entry[1][2][8]}
  end
end
local top = redis.call('HINCRBY', m, 'top', 1)
redis.call('XADD', s, top .. '-0', 'i', ARGV[2], 'd', ARGV[3], 'e', ARGV[4], 't', ARGV[5])
redis.call('HSET', ids, ARGV[2], top)
local over = redis.call('XLEN', s) - size
if over > 0 then
  for _, entry in ipairs(redis.call('XRANGE', s, '-', '+', 'COUNT', over)) do drop(entry) end
end
redis.call('PEXPIRE', m, ARGV[8])
redis.call('PEXPIRE', s, ttl + 60000)
redis.call('PEXPIRE', ids, ttl + 60000)
redis.call('PUBLISH', ARGV[9], '["p",' .. cjson.encode(ARGV[10]) .. ',' .. cjson.encode(epoch)
  .. ',' .. top .. ',' .. cjson.encode(ARGV[2]) .. ',' .. cjson.encode(ARGV[4]) .. ','
  .. ARGV[5] .. ',' .. cjson.encode(ARGV[11]) .. ',' .. ARGV[3] .. ']')
return {epoch, top, 0}
"""
)

# KEYS m s ids; ARGV epoch candidate, now ms, ttl ms, since epoch ("" for none), since
# offset, keep ms. Returns {epoch, top, entries (those the answer needs)}.
_RECOVER = LuaScript(
    _PRELUDE
    + """
local epoch = position(ARGV[1])
redis.call('PEXPIRE', m, ARGV[6])
trim(tonumber(ARGV[2]) - tonumber(ARGV[3]))
local top = tonumber(redis.call('HGET', m, 'top'))
if ARGV[4] == '' then return {epoch, top, {}} end
local since = tonumber(ARGV[5])
local head = redis.call('XRANGE', s, '-', '+', 'COUNT', 1)
local first = top + 1
if #head > 0 then first = offset_of(head[1][1]) end
if ARGV[4] == epoch and since <= top and since >= first - 1 then
  return {epoch, top, redis.call('XRANGE', s, (since + 1) .. '-0', '+')}
end
return {epoch, top, redis.call('XRANGE', s, '-', '+')}
"""
)

# KEYS m s; ARGV after, limit. Returns {epoch or "", entries}.
_READ = LuaScript(
    """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then return {'', {}} end
return {epoch, redis.call('XRANGE', KEYS[2], (tonumber(ARGV[1]) + 1) .. '-0', '+',
  'COUNT', ARGV[2])}
"""
)

# KEYS p pi pn; ARGV client, expiry ms (0: remove), info JSON, keep ms, events channel
# ("": announce nothing), channel name, this node, claim ("1": a subscribe here, which takes
# the entry over from any node; "0": a refresh, which leaves another node's entry alone).
# An entry belongs to the node that wrote it (pn): a remove takes out only this node's
# (returns -1 when another node holds it: the client subscribed there since). Publishes a
# join (a new entry) or a leave (a removed one); returns 1 for either, else 0.
_PRESENCE = LuaScript(
    """
local owner = redis.call('HGET', KEYS[3], ARGV[1])
if owner and owner ~= ARGV[7] and (ARGV[2] == '0' or ARGV[8] ~= '1')
    and redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return -1
end
local changed, kind
if ARGV[2] == '0' then
  changed = redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('HDEL', KEYS[3], ARGV[1])
  kind = 'l'
else
  changed = redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
  redis.call('HSET', KEYS[3], ARGV[1], ARGV[7])
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
  redis.call('PEXPIRE', KEYS[3], ARGV[4])
  kind = 'j'
end
if changed == 1 and ARGV[5] ~= '' then
  redis.call('PUBLISH', ARGV[5], '["' .. kind .. '",' .. cjson.encode(ARGV[6]) .. ','
    .. cjson.encode(ARGV[1]) .. ',' .. cjson.encode(ARGV[7]) .. ']')
end
return changed
"""
)

# KEYS p pi pn; ARGV now ms, events channel, channel name. Drops expired entries (their node
# died) and publishes a leave for each; returns {client, info, ...}.
_MEMBERS = LuaScript(
    """
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
for _, cid in ipairs(gone) do
  redis.call('HDEL', KEYS[2], cid)
  redis.call('HDEL', KEYS[3], cid)
  redis.call('PUBLISH', ARGV[2], '["l",' .. cjson.encode(ARGV[3]) .. ','
    .. cjson.encode(cid) .. ',"~expired"]')
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local out = {}
for _, cid in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  out[#out + 1] = cid
  out[#out + 1] = redis.call('HGET', KEYS[2], cid) or '{}'
end
return out
"""
)

_SCRIPTS = (_PUBLISH, _RECOVER, _READ, _PRESENCE, _MEMBERS)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _message(entry: Any) -> ChannelMessage:
    """A stream entry [id, [i, <id>, d, <json>, e, <enc>, t, <ms>]] as a ChannelMessage."""
    entry_id, fields = entry
    values = [_text(v) for v in fields]
    return _build(int(_text(entry_id).split("-", 1)[0]), values[1], values[3], values[5], values[7])


def _build(offset: int, msg_id: str, data_json: str, enc: str, millis: str) -> ChannelMessage:
    raw = data_json.encode()
    data = orjson.loads(raw)
    encoding = enc or None
    if encoding == "base64":
        import base64

        data = base64.b64decode(data)
    return ChannelMessage(offset, msg_id, data, int(millis) / 1000.0, raw, encoding)


class RedisChannelStore:
    """`ChannelStore` on the Redis deployment of `config` (one server, Cluster or Sentinel),
    through its own `RedisConnections`. Methods raise `BackendError`; a publish whose reply
    was lost raises `OutcomeUnknown` (resend it with the same id: it is found, not doubled)."""

    name = "redis"
    shared = True

    def __init__(self, config: HubConfig, clock: Clock, node_id: str) -> None:
        self.config = config
        self.clock = clock
        self.node_id = node_id
        self.prefix = config.redis_prefix
        self.events_channel = f"{self.prefix}:chan-events"
        self.index = f"{self.prefix}:channels"
        self._size = config.channel_history_size
        self._ttl_ms = int(config.channel_history_ttl * 1000)
        self._keep_ms = int(max(config.channel_history_ttl, POSITION_KEPT) * 1000)
        self._presence_ms = int(config.presence_ttl * 1000)
        self._conn: RedisConnections | None = None
        self._events: StoreEvents | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._handlers: set[asyncio.Task[Any]] = set()
        self._present: dict[tuple[str, str], str] = {}  # (channel, client) -> info JSON here
        self._active: set[str] = set()  # channels used since the last index update
        self._closed = False
        self.listening = False
        self.listener_reconnects = 0

    def _keys(self, channel: str) -> tuple[str, str, str, str, str]:
        tag = f"{self.prefix}:{{ch:{channel}}}"
        return f"{tag}:m", f"{tag}:s", f"{tag}:i", f"{tag}:p", f"{tag}:pi"

    def _presence_keys(self, channel: str) -> list[str]:
        tag = f"{self.prefix}:{{ch:{channel}}}"
        return [f"{tag}:p", f"{tag}:pi", f"{tag}:pn"]

    # ------------------------------------------------------------------ lifecycle

    async def start(self, events: StoreEvents) -> None:
        self._events = events
        self._conn = RedisConnections(
            self.config,
            client_name=f"tether:{self.prefix}:{self.node_id}:channels",
            pool_timeout=2.0,
        )
        self._tasks = [
            asyncio.create_task(self._listen(), name="tether-channels-listener"),
            asyncio.create_task(self._refresh_loop(), name="tether-channels-presence"),
        ]

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Leave presence as a courtesy, bounded: what is not removed in time (Redis slow
        # or down) expires within presence_ttl anyway.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                for channel, client_id in list(self._present):
                    with contextlib.suppress(BackendError):
                        await self.presence_remove(channel, client_id)
        tasks = {*self._tasks, *self._handlers}
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.aclose()

    # ------------------------------------------------------------------ calls

    async def _eval(self, what: str, script: LuaScript, keys: list[str], args: list[Any]) -> Any:
        """One script call; NOSCRIPT (it did not run) loads it and runs it again. Raises
        `OutcomeUnknown` when a call that may have run got no reply, else `BackendError`."""
        conn = self._conn
        if conn is None:
            raise BackendError("the channel store is not started")
        redis = conn.commands

        async def run() -> Any:
            try:
                return await redis.evalsha(script.sha, len(keys), *keys, *args)
            except NoScriptError:
                await conn.load_script(script)
                return await redis.evalsha(script.sha, len(keys), *keys, *args)

        try:
            return await run()
        except _UNAVAILABLE as exc:
            if what == "publish" and not never_sent(exc):
                raise OutcomeUnknown(f"Redis {what}: no reply ({exc})") from exc
            raise BackendError(f"Redis {what} failed: {exc}") from exc
        except RedisError as exc:
            raise BackendError(f"Redis {what} failed: {exc}") from exc

    # ------------------------------------------------------------------ streams

    async def append(
        self, channel: str, message_id: str, data: Any, data_json: bytes, enc: str | None
    ) -> Appended:
        m, s, i, _, _ = self._keys(channel)
        now_ms = int(self.clock.wall() * 1000)
        reply = await self._eval(
            "publish",
            _PUBLISH,
            [m, s, i],
            [
                new_epoch(),
                message_id,
                data_json,
                enc or "",
                now_ms,
                self._ttl_ms,
                self._size,
                self._keep_ms,
                self.events_channel,
                channel,
                self.node_id,
            ],
        )
        self._active.add(channel)
        epoch, offset, duplicate = _text(reply[0]), int(reply[1]), int(reply[2])
        if duplicate:
            held = _build(offset, message_id, _text(reply[3]), _text(reply[4]), _text(reply[5]))
            return Appended(epoch, held, True)
        message = ChannelMessage(offset, message_id, data, now_ms / 1000.0, data_json, enc)
        return Appended(epoch, message, False)

    async def recover(self, channel: str, since: Position | None) -> Recovery:
        m, s, i, _, _ = self._keys(channel)
        reply = await self._eval(
            "recover",
            _RECOVER,
            [m, s, i],
            [
                new_epoch(),
                int(self.clock.wall() * 1000),
                self._ttl_ms,
                since.epoch if since is not None else "",
                since.offset if since is not None else 0,
                self._keep_ms,
            ],
        )
        self._active.add(channel)
        epoch, top = _text(reply[0]), int(reply[1])
        held = [_message(entry) for entry in reply[2]]
        return recover(epoch, top, held, since)

    async def read(self, channel: str, after: int, limit: int) -> tuple[str, list[ChannelMessage]]:
        m, s, _, _, _ = self._keys(channel)
        reply = await self._eval("read", _READ, [m, s], [after, limit])
        deadline = self.clock.wall() - self._ttl_ms / 1000.0
        messages = [msg for msg in (_message(e) for e in reply[1]) if msg.time > deadline]
        return _text(reply[0]), messages

    async def channels(self) -> list[ChannelInfo]:
        conn = self._conn
        if conn is None:
            raise BackendError("the channel store is not started")
        await self._flush_index()
        try:
            names = [_text(n) for n in await conn.commands.zrange(self.index, 0, -1)]
        except _FAILURES as exc:
            raise BackendError(f"Redis channels failed: {exc}") from exc
        infos = []
        ordered = sorted(names)
        # One pipelined round trip per slice (per node on Cluster), not two per channel:
        # the dashboard lists every channel each refresh.
        for start in range(0, len(ordered), _LIST_SLICE):
            chunk = ordered[start : start + _LIST_SLICE]
            try:
                async with conn.commands.pipeline(transaction=False) as pipe:
                    for name in chunk:
                        m, s, _, _, _ = self._keys(name)
                        pipe.hgetall(m)
                        pipe.xlen(s)
                    replies = await pipe.execute()
            except _FAILURES as exc:
                raise BackendError(f"Redis channels failed: {exc}") from exc
            for index, name in enumerate(chunk):
                meta, depth = replies[2 * index], replies[2 * index + 1]
                if not meta:
                    continue
                values = {_text(k): _text(v) for k, v in meta.items()}
                infos.append(ChannelInfo(name, values["epoch"], int(values["top"]), int(depth)))
        return infos

    async def _flush_index(self) -> None:
        """Record the channels used lately in the index (batched, off the publish path)."""
        if not self._active or self._conn is None:
            return
        active, self._active = self._active, set()
        now_ms = int(self.clock.wall() * 1000)
        try:
            await self._conn.commands.zadd(self.index, dict.fromkeys(active, now_ms))
            await self._conn.commands.zremrangebyscore(self.index, "-inf", now_ms - self._keep_ms)
            await self._conn.commands.pexpire(self.index, self._keep_ms)
        except _FAILURES as exc:
            self._active |= active
            log.debug("tether: channel index not updated: %s", exc)

    # ------------------------------------------------------------------ presence

    async def presence_add(self, channel: str, client_id: str, info: dict[str, Any]) -> bool:
        text = orjson.dumps(info).decode()
        self._present[(channel, client_id)] = text
        return await self._presence_call(channel, client_id, self._expiry_ms(), text) == 1

    async def presence_remove(self, channel: str, client_id: str) -> bool:
        self._present.pop((channel, client_id), None)
        return await self._presence_call(channel, client_id, 0, "") != -1

    def _expiry_ms(self) -> int:
        return int(self.clock.wall() * 1000) + self._presence_ms

    async def _presence_call(self, channel: str, client_id: str, expiry: int, info: str) -> int:
        reply = await self._eval(
            "presence",
            _PRESENCE,
            self._presence_keys(channel),
            [
                client_id,
                expiry,
                info,
                self._keep_ms,
                self.events_channel,
                channel,
                self.node_id,
                1,
            ],
        )
        return int(reply)

    async def presence(self, channel: str) -> dict[str, dict[str, Any]]:
        reply = await self._eval(
            "members",
            _MEMBERS,
            self._presence_keys(channel),
            [int(self.clock.wall() * 1000), self.events_channel, channel],
        )
        out: dict[str, dict[str, Any]] = {}
        for index in range(0, len(reply), 2):
            out[_text(reply[index])] = orjson.loads(reply[index + 1])
        return out

    async def _refresh_loop(self) -> None:
        """Keep this node's presence entries alive (a dead node's expire within
        `presence_ttl`, and reading the members of the channels served here drops them,
        with a leave event) and the channel index current. Real time: liveness."""
        interval = max(0.05, self.config.presence_ttl / 3)
        while not self._closed:
            await asyncio.sleep(interval)
            for (channel, client_id), info in list(self._present.items()):
                try:
                    keys = self._presence_keys(channel)
                    node = self.node_id
                    await self._eval(
                        "presence refresh",
                        _PRESENCE,
                        keys,
                        [client_id, self._expiry_ms(), info, self._keep_ms, "", channel, node, 0],
                    )
                    if (channel, client_id) not in self._present:
                        # Removed while the refresh was in flight: the two calls ran on
                        # different connections, so the refresh may have re-added it.
                        # Remove again, silently (the leave was announced already).
                        await self._eval(
                            "presence refresh",
                            _PRESENCE,
                            keys,
                            [client_id, 0, "", self._keep_ms, "", channel, node, 0],
                        )
                except BackendError as exc:
                    log.debug("tether: presence refresh failed: %s", exc)
                    break
            for channel in {channel for channel, _ in self._present}:
                with contextlib.suppress(BackendError):
                    await self.presence(channel)  # drops (and announces) expired entries
            await self._flush_index()

    # ------------------------------------------------------------------ listener

    async def _listen(self) -> None:
        """Follow `<prefix>:chan-events`; rebuilt with backoff when it fails, and after a
        reconnect every served channel is re-read (notifications may have been missed)."""
        failures = 0
        first = True
        loop = asyncio.get_running_loop()
        while not self._closed:
            pubsub = None
            try:
                assert self._conn is not None
                pubsub = await self._conn.pubsub()
                await pubsub.subscribe(self.events_channel)
                self.listening = True
                if not first:
                    self.listener_reconnects += 1
                    log.warning("tether: channel listener reconnected; re-reading channels")
                    self._spawn(self._resync())
                first = False
                failures = 0
                last_heard = last_ping = loop.time()
                while not self._closed:
                    message = await pubsub.get_message(timeout=0.5)
                    now = loop.time()
                    if message is not None:
                        last_heard = now
                        if message.get("type") == "message":
                            self._dispatch(message["data"])
                    if now - last_ping >= 2.0:
                        last_ping = now
                        await pubsub.ping()
                    if now - last_heard > 6.0:
                        raise RedisConnectionError("pub/sub connection went silent")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.listening = False
                if self._closed:
                    return
                log.warning("tether: channel listener failed: %r", exc)
                failures += 1
                await asyncio.sleep(random.uniform(0, min(5.0, 0.05 * 2 ** min(failures, 10))))
            finally:
                self.listening = False
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _resync(self) -> None:
        if self._events is not None:
            await self._events.resync()

    def _dispatch(self, data: bytes | str) -> None:
        events = self._events
        if events is None:
            return
        try:
            item = orjson.loads(data)
            kind = item[0]
            if kind == "p":
                _, channel, epoch, offset, msg_id, enc, millis, origin = item[:8]
                if origin == self.node_id:
                    return  # the publishing node hands it out itself
                raw = orjson.dumps(item[8])
                payload = item[8]
                if enc == "base64":
                    import base64

                    payload = base64.b64decode(payload)
                message = ChannelMessage(
                    int(offset), msg_id, payload, millis / 1000.0, raw, enc or None
                )
                self._spawn(events.published(channel, epoch, message))
            elif kind in ("j", "l"):
                _, channel, client_id, origin = item[:4]
                if origin and origin != self.node_id:
                    self._spawn(events.presence(channel, client_id, kind == "j"))
        except (ValueError, TypeError, IndexError, KeyError):
            log.warning("tether: ignoring a malformed channel event")

    def _spawn(self, coroutine: Awaitable[Any]) -> None:
        spawn_logged(self._handlers, coroutine, log, "handling a channel event")
