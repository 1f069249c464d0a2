"""Channel streams in the SQLite backend's file: epochs and history survive restarts.

The channel store of a hub on `TETHER_BACKEND=sqlite`. It writes through the backend's
`SqliteStore` (`transact`): the same file, the same writer thread, and the same group
commit as the queued messages (the file is locked to one process; there is no second
writer). Tables:

    channels          cid, name, epoch, top (the last offset), published_ms (last
                      publish), active_ms (last publish or subscribe), wall-clock ms.
    channel_messages  cid, off, message_id, data (the payload's JSON text), enc,
                      time_ms; unique (cid, off), indexed by (cid, message_id) for dedup.

A publish is ONE store operation, whatever the number of subscribers: it reads the
channel row, checks the message id against the history (dedup), inserts the message and
moves `top`, in the transaction of the appends queued beside it; it resolves once that
transaction has committed, so a PUBLISHED offset is in the file.

The history is what the stream holds above `top - TETHER_CHANNEL_HISTORY_SIZE` and
younger than `TETHER_CHANNEL_HISTORY_TTL`: every read applies that bound exactly, while
the rows behind it are deleted in batches: every `trim_every` publishes of a channel,
and once per TTL by a sweep of the rows of channels with no publish within the TTL. A
channel with nothing held and no publish or subscribe for a day (`model.POSITION_KEPT`)
and no subscriber here is forgotten by that sweep: its next publish starts a new epoch.
The sweep is a store operation of its own beside the publishes, set-based and in chunks
of the store's deletion budget (`chunk_rows` per transaction), so no publish waits
behind a sweep of many channels.

After a restart the epoch and offsets continue from the file: a subscriber resubscribing
with `since` recovers exactly what the history still holds (`recovered: true`), or is told
`recovered: false` with the exact `lost` count. Presence is this process's own (the
backend is single-node), kept in memory: it starts empty after a restart, when every
subscriber has to subscribe again anyway.
"""

from __future__ import annotations

import asyncio
import base64
import sqlite3
from typing import TYPE_CHECKING, Any

import orjson

from ..backends.base import BackendError
from ..clock import Clock
from ..config import HubConfig
from .model import POSITION_KEPT, ChannelMessage, Position, Recovery, new_epoch, recover
from .store import Appended, ChannelInfo, LocalPresence, StoreEvents

if TYPE_CHECKING:
    from ..backends.sqlite import SqliteBackend
    from ..backends.sqlite_store import SqliteStore

