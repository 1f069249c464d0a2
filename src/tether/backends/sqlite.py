"""The SQLite backend: one hub process whose queued critical messages survive restarts and crashes.

A thin adapter from hub sessions and envelopes to `SqliteStore` (the storage engine:
WAL, one writer thread with group commit; its module docstring has the durability
figures). The hub's session stays the working copy, as on the memory backend: `append`
stores a message (a send returns QUEUED/SENT only after its transaction committed) and
then mirrors it into the session's outbox. The file is the record across restarts:

- nothing is read at start-up; a client's stream is loaded when it connects (`attach` /
  `load`) or on the first critical send to it (`append` loads a session that has not
  seen the store yet), so a million pending messages cost nothing until asked for;
- the numbering continues from the file, and a tether.v1 resume is settled against it
  exactly as on Redis (`SqliteStore.resume`): exact `lost` counts, a `reset` only when
  the stream cannot vouch for the client's position (the file was lost or replaced);
- deadlines are stored as wall-clock milliseconds and mapped to and from the hub's
  clock (`WireCodec`), so TTLs keep running while the process is down.

`durable = True`, `shared = False`: one process per file (a second one is refused at
start-up; several nodes use the Redis backend). Errors are `StoreError`s, which are
`BackendError`s: a failed append is REJECTED by the hub with its reason (full disk:
nothing in that transaction was stored, so nothing is acknowledged that is not).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol, cast

from ..clock import Clock, SystemClock
from ..config import HubConfig, OverflowPolicy
from ..messages import DeadLetter, Envelope
from .base import Accepted, BackendError, BackendEvents, Refused, SingleNode, StoredOutbox
from .base import StreamState as SessionView
from .redis_wire import WireCodec
from .sqlite_store import (
    Appended,
    DeadLetterRecord,
    ExpiryReport,
    MessageKind,
    NewMessage,
    Refusal,
    SqliteStore,
    StoreClosedError,
    StoredMessage,
    StoreError,
    StreamState,
    Synchronous,
)


class MirroredSession(SessionView, Protocol):
    """The session as this backend sees it. Like the memory backend's, this store keeps
    the hub's session as its working copy: after a commit it mirrors what was stored
    into the outbox and the stream position (see `backends.base.StreamState`)."""

    acked: int
    epoch: str | None
    stream_known: bool


log = logging.getLogger("tether.sqlite")

_DIRECT = Accepted(0, direct=True)  # the hub writes it; nothing is stored
# An Enum class's attribute goes through EnumType.__getattr__'s slot (~0.3 us): read once.
_DROP_OLDEST = OverflowPolicy.DROP_OLDEST
_KINDS = {"j": MessageKind.JSON, "s": MessageKind.TEXT, "b": MessageKind.BYTES}  # stored_form
# NewMessage(...) runs the NamedTuple's Python-level __new__; tuple.__new__ builds the
# same record in C (what NamedTuple._make does), once per send.
_new_message = tuple.__new__
_Future = asyncio.Future

__all__ = ["SqliteBackend"]

_Pending = tuple[SessionView, Envelope, "asyncio.Future[Accepted | Refused]"]


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class _Load:
    """A load in flight: the rows ((seq, message_id)) expiry passes that ended while it
    ran deleted and counted. Compared by identity."""

    __slots__ = ("counted",)

    def __init__(self) -> None:
        self.counted: set[tuple[int, str]] = set()


class SqliteBackend(SingleNode):
    """Durable storage for a single hub process in one SQLite file (`TETHER_SQLITE_PATH`)."""

    name = "sqlite"
    durable = True
    shared = False
    node_id = "local"

    def __init__(
        self,
        path: str | os.PathLike[str] = "tether.db",
        config: HubConfig | None = None,
        *,
        clock: Clock | None = None,
        synchronous: Synchronous | None = None,
        max_bytes: int | None = None,
        chunk_rows: int = 5000,
    ) -> None:
        self.path = os.fspath(path)
        self.config = config if config is not None else HubConfig(backend="sqlite")
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.wire = WireCodec(self.clock)
        self.errors = 0
        self.expired = 0  # messages the expiry pass removed that no session held
        cfg = self.config
        self._synchronous: Synchronous = synchronous or cfg.sqlite_synchronous.value
        self._max_bytes = max_bytes
        self._chunk_rows = chunk_rows  # rows one transaction deletes (SqliteStore.open)
        self._dedup_ms = _ms(cfg.dedup_window)
        self._store: SqliteStore | None = None
        self._ok = False
        self._background: set[asyncio.Task[None]] = set()
        self._opening = asyncio.Lock()
        self._closed = False
        # Appends of the current event-loop turn, submitted together (see _submit_batch):
        # (session, envelope, its sender's future), and beside it the store's item for
        # each, built when the send is queued (one pass over a send, not two).
        self._batch: list[_Pending] = []
        self._items: list[tuple[str, NewMessage, str | None, int, bool]] = []
        self._offset = 0.0  # wall minus hub clock (seconds), read once per batch
        # One entry per expiry pass under way: the rows each load during it saw, per
        # client ((seq, message_id)), so that the pass counts exactly the rows no
        # session holds (see expire_stored).
        self._passes: list[dict[str, set[tuple[int, str]]]] = []
        # The loads (and resumes) in flight, per client: each collects the rows a pass
        # that ended meanwhile deleted and counted, which its answer (read before that
        # deletion) may still hold and must not hand to the session (see _fresh).
        self._loading: dict[str, list[_Load]] = {}
        # Failed-delivery counts of this event-loop turn, per client ({seq: attempts}),
        # written together through the writer queue (see record_attempts).
        self._attempts: dict[str, dict[int, int]] = {}

    # ------------------------------------------------------------------ lifecycle

    async def start(self, events: BackendEvents) -> None:
        """Open the file (nothing pending is loaded). Raises StoreOpenError (missing or
        read-only directory), StoreLockedError (another process has the file),
        StoreCorruptError (not a tether store, a damaged header or schema),
        StoreFullError. Damage deeper in the file is found by the integrity check that
        runs after the open (`SqliteStore.open`): the backend is then unhealthy and
        critical sends are REJECTED with the reason."""
        await self.open_store()

    async def open_store(self) -> SqliteStore:
        """The store, opened on first call (by `start`, or by the channel store when a
        channel is used before the hub started): one writer for the file."""
        async with self._opening:
            if self._closed:
                raise StoreClosedError(f"sqlite store {self.path} is closed")
            if self._store is None:
                self._store = await SqliteStore.open(
                    self.path,
                    synchronous=self._synchronous,
                    clock=self.clock,
                    max_bytes=self._max_bytes,
                    chunk_rows=self._chunk_rows,
                    dead_letter_limit=self.config.dead_letter_max_size,
                )
                self._ok = True
        return self._store

    async def close(self) -> None:
        self._closed = True  # an open still waiting for the lock sees it and refuses
        self._submit_attempts()  # counts of this turn go in before the store closes
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        # An open in progress (a channel used before the hub started) finishes first, so
        # that its store is closed here too: no writer thread or file lock outlives us.
        async with self._opening:
            if self._store is not None:
                await self._store.close()
        self._ok = False

    @property
    def healthy(self) -> bool:
        store = self._store
        return self._ok and (store is None or store.corrupt is None)

    @property
    def store(self) -> SqliteStore:
        """The open store. Raises StoreClosedError before `start` / after `close`."""
        if self._store is None:
            raise StoreClosedError(f"sqlite store {self.path} is not open")
        return self._store

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "name": self.name,
            "durable": self.durable,
            "shared": self.shared,
            "healthy": self.healthy,
            "errors": self.errors,
            "expired": self.expired,
        }
        if self._store is not None:
            info.update(self._store.describe())
        else:
            info["path"] = self.path
        return info

    def _failed(self, what: str, exc: BaseException) -> None:
        self.errors += 1
        self._ok = False
        log.warning("tether: sqlite %s failed: %s", what, exc)

    async def _call(self, what: str, awaitable: Any) -> Any:
        """Await a store operation: count and log a failure, track health."""
        try:
            result = await awaitable
        except BackendError as exc:
            self._failed(what, exc)
            raise
        self._ok = True
        return result

    # ------------------------------------------------------------------ envelopes <-> rows

    def _row(self, envelope: Envelope, offset: float | None = None) -> NewMessage:
        """`envelope` as a row; `offset` (wall minus hub clock, seconds) when the caller
        converts many at once."""
        if offset is None:
            offset = self.clock.wall() - self.clock.now()  # hub-clock instants -> wall ms
        code, raw = envelope.stored_form()
        return _new_message(
            NewMessage,
            (
                envelope.message_id,
                raw,
                _KINDS[code],
                int((envelope.created_at + offset) * 1000),
                int((envelope.expires_at + offset) * 1000),
            ),
        )

    def _envelope(self, message: StoredMessage) -> Envelope:
        raw = message.data
        data: str | bytes
        if message.kind is MessageKind.BYTES:
            data, data_json, enc = raw, None, "base64"
        else:
            data = raw.decode("utf-8", "surrogatepass")
            data_json, enc = (raw if message.kind is MessageKind.JSON else None), None
        return Envelope(
            message_id=message.message_id,
            data=data,
            data_json=data_json,
            critical=True,
            created_at=self.wire.local(message.created_ms),
            expires_at=self.wire.local(message.expires_ms),
            enc=enc,
            seq=message.seq,
            attempts=message.attempts,
        )

    def _outbox(
        self, session: SessionView, state: StreamState | None, messages: list[StoredMessage]
    ) -> StoredOutbox:
        """A StoredOutbox from rows; expired ones apart (the caller discards them)."""
        if state is None:
            return StoredOutbox(next_seq=1, acked=0)
        # Reuse the objects the session already holds for the same message: they keep
        # their attempt counts (for dead-lettering) and cached frames.
        cached = {(e.seq, e.message_id): e for e in session.outbox}
        stored = StoredOutbox(next_seq=state.next_seq, acked=state.acked, epoch=state.epoch)
        now = self.clock.now()
        for message in messages:
            envelope = cached.get((message.seq, message.message_id)) or self._envelope(message)
            (stored.expired if envelope.expires_at <= now else stored.envelopes).append(envelope)
        return stored

    async def _drop_expired(self, session: SessionView, stored: StoredOutbox) -> None:
        if stored.expired:
            with contextlib.suppress(BackendError):  # expired either way; expire() retries
                await self.discard(session, stored.expired)

    # ------------------------------------------------------------------ critical messages

    async def _ensure_loaded(self, session: SessionView) -> None:
        """Mirror the stored stream into a session that has not seen the store yet (the
        first send to a client after a restart), so its outbox, numbering and bound are
        the file's. Expired messages are mirrored too: the hub's retry cycle expires,
        counts and discards them like any other. Lock held (or the session not shared)."""
        mirror = cast("MirroredSession", session)
        if mirror.stream_known:
            return
        client_id = session.client_id
        with self._load(client_id) as load:
            loaded = await self._call("load", self.store.load(client_id))
        if loaded is not None:
            outbox = session.outbox
            outbox.drain()
            for message in self._fresh(client_id, load, loaded.messages):
                envelope = self._envelope(message)
                if not outbox.push(envelope).accepted:  # the store applied the bound
                    outbox.queue.append(envelope)
            mirror.next_seq = loaded.stream.next_seq
            mirror.acked = loaded.stream.acked
            mirror.epoch = loaded.stream.epoch
        mirror.stream_known = True

    @contextlib.contextmanager
    def _load(self, client_id: str) -> Iterator[_Load]:
        """Track a load (or resume) of `client_id`'s stream while it is in flight: enter
        before the store is asked (its snapshot may be taken at once), leave when its
        answer is back on the loop."""
        load = _Load()
        loads = self._loading.setdefault(client_id, [])
        loads.append(load)
        try:
            yield load
        finally:
            loads.remove(load)
            if not loads:
                del self._loading[client_id]

    def _fresh(
        self, client_id: str, load: _Load, messages: list[StoredMessage]
    ) -> list[StoredMessage]:
        """What a load read, as its session takes it over: exactly once for every row an
        expiry pass deletes, whichever reaches the loop first.

        - An answer back while a pass runs: the session holds (and will count) the rows
          it read; the pass, which has not counted yet, leaves them (`_passes`).
        - An answer back after a pass ended: the rows that pass deleted and counted are
          gone from the file, though the answer, read before, may hold them; they are
          left out, as if the load had run after the pass (`_Load.counted`)."""
        if load.counted:
            counted = load.counted
            messages = [m for m in messages if (m.seq, m.message_id) not in counted]
        if self._passes:
            seen = {(m.seq, m.message_id) for m in messages}
            for loads in self._passes:
                loads.setdefault(client_id, set()).update(seen)
        return messages

    def _accepted(
        self, session: SessionView, envelope: Envelope, result: Appended | Refusal
    ) -> Accepted | Refused:
        """Mirror a stored message into the session (as the memory backend does)."""
        if result.__class__ is not Appended:
            return Refused.DUPLICATE if result is Refusal.DUPLICATE else Refused.FULL
        seq = envelope.seq = result.seq
        mirror: MirroredSession = session  # type: ignore[assignment]  # cast() without a call
        if seq < mirror.next_seq and result.epoch == mirror.epoch:
            # Already mirrored: a load (the plain connect of a sender cancelled during the
            # commit) saw the committed row before this outcome reached the loop, and may
            # have written it already. Pushing it again would deliver it twice.
            gone = tuple(self._envelope(m) for m in result.evicted)
            return Accepted(seq, gone, epoch=result.epoch)
        # The mirror holds what the store holds, so under drop_oldest the outbox pushes
        # out the same oldest messages the store deleted; the store's list is the truth.
        outcome = session.outbox.push(envelope)
        if not outcome.accepted:  # the store applied the bound: the mirror must not refuse
            session.outbox.queue.append(envelope)
        mirror.next_seq = seq + 1
        mirror.epoch = result.epoch
        mirror.stream_known = True
        key = envelope.dedup_key
        if key is not None and session.dedup is not None:
            session.dedup.record(key)  # the local window answers best-effort checks cheaply
        if not result.evicted:
            return Accepted(seq, (), (), False, result.epoch)  # positional: cheaper
        mine = {e.seq: e for e in outcome.evicted}
        evicted = tuple(mine.get(m.seq) or self._envelope(m) for m in result.evicted)
        return Accepted(seq, evicted, epoch=result.epoch)

    async def append(
        self, session: SessionView, envelope: Envelope, *, local: bool
    ) -> Accepted | Refused:
        """Store a critical message (dedup check, seq, bound, TTL in one transaction) and
        mirror it into the session. Raises StoreError (a BackendError; StoreFullError when
        the disk is full): then nothing was stored."""
        mirror: MirroredSession = session  # type: ignore[assignment]  # cast() without a call
        if not mirror.stream_known:
            await self._ensure_loaded(session)
        waiter = self.append_future(session, envelope)  # the session knows the store now
        if waiter is None:
            return _DIRECT  # nothing held for this plain-mode client: the hub writes it
        return await waiter

    def append_future(
        self, session: SessionView, envelope: Envelope
    ) -> asyncio.Future[Accepted | Refused] | None:
        """`append` as a plain call, for the pipeline's hot path: the future of the
        message's commit, so that a sender waiting for it suspends one coroutine frame
        less (the outcome and its failure are the same as `append`'s; health and errors
        are tracked when the commit settles). None when `append` must be awaited instead:
        the session has not seen the store yet, or a direct write may apply.

        The message joins this event-loop turn's batch; its sender's future resolves
        after the commit (or fails with the StoreError: then nothing was stored). Raises
        at once (nothing queued) when the message cannot be made a row."""
        if not session.stream_known or (  # type: ignore[attr-defined]  # MirroredSession
            envelope.direct and envelope.dedup_key is None and not session.outbox
        ):
            return None
        store = self._store or self.store  # the property raises when it is not open
        batch = self._batch
        first = not batch
        if first:
            loop = asyncio.get_running_loop()  # raises before anything is queued
            clock = self.clock
            self._offset = clock.wall() - clock.now()  # hub-clock instants -> wall ms
        row = self._row(envelope, self._offset)
        outbox = session.outbox
        self._items.append(
            (
                session.client_id,
                row,
                envelope.dedup_key if session.dedup is not None else None,
                outbox.max_size,
                outbox.policy is _DROP_OLDEST,
            )
        )
        if first:
            loop.call_soon(self._submit_batch, store)
        # One future per sender: a sender cancelled while the commit runs must not
        # cancel the others' (awaiting a shared future would cancel it for all). Made
        # by the Future type itself (the running loop's): `loop.create_future()` is a
        # Python frame around the same call.
        waiter: asyncio.Future[Accepted | Refused] = _Future()
        batch.append((session, envelope, waiter))
        return waiter

    def _submit_batch(self, store: SqliteStore) -> None:
        """Hand every append gathered in this event-loop turn to the store as one
        operation (one queue entry, one wake-up, one conversion of the clock), then
        mirror each outcome into its session, in order, whether or not its sender still
        waits (a cancelled sender's message is stored), and settle each sender."""
        batch = self._batch
        items = self._items
        self._batch = []
        self._items = []
        if not batch:
            return
        try:
            future = store.append_batch(items, dedup_ttl_ms=self._dedup_ms)
        except Exception as exc:  # closed, a bad bound: every sender is told, none hangs
            self._fail_batch(batch, exc)
            return

        def settle(done: asyncio.Future[list[Appended | Refusal]]) -> None:
            error = done.exception() if not done.cancelled() else StoreClosedError("cancelled")
            if error is not None:
                self._fail_batch(batch, error)
                return
            self._ok = True
            accepted = self._accepted
            for (session, envelope, waiter), result in zip(batch, done.result(), strict=True):
                try:
                    outcome = accepted(session, envelope, result)
                except Exception as exc:  # a bug in mirroring: that sender is told, no hang
                    if not waiter.done():
                        waiter.set_exception(exc)
                    continue
                if not waiter.done():
                    waiter.set_result(outcome)

        future.add_done_callback(settle)

    def _fail_batch(self, batch: list[_Pending], error: BaseException) -> None:
        """Tell every sender still waiting that its append failed (counted and logged per
        sender, as a failed `append` is)."""
        for item in batch:
            waiter = item[2]
            if not waiter.done():
                if isinstance(error, BackendError):
                    self._failed("append", error)
                waiter.set_exception(error)

    async def append_many(
        self, items: Sequence[tuple[SessionView, Envelope, bool]]
    ) -> list[Accepted | Refused | BackendError]:
        """A critical broadcast: every copy in one transaction (one row per client) when
        the copies share one message, else each on its own (group-committed together)."""
        if not items:
            return []
        try:
            unseen = [s for s, _, _ in items if not cast("MirroredSession", s).stream_known]
            if unseen:
                await asyncio.gather(*(self._ensure_loaded(s) for s in unseen))
        except BackendError as exc:
            return [exc] * len(items)
        # A plain-mode client the hub may write to directly, with nothing held for it (this
        # single node's session mirrors the file) and no dedup key to record durably: its
        # copy is written, not stored (written is delivered in plain mode).
        direct = [e.direct and e.dedup_key is None and not s.outbox for s, e, _ in items]
        if any(direct):
            rest = [item for item, d in zip(items, direct, strict=True) if not d]
            stored = iter(await self.append_many(rest) if rest else [])
            return [_DIRECT if d else next(stored) for d in direct]
        first = items[0][1]
        same = all(
            e.data is first.data
            and e.message_id == first.message_id
            and e.expires_at == first.expires_at
            and e.dedup_key == first.dedup_key
            for _, e, _ in items
        )
        sessions = [s for s, _, _ in items]
        bounds = {(s.outbox.max_size, s.outbox.policy) for s in sessions}
        dedup = {s.dedup is not None for s in sessions}
        if same and len(bounds) == 1 and len(dedup) == 1:
            max_size, policy = bounds.pop()
            try:
                results = await self._call(
                    "append_many",
                    self.store.append_many(
                        [s.client_id for s in sessions],
                        self._row(first),
                        max_size=max_size,
                        policy=policy,
                        dedup_key=first.dedup_key if dedup.pop() else None,
                        dedup_ttl_ms=self._dedup_ms,
                    ),
                )
            except BackendError as exc:
                return [exc] * len(items)
            return [self._accepted(s, e, r) for (s, e, _), r in zip(items, results, strict=True)]
        each = await asyncio.gather(
            *(self.append(s, e, local=local) for s, e, local in items), return_exceptions=True
        )
        checked: list[Accepted | Refused | BackendError] = []
        for outcome in each:
            if isinstance(outcome, BaseException) and not isinstance(outcome, BackendError):
                raise outcome
            checked.append(outcome)
        return checked

    async def ack(self, session: SessionView, seq: int) -> bool:
        """Delete everything up to `seq` (the store clamps a seq beyond its last one).
        Always True: this process is the stream's only writer, so it cannot have been
        recreated under the session."""
        await self._call("ack", self.store.ack(session.client_id, seq))
        return True

    async def ack_many(self, acks: Sequence[tuple[SessionView, int]]) -> list[bool]:
        store = self.store
        await self._call(
            "ack_many", asyncio.gather(*(store.ack(s.client_id, seq) for s, seq in acks))
        )
        return [True] * len(acks)

    async def attach(
        self, session: SessionView, last_seq: int, epoch: str | None
    ) -> StoredOutbox | None:
        client_id = session.client_id
        with self._load(client_id) as load:
            resumed = await self._call("attach", self.store.resume(client_id, last_seq, epoch))
        stored = self._outbox(
            session, resumed.stream, self._fresh(client_id, load, resumed.messages)
        )
        stored.reset = resumed.reset
        await self._drop_expired(session, stored)
        return stored

    async def load(self, session: SessionView, *, after: int = 0) -> StoredOutbox | None:
        client_id = session.client_id
        with self._load(client_id) as load:
            loaded = await self._call("load", self.store.load(client_id, after=after))
        if loaded is None:
            return self._outbox(session, None, [])
        stored = self._outbox(session, loaded.stream, self._fresh(client_id, load, loaded.messages))
        await self._drop_expired(session, stored)
        return stored

    async def discard(self, session: SessionView, envelopes: list[Envelope]) -> None:
        seqs = [e.seq for e in envelopes if e.seq is not None]
        if seqs:
            await self._call("discard", self.store.discard(session.client_id, seqs))

    def record_attempts(self, session: SessionView, envelope: Envelope) -> None:
        """A delivery attempt of this stored message failed: keep its count in the file,
        so that its retry budget is not started again after a restart. Not awaited: the
        counts of an event-loop turn go to the writer queue together and commit with the
        group; a count that cannot be written is logged (the message is still stored and
        retried, with a budget counted from the last count written)."""
        seq = envelope.seq
        if seq is None or self._store is None:
            return
        pending = self._attempts
        if not pending:
            asyncio.get_running_loop().call_soon(self._submit_attempts)
        counts = pending.get(session.client_id)
        if counts is None:
            counts = pending[session.client_id] = {}
        counts[seq] = envelope.attempts

    def _submit_attempts(self) -> None:
        pending = self._attempts
        if not pending:
            return
        self._attempts = {}
        store = self._store
        if store is None:
            return
        task = asyncio.ensure_future(self._write_attempts(store, pending))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _write_attempts(self, store: SqliteStore, pending: dict[str, dict[int, int]]) -> None:
        calls = [store.record_attempts(client_id, counts) for client_id, counts in pending.items()]
        with contextlib.suppress(BackendError):  # counted and logged by _call
            await self._call("record_attempts", asyncio.gather(*calls))

    async def dead_letter(self, session: SessionView, letter: DeadLetter) -> None:
        """Keep the letter in the file and remove its message from the stream (one
        transaction)."""
        data = letter.data
        kind, raw = (
            (MessageKind.BYTES, data)
            if isinstance(data, bytes)
            else (MessageKind.TEXT, data.encode("utf-8", "surrogatepass"))
        )
        failed_ms = int(letter.failed_at * 1000)
        record = DeadLetterRecord(
            letter.seq,
            letter.message_id,
            raw,
            kind,
            letter.attempts,
            letter.reason,
            failed_ms,
            failed_ms,
        )
        await self._call("dead_letter", self.store.dead_letter(session.client_id, record))

    async def dead_letters(self, client_id: str) -> list[DeadLetterRecord]:
        """The client's dead letters kept in the file, newest first."""
        result: list[DeadLetterRecord] = await self._call(
            "dead_letters", self.store.dead_letters(client_id)
        )
        return result

    async def pending_count(self, client_id: str) -> int | None:
        result: int = await self._call("pending_count", self.store.pending_count(client_id))
        return result

    async def pending_counts(self, client_ids: list[str]) -> int | None:
        """Every message the file holds. The store is single-node, so every client in it
        is this hub's, also those it has not tracked since it started (`client_ids` is a
        subset): what stays in the file at shutdown is this total. Counted after the
        writes already queued (an ack the hub has counted as delivered is not pending)."""
        store = self.store
        self._submit_batch(store)  # appends of this turn go first, so that they are counted
        result: int = await self._call("pending_counts", store.total_pending(after_writes=True))
        return result

    async def expire_stored(self, sessions: Mapping[str, SessionView]) -> dict[str, int]:
        """Delete expired rows and dedup keys from the file (in chunks) and return how many
        messages expired per client, for the hub to count: those of clients no session
        mirrors (`sessions`: the hub's; not seen since the restart). A mirroring session
        expires, counts and discards its own copies in the hub's retry cycle (every
        `retry_interval`); rows are taken only a grace period after their deadline, so
        that cycle has long done so and nothing is counted twice or dropped uncounted. A
        client not seen since the restart loses nothing by the wait: loading skips (and
        counts) expired rows.

        The pass runs over several transactions, and a client's first send (or connect)
        may load its stream meanwhile: each deleted row is counted once, by the pass or by
        the session, whichever order the load's read and its answer take against the
        deletions. A session counts as mirroring only if it did when the pass began; a
        load whose answer comes back during the pass records what it saw (those rows are
        its session's), and one whose answer comes back after the pass ended leaves out
        the rows the pass deleted and counted (see `_fresh`).

        A pass that fails, or is cut short by close(), after some of its transactions
        committed returns what those deleted (the failure is logged and counted as an
        error); raises only when nothing of it committed."""
        grace = max(60.0, 10 * self.config.retry_interval)
        cutoff = int((self.clock.wall() - grace) * 1000)
        known = {cid for cid, s in sessions.items() if cast("MirroredSession", s).stream_known}
        loads: dict[str, set[tuple[int, str]]] = {}
        self._passes.append(loads)
        try:
            report = await self._call("expire", self.store.expire(cutoff))
        except StoreError as exc:
            if not isinstance(exc.partial, ExpiryReport):
                raise  # nothing of the pass committed
            # Failed (logged and counted by _call) or cut short by close() after some
            # chunks committed: their rows are gone from the file, so they are returned
            # to be counted like those of a whole pass. Those of the chunk that rolled
            # back are still in the file, for the next pass.
            report = exc.partial
        finally:
            self._passes.remove(loads)
        return self._count_expired(report, known, loads)

    def _count_expired(
        self, report: ExpiryReport, known: set[str], loads: dict[str, set[tuple[int, str]]]
    ) -> dict[str, int]:
        """Count the rows an expiry pass deleted (see `expire_stored`)."""
        counts: dict[str, int] = {}
        loading = self._loading
        for message in report.messages:
            cid = message.client_id
            if cid in known:
                continue
            seen = loads.get(cid)
            row = (message.seq, message.message_id)
            if seen is None or row not in seen:
                counts[cid] = counts.get(cid, 0) + 1
                # A load still in flight may have read this row before it was deleted:
                # counted here, so it must not reach its session (see _fresh).
                for load in loading.get(cid, ()):
                    load.counted.add(row)
        total = sum(counts.values())
        if total:
            self.expired += total
            log.info(
                "tether: %d stored message(s) of %d offline client(s) expired undelivered",
                total,
                len(counts),
            )
        return counts

    # ------------------------------------------------------------------ best-effort dedup

    async def seen(self, session: SessionView, key: str) -> bool:
        if session.dedup is None:
            return False
        if session.dedup.seen(key):
            return True
        result: bool = await self._call("seen", self.store.seen(session.client_id, key))
        return result

    async def remember(self, session: SessionView, key: str) -> None:
        """Record a best-effort dedup key: at once in the session's window, in the file in
        the background (a best-effort send does not wait for a commit)."""
        if session.dedup is None:
            return
        session.dedup.record(key)
        task = asyncio.ensure_future(self._remember(session.client_id, key))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _remember(self, client_id: str, key: str) -> None:
        with contextlib.suppress(BackendError):  # counted and logged by _call
            await self._call("remember", self.store.remember(client_id, key, ttl_ms=self._dedup_ms))