__all__ = ["SqliteChannelStore"]

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS channels (
        cid          INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused
        name         TEXT    NOT NULL UNIQUE,
        epoch        TEXT    NOT NULL,
        top          INTEGER NOT NULL,
        published_ms INTEGER NOT NULL,
        active_ms    INTEGER NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS channel_messages (
        id           INTEGER PRIMARY KEY,
        cid          INTEGER NOT NULL,
        off          INTEGER NOT NULL,
        message_id   TEXT    NOT NULL,
        data         BLOB    NOT NULL,
        enc          TEXT,
        time_ms      INTEGER NOT NULL,
        UNIQUE (cid, off)
    )""",
    "CREATE INDEX IF NOT EXISTS channel_messages_by_id ON channel_messages (cid, message_id)",
)

_COLUMNS = "off, message_id, data, enc, time_ms"

# A publish as the writer did it: epoch, offset, time ms, the held row for a duplicate id.
_Outcome = tuple[str, int, int, tuple[Any, ...] | None]


def _message(row: tuple[Any, ...]) -> ChannelMessage:
    """A row (off, message_id, data, enc, time_ms) as a ChannelMessage."""
    offset, msg_id, raw, enc, millis = row
    raw = bytes(raw)
    data = orjson.loads(raw)
    if enc == "base64":
        data = base64.b64decode(data)
    return ChannelMessage(offset, msg_id, data, millis / 1000.0, raw, enc)


class SqliteChannelStore(LocalPresence):
    """`ChannelStore` in the SQLite backend's file (see the module docstring); presence
    is this process's (`LocalPresence`). Methods raise the backend's `StoreError`s
    (`BackendError`s): a publish that raised was not stored (its transaction rolled
    back)."""

    name = "sqlite"
    shared = False

    def __init__(self, config: HubConfig, clock: Clock, backend: SqliteBackend) -> None:
        self.clock = clock
        self.size = config.channel_history_size
        self._ttl_ms = int(config.channel_history_ttl * 1000)
        self._keep_ms = int(max(config.channel_history_ttl, POSITION_KEPT) * 1000)
        # Rows behind the history are deleted every `trim_every` publishes of a channel.
        self.trim_every = max(1, min(256, self.size // 8))
        self._backend = backend
        self._store: SqliteStore | None = None
        self._starting = asyncio.Lock()
        # Publishes of the current event-loop turn, submitted together (see _submit),
        # and their publishers' futures.
        self._batch: list[tuple[str, str, Any, bytes, str | None]] = []
        self._waiters: list[asyncio.Future[_Outcome]] = []
        self._events: StoreEvents | None = None
        self._handing: set[asyncio.Task[None]] = set()
        self._presence: dict[str, dict[str, dict[str, Any]]] = {}
        self._swept_ms = 0  # when the last sweep that committed began (wall ms)
        self._sweeping = False

    async def start(self, events: StoreEvents) -> None:
        self._events = events
        await self._ready()

    async def _ready(self) -> SqliteStore:
        """The backend's store, with the channel tables created: every method waits for
        it (the service is marked started before `start` returns, so the first
        subscribers may call in while the file is still being opened)."""
        store = self._store
        if store is not None:
            return store
        async with self._starting:
            if self._store is None:
                opened = await self._backend.open_store()
                await opened.transact(self._create_tables)
                self._swept_ms = self._now_ms()
                self._store = opened
            return self._store

    async def close(self) -> None:
        self._presence.clear()  # the file is closed with the backend
        for task in list(self._handing):
            task.cancel()

    @staticmethod
    def _create_tables(conn: sqlite3.Connection) -> None:
        for statement in _SCHEMA:
            conn.execute(statement)

    def _now_ms(self) -> int:
        return int(self.clock.wall() * 1000)

    # ------------------------------------------------------------------ writer thread

    def _position(
        self, conn: sqlite3.Connection, channel: str, now_ms: int
    ) -> tuple[int, str, int]:
        """(cid, epoch, top) of the channel, created with a new epoch when missing."""
        row = conn.execute(
            "SELECT cid, epoch, top FROM channels WHERE name = ?", (channel,)
        ).fetchone()
        if row is not None:
            return row[0], row[1], row[2]
        epoch = new_epoch()
        cur = conn.execute(
            "INSERT INTO channels (name, epoch, top, published_ms, active_ms) "
            "VALUES (?, ?, 0, ?, ?)",
            (channel, epoch, now_ms, now_ms),
        )
        return int(cur.lastrowid or 0), epoch, 0

    def _floor(self, top: int) -> int:
        """The offset at and below which the size bound drops messages."""
        return max(0, top - self.size)

    def _sweep(
        self, conn: sqlite3.Connection, budget: int, carry: Any, now_ms: int, kept: frozenset[str]
    ) -> tuple[int, bool, Any]:
        """One chunk of a sweep (`SqliteStore.transact_chunks`): first delete the rows of
        the channels with no publish within the TTL (all expired; only channels that
        still hold rows are visited), then forget the channels idle for a day with
        nothing held and no subscriber here (`kept`). At most `budget` rows per call;
        `carry` is the cid the forgetting has reached (None: still deleting rows)."""
        if carry is None:
            deleted = conn.execute(
                "DELETE FROM channel_messages WHERE id IN (SELECT m.id FROM channels c "
                "JOIN channel_messages m ON m.cid = c.cid WHERE c.published_ms <= ? LIMIT ?)",
                (now_ms - self._ttl_ms, budget),
            ).rowcount
            if deleted >= budget:
                return deleted, False, None
            budget -= deleted
            carry = 0
        else:
            deleted = 0
        idle = conn.execute(
            "SELECT cid, name FROM channels c WHERE cid > ? AND active_ms <= ? AND NOT EXISTS "
            "(SELECT 1 FROM channel_messages m WHERE m.cid = c.cid) ORDER BY cid LIMIT ?",
            (carry, now_ms - self._keep_ms, budget),
        ).fetchall()
        conn.executemany(
            "DELETE FROM channels WHERE cid = ?",
            [(cid,) for cid, name in idle if name not in kept],  # subscribed: keep the epoch
        )
        if len(idle) < budget:
            return deleted + len(idle), True, None
        return deleted + len(idle), False, idle[-1][0]

    def _start_sweep(self, store: SqliteStore) -> None:
        """Once per TTL (on a publish): sweep in chunks, beside the publishes. The time of
        the sweep is recorded only once it has committed: a failed one is tried again
        by the next publish."""
        began = self._now_ms()
        kept = frozenset(self._presence)
        try:
            future = store.transact_chunks(
                lambda conn, budget, carry: self._sweep(conn, budget, carry, began, kept)
            )
        except BackendError:  # closed: nothing to sweep
            return
        self._sweeping = True

        def swept(done: asyncio.Future[Any]) -> None:
            self._sweeping = False
            if not done.cancelled() and done.exception() is None:
                self._swept_ms = began

        future.add_done_callback(swept)

    def _append(
        self,
        conn: sqlite3.Connection,
        channel: str,
        message_id: str,
        data_json: bytes,
        enc: str | None,
    ) -> tuple[str, int, int, tuple[Any, ...] | None]:
        """(epoch, offset, time ms, the held row when `message_id` is a duplicate)."""
        now = self._now_ms()
        cid, epoch, top = self._position(conn, channel, now)
        held = conn.execute(
            # By id: left to itself the planner takes the (cid, off) index and reads
            # the whole history on every publish.
            f"SELECT {_COLUMNS} FROM channel_messages INDEXED BY channel_messages_by_id "
            "WHERE cid = ? AND message_id = ? AND off > ? AND time_ms > ?",
            (cid, message_id, self._floor(top), now - self._ttl_ms),
        ).fetchone()
        if held is not None:
            return epoch, held[0], held[4], held
        top += 1
        conn.execute(
            "INSERT INTO channel_messages (cid, off, message_id, data, enc, time_ms) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            # A bytearray: sqlite3 binds it directly, `bytes` go through its adapter
            # lookup first (see backends.sqlite_store._BLOB).
            (cid, top, message_id, bytearray(data_json), enc, now),
        )
        conn.execute(
            "UPDATE channels SET top = ?, published_ms = ?, active_ms = ? WHERE cid = ?",
            (top, now, now, cid),
        )
        if top % self.trim_every == 0:  # in batches: reads apply the bound exactly
            conn.execute(
                "DELETE FROM channel_messages WHERE cid = ? AND (off <= ? OR time_ms <= ?)",
                (cid, self._floor(top), now - self._ttl_ms),
            )
        return epoch, top, now, None

    def _window(
        self, conn: sqlite3.Connection, cid: int, top: int, after: int, limit: int, now_ms: int
    ) -> list[ChannelMessage]:
        """Held messages above `after` (at most `limit`; -1: all), oldest first."""
        rows = conn.execute(
            f"SELECT {_COLUMNS} FROM channel_messages WHERE cid = ? AND off > ? AND time_ms > ? "
            "ORDER BY off LIMIT ?",
            (cid, max(after, self._floor(top)), now_ms - self._ttl_ms, limit),
        ).fetchall()
        return [_message(r) for r in rows]

    def _recover(self, conn: sqlite3.Connection, channel: str, since: Position | None) -> Recovery:
        now = self._now_ms()
        cid, epoch, top = self._position(conn, channel, now)
        conn.execute("UPDATE channels SET active_ms = ? WHERE cid = ?", (now, cid))
        if since is None:
            return recover(epoch, top, [], None)
        if since.epoch == epoch and since.offset <= top:
            head = conn.execute(
                "SELECT min(off) FROM channel_messages WHERE cid = ? AND off > ? AND time_ms > ?",
                (cid, self._floor(top), now - self._ttl_ms),
            ).fetchone()[0]
            first = top + 1 if head is None else int(head)
            if since.offset >= first - 1:  # only what follows the subscriber is read
                replay = self._window(conn, cid, top, since.offset, -1, now)
                return Recovery(epoch, top, True, 0, False, since.offset, tuple(replay))
        return recover(epoch, top, self._window(conn, cid, top, 0, -1, now), since)

    # ------------------------------------------------------------------ ChannelStore

    async def append(
        self, channel: str, message_id: str, data: Any, data_json: bytes, enc: str | None
    ) -> Appended:
        store = self._store or await self._ready()
        loop = asyncio.get_running_loop()
        # One future per publisher: a publisher cancelled while the commit runs must not
        # cancel the others' (awaiting a shared future would cancel it for all).
        waiter: asyncio.Future[_Outcome] = loop.create_future()
        if not self._batch:
            loop.call_soon(self._submit, store)
        self._batch.append((channel, message_id, data, data_json, enc))
        self._waiters.append(waiter)
        try:
            epoch, offset, millis, held = await waiter
        except asyncio.CancelledError:
            # Stored, but cancelled before it could return: the service cannot hand it out.
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._hand_out(channel, (message_id, data, data_json, enc), waiter.result())
            raise
        if held is not None:
            return Appended(epoch, _message(held), True)
        return Appended(
            epoch, ChannelMessage(offset, message_id, data, millis / 1000.0, data_json, enc), False
        )

    def _hand_out(
        self, channel: str, item: tuple[str, Any, bytes, str | None], outcome: _Outcome
    ) -> None:
        """A publish stored whose publisher was cancelled (so `Channels.publish` does not
        hand it to this node's subscribers): hand it out through the store events, as a
        shared store reports a publish, instead of leaving it until the next publish."""
        epoch, offset, millis, held = outcome
        if held is not None or self._events is None:
            return  # a duplicate was handed out when it was first published
        message_id, data, data_json, enc = item
        message = ChannelMessage(offset, message_id, data, millis / 1000.0, data_json, enc)
        task = asyncio.ensure_future(self._events.published(channel, epoch, message))
        self._handing.add(task)
        task.add_done_callback(self._handing.discard)

    def _submit(self, store: SqliteStore) -> None:
        """Queue the publishes of this event-loop turn as ONE writer operation (one queue
        entry, one wake-up), so that they share a transaction."""
        batch, waiters = self._batch, self._waiters
        self._batch, self._waiters = [], []
        if not batch:
            return
        if not self._sweeping and self._now_ms() - self._swept_ms > self._ttl_ms:
            self._start_sweep(store)  # queued first: a publish after it sees its outcome
        try:
            future = store.transact(
                lambda conn: [self._append(conn, c, i, j, e) for c, i, _, j, e in batch]
            )
        except Exception as exc:  # the store is closed: every publisher is told, none hangs
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(exc)
            return

        def settle(done: asyncio.Future[list[_Outcome]]) -> None:
            error = done.exception() if not done.cancelled() else BackendError("cancelled")
            results = done.result() if error is None else [None] * len(waiters)
            for waiter, item, result in zip(waiters, batch, results, strict=True):
                if waiter.done():  # cancelled: its publisher will not hand it out
                    if result is not None:
                        self._hand_out(item[0], item[1:], result)
                    continue
                if result is None:
                    waiter.set_exception(error or BackendError("cancelled"))
                else:
                    waiter.set_result(result)

        future.add_done_callback(settle)

    async def recover(self, channel: str, since: Position | None) -> Recovery:
        store = self._store or await self._ready()
        return await store.transact(lambda conn: self._recover(conn, channel, since))

    async def read(self, channel: str, after: int, limit: int) -> tuple[str, list[ChannelMessage]]:
        store = self._store or await self._ready()
        now = self._now_ms()

        def read(conn: sqlite3.Connection) -> tuple[str, list[ChannelMessage]]:
            row = conn.execute(
                "SELECT cid, epoch, top FROM channels WHERE name = ?", (channel,)
            ).fetchone()
            if row is None:
                return "", []
            return row[1], self._window(conn, row[0], row[2], after, limit, now)

        return await store.query(read)

    async def channels(self) -> list[ChannelInfo]:
        store = self._store or await self._ready()
        deadline = self._now_ms() - self._ttl_ms

        def read(conn: sqlite3.Connection) -> list[ChannelInfo]:
            rows = conn.execute(
                "SELECT c.name, c.epoch, c.top, count(m.id) FROM channels c "
                "LEFT JOIN channel_messages m ON m.cid = c.cid "
                "AND m.off > max(0, c.top - ?) AND m.time_ms > ? "
                "GROUP BY c.cid ORDER BY c.name",
                (self.size, deadline),
            ).fetchall()
            return [ChannelInfo(name, epoch, top, depth) for name, epoch, top, depth in rows]

        return await store.query(read)
