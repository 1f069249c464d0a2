"""Coalesces the Redis backend's stream writes into pipelines: one round trip per event-loop turn.

Every append and ack submitted while the event loop runs one batch of ready callbacks is
sent when that batch is done, as one script call per key group (one for everything on a
single Redis, one per node on a Cluster), in pipelines of at most `PIPELINE_ITEMS`
items per key group. One pipeline goes out per free slot (`max_in_flight`); what
arrives meanwhile waits, so batches grow with the load instead of the number of
connections. Replies to many separate senders are handed out in two halves, two turns
apart, so that two batches alternate (see `STAGGER_AT`).

A submission (a "ticket") is a list of items with one future: a broadcast's 1,000 copies
cost one future, not 1,000. Items are strings, or bytes for binary-packed items (see
`redis_scripts` for their formats); the items of one call travel as one argument, since
packing and parsing many small arguments is most of what a pipeline costs in Python.

Concurrency invariant: the batcher runs on one event loop; `_queue` is only touched from
it. A ticket's future is resolved exactly once, with one reply per item in submission
order, or with a `BackendError` (`OutcomeUnknown` when the pipeline may have run).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from struct import Struct
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .base import BackendError, NotReplicated, OutcomeUnknown
from .redis_connection import NotRun, ReplicationShortfall, never_sent, refused

# A call that failed with one of these was sent, and may have run (a node died mid-call).
_IN_DOUBT = (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError)

# A turn's work beyond this many items per key group goes out as several pipelines on
# several connections: Redis runs the next while this process handles the replies of the
# first.
PIPELINE_ITEMS = 128

# Many senders each awaiting their own store move in lockstep: all wait for one pipeline,
# all resume in one turn and fill the next, so Redis idles while this process works and
# the other way round. A pipeline answering at least this many separate submissions hands
# out the second half of its replies two loop turns after the first: by then the first
# half's next pipeline has been sent, and Redis stores it while the second half runs (on a
# Cluster: half of each node's senders, the senders of all nodes counted together). Two
# batches in flight, one being stored, one being prepared: more sends/s for some more CPU
# per send, from twice the pipelines (figures in docs/operations.md). A broadcast is one
# submission and is never split.
STAGGER_AT = 64


@dataclass(slots=True)
class _Ticket:
    future: asyncio.Future[list[Any]]
    replies: list[Any]
    missing: int
    # Sent in more than one pipeline: one of them failing says nothing of the others,
    # which may have stored their part, so a failure is an unknown outcome.
    split: bool = False


@dataclass(slots=True)
class _Run:
    """Items of one submission, one script and one key group: their replies go to the
    ticket's positions `indices` (None: consecutive, from `start` on), or, with `start`
    -1, the one item's reply is `sink`'s result itself."""

    sink: Any  # a _Ticket, or the future of a single item
    start: int
    texts: list[Any]  # all str, or all bytes (binary-packed items)
    payload: bytes | None
    indices: list[int] | None = None


@dataclass(slots=True)
class _Call:
    """One script call being filled: runs of items of one script and key group."""

    script: str
    group: Hashable
    runs: list[_Run] = field(default_factory=list)
    size: int = 0  # items in all runs


@dataclass(frozen=True, slots=True)
class Request:
    """What the runner sends for one call: `payloads` (the payload table: each shared
    payload once, in index order, joined) and `items` (the items joined: one string, or
    bytes for binary items)."""

    script: str
    group: Hashable
    payloads: bytes
    items: str | bytes


Runner = Callable[[list[Request]], Awaitable[list[Any]]]

# A binary item's payload index (see `redis_scripts.APPEND`): at most PIPELINE_ITEMS payloads.
_INDEX = Struct(">H")
assert PIPELINE_ITEMS <= 0xFFFF, "a call's payload index must fit its uint16"


class StreamBatcher:
    """Queues script items and runs them in pipelines.

    `run(requests)` executes the calls in one pipeline and returns one reply (a list, one
    entry per item) or exception instance per call; it raises `BackendError` when the
    pipeline as a whole failed.
    """

    def __init__(
        self,
        run: Runner,
        *,
        max_in_flight: int = 2,
        regroup: Callable[[Any], Hashable] | None = None,
    ) -> None:
        self._run = run
        # An append item's own key group (its Cluster bucket), for a call refused unrun
        # because the one bucket key it declares is migrating: its items are sent again
        # once, one call per bucket, so that only the migrating bucket's items fail.
        self._regroup = regroup
        self._max_in_flight = max_in_flight
        self._queue: dict[tuple[str, Hashable], _Call] = {}
        self._in_flight = 0
        # Pipelines built from the queue but not sent: each waits for a free slot, in
        # order, and the queue is not built from until they are all sent (FIFO per key).
        self._ready: deque[list[_Call]] = deque()
        self._scheduled = False
        self._closed = False
        self._tasks: dict[asyncio.Task[None], list[_Call]] = {}  # in flight, and their chunks
        # second halves of answered pipelines not yet handed out (see STAGGER_AT)
        self._later: list[tuple[list[_Run], list[Any], int]] = []
        self._loop: asyncio.AbstractEventLoop | None = None  # the one loop it runs on
        self.pipelines = 0  # pipelines sent, for tests and benchmarks
        self.calls = 0  # script calls sent

    def submit(
        self,
        script: str,
        entries: Sequence[tuple[Hashable, str]] | Sequence[tuple[Hashable, bytes]],
        payload: bytes | None = None,
    ) -> asyncio.Future[list[Any]]:
        """Queue items `(group, item)` (all text or all binary); the future gets their
        replies, in order. `payload` (shared by these items) is sent once per call however
        many use it."""
        future, ticket = self._ticket(len(entries))
        if ticket is None:
            return future
        # one run per group (a Cluster node), in submission order within it
        by_group: dict[Hashable, tuple[list[int], list[Any]]] = {}
        for index, (group, text) in enumerate(entries):
            run = by_group.get(group)
            if run is None:
                run = by_group[group] = ([], [])
            run[0].append(index)
            run[1].append(text)
        for group, (indices, texts) in by_group.items():
            self._queue_run(script, group, _Run(ticket, indices[0], texts, payload, indices))
        return future

    def submit_group(
        self, script: str, group: Hashable, texts: list[Any], payload: bytes | None = None
    ) -> asyncio.Future[list[Any]]:
        """`submit` for items that all join one key group (everything on a single Redis):
        one run, whatever their number."""
        future, ticket = self._ticket(len(texts))
        if ticket is not None:
            self._queue_run(script, group, _Run(ticket, 0, texts, payload))
        return future

    def submit_one(
        self, script: str, group: Hashable, item: str | bytes, payload: bytes | None = None
    ) -> asyncio.Future[Any]:
        """Queue one item; the future gets its reply itself (not a list of one). The
        common case (one send), without a ticket."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue_run(script, group, _Run(future, -1, [item], payload))
        return future

    def _ticket(self, count: int) -> tuple[asyncio.Future[list[Any]], _Ticket | None]:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        if not count:
            future.set_result([])
            return future, None
        return future, _Ticket(future, [None] * count, count)

    def _queue_run(self, script: str, group: Hashable, run: _Run) -> None:
        if self._closed:
            self._fail(_Call(script, group, [run]), BackendError("backend closed"))
            return
        call = self._queue.get((script, group))
        if call is None:
            call = self._queue[(script, group)] = _Call(script, group)
        call.runs.append(run)
        call.size += len(run.texts)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._start)

    def _start(self) -> None:
        self._scheduled = False
        if self._closed:
            return
        ready = self._ready
        # One pipeline per free slot, never more: Redis reads the pipelines that arrive
        # while it runs a script all at once, runs them back to back and answers them
        # together, so a burst sent at once comes back at once, and this process handles
        # all those replies while Redis idles. Sent one per slot, with two slots one runs
        # while the next waits, and each reply comes back on its own.
        while self._in_flight < self._max_in_flight:
            if not ready:
                if not self._queue:
                    break
                ready.extend(self._build())
            chunks = ready.popleft()
            self._in_flight += 1
            task = asyncio.ensure_future(self._flush(chunks))
            # Until it ends, the task owns these chunks: close() fails them if it is
            # cancelled before its first step (then nothing was sent).
            self._tasks[task] = chunks
            task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)

    def _build(self) -> list[list[_Call]]:
        """The queue as pipelines (see `PIPELINE_ITEMS`); the queue is emptied."""
        calls, self._queue = list(self._queue.values()), {}
        pipelines: list[list[_Call]] = [[]]
        # Per key group (a Cluster node): the pipeline its items go into now and the room
        # left there. Each node's call holds up to PIPELINE_ITEMS items, so a Cluster's
        # pipeline carries as many per node as a single server's (not a third of them).
        fill: dict[Hashable, list[int]] = {}
        for call in calls:
            at = fill.get(call.group)
            if at is None:
                at = fill[call.group] = [0, PIPELINE_ITEMS]
            if call.size <= at[1]:  # the common case: the whole call fits, as queued
                pipelines[at[0]].append(call)
                at[1] -= call.size
                continue
            part = _Call(call.script, call.group)
            for run in call.runs:
                texts, start, offset = run.texts, run.start, 0
                while offset < len(texts):
                    if not at[1]:  # full for this group: the rest goes into the next
                        if part.runs:
                            pipelines[at[0]].append(part)
                            part = _Call(call.script, call.group)
                        at[0] += 1
                        at[1] = PIPELINE_ITEMS
                        if at[0] == len(pipelines):
                            pipelines.append([])
                    take = min(at[1], len(texts) - offset)
                    piece = texts if take == len(texts) else texts[offset : offset + take]
                    indices = run.indices
                    if indices is not None and take != len(texts):
                        indices = indices[offset : offset + take]
                    part.runs.append(
                        _Run(
                            run.sink,
                            start + offset if start >= 0 else -1,
                            piece,
                            run.payload,
                            indices,
                        )
                    )
                    part.size += take
                    offset += take
                    at[1] -= take
            if part.runs:
                pipelines[at[0]].append(part)
        if len(pipelines) > 1:
            seen: dict[int, int] = {}  # ticket -> the pipeline it was first seen in
            for number, chunks in enumerate(pipelines):
                for chunk in chunks:
                    for run in chunk.runs:
                        if run.start >= 0 and seen.setdefault(id(run.sink), number) != number:
                            run.sink.split = True
        return pipelines

    async def _flush(self, chunks: list[_Call]) -> None:
        try:
            await self._send(chunks, retry_noscript=True)
        finally:
            self._in_flight -= 1
            if (self._queue or self._ready) and not self._scheduled:
                self._scheduled = True
                asyncio.get_running_loop().call_soon(self._start)

    async def _send(
        self, chunks: list[_Call], *, retry_noscript: bool, regrouped: bool = False
    ) -> None:
        try:
            requests = [self._request(chunk) for chunk in chunks]
        except Exception as exc:  # a packing bug: nothing was sent, so nothing was stored
            for chunk in chunks:
                self._fail(chunk, BackendError(f"Redis {chunk.script}: not sent ({exc!r})"))
            return
        self.pipelines += 1
        self.calls += len(requests)
        try:
            replies = await self._run(requests)
        except BaseException as exc:
            # Cancelled or failed while sent: what ran is unknown.
            failure = exc if isinstance(exc, BackendError) else OutcomeUnknown(repr(exc))
            for chunk in chunks:
                self._fail(chunk, failure)
            if not isinstance(exc, Exception):
                raise
            return
        missing: list[_Call] = []
        moving: list[_Call] = []
        # the senders of a Cluster's pipeline are spread over its nodes' calls: counted together
        stagger = sum(len(chunk.runs) for chunk in chunks) >= STAGGER_AT
        for chunk, reply in zip(chunks, replies, strict=True):
            if isinstance(reply, NoScriptError) and retry_noscript:
                missing.append(chunk)  # nothing ran: safe to send again
            elif isinstance(reply, ReplicationShortfall):
                self._fail(chunk, NotReplicated(f"Redis {chunk.script}: {reply}"))
            elif (
                isinstance(reply, NotRun)
                and not regrouped
                and self._regroup is not None
                and chunk.script == "append"
            ):
                moving.append(chunk)  # its declared bucket migrates: nothing ran
            elif isinstance(reply, Exception) and (never_sent(reply) or refused(reply)):
                # no connection for it, or the server refused it without running it
                # (OOM, READONLY, CLUSTERDOWN, a migrating slot...): nothing was stored
                failure = BackendError(f"Redis {chunk.script} not run: {reply}")
                if regrouped:  # one bucket's items: the other buckets' keep their replies
                    self._fail_items(chunk, failure)
                else:
                    self._fail(chunk, failure)
            elif isinstance(reply, _IN_DOUBT) or (
                isinstance(reply, Exception) and "non local key" in str(reply)
            ):
                # sent, and maybe partly run (a slot moved under a batched call)
                self._fail(chunk, OutcomeUnknown(f"Redis {chunk.script}: no reply ({reply})"))
            elif isinstance(reply, Exception) and chunk.script == "append":
                # The script ran and raised: the items before the error were stored.
                self._fail(chunk, OutcomeUnknown(f"Redis {chunk.script} failed: {reply}"))
            elif isinstance(reply, Exception):
                self._fail(chunk, BackendError(f"Redis {chunk.script} failed: {reply}"))
            elif not isinstance(reply, list) or len(reply) != chunk.size:
                # not what the script returns: a bug, but every future still gets an answer
                self._fail(chunk, OutcomeUnknown(f"Redis {chunk.script}: bad reply {reply!r:.80}"))
            else:
                runs = chunk.runs
                if not stagger:
                    self._settle(runs, reply, 0)
                else:
                    half = len(runs) // 2
                    self._settle(runs[:half], reply, 0)
                    offset = sum(len(run.texts) for run in runs[:half])
                    loop = asyncio.get_running_loop()
                    # two loop turns later: the first half's next pipeline has gone out.
                    # Remembered, so that close() hands these stored replies out at once.
                    later = (runs[half:], reply, offset)
                    self._later.append(later)
                    loop.call_soon(loop.call_soon, self._settle_later, later)
        if missing:
            await self._send(missing, retry_noscript=False, regrouped=regrouped)
        if moving:
            await self._send(self._by_bucket(moving), retry_noscript=False, regrouped=True)

    def _by_bucket(self, chunks: list[_Call]) -> list[_Call]:
        """The items of `chunks` as one call per key group `regroup` names, in order."""
        regroup = self._regroup
        assert regroup is not None
        calls: dict[Hashable, _Call] = {}
        for chunk in chunks:
            for run in chunk.runs:
                for offset, text in enumerate(run.texts):
                    group = regroup(text)
                    call = calls.get(group)
                    if call is None:
                        call = calls[group] = _Call(chunk.script, group)
                    if run.start < 0:
                        piece = _Run(run.sink, -1, [text], run.payload)
                    else:
                        at = run.start + offset if run.indices is None else run.indices[offset]
                        piece = _Run(run.sink, at, [text], run.payload, [at])
                    call.runs.append(piece)
                    call.size += 1
        return list(calls.values())

    @staticmethod
    def _fail_items(chunk: _Call, failure: BackendError) -> None:
        """`failure` as the reply of each of `chunk`'s items (certainly not run): a
        ticket's other items keep theirs."""
        for run in chunk.runs:
            sink, start, count = run.sink, run.start, len(run.texts)
            if start < 0:
                if not sink.done():
                    sink.set_exception(failure)
                continue
            indices = run.indices if run.indices is not None else range(start, start + count)
            for index in indices:
                sink.replies[index] = failure
            sink.missing -= count
            if sink.missing == 0 and not sink.future.done():
                sink.future.set_result(sink.replies)

    def _settle_later(self, later: tuple[list[_Run], list[Any], int]) -> None:
        for index, held in enumerate(self._later):
            if held is later:  # not already handed out by close()
                del self._later[index]
                self._settle(*later)
                return

    @staticmethod
    def _settle(runs: list[_Run], reply: list[Any], offset: int) -> None:
        """Hand `runs` their replies, which start at `reply[offset]`."""
        for run in runs:
            sink, start, count = run.sink, run.start, len(run.texts)
            if start < 0:
                if not sink.done():
                    sink.set_result(reply[offset])
            else:
                if run.indices is None:
                    sink.replies[start : start + count] = reply[offset : offset + count]
                else:
                    replies = sink.replies
                    for index, value in zip(
                        run.indices, reply[offset : offset + count], strict=True
                    ):
                        replies[index] = value
                sink.missing -= count
                if sink.missing == 0 and not sink.future.done():
                    sink.future.set_result(sink.replies)
            offset += count

    @staticmethod
    def _fail(chunk: _Call, failure: BackendError) -> None:
        for run in chunk.runs:
            future = run.sink if run.start < 0 else run.sink.future
            if future.done():
                continue
            if run.start >= 0 and run.sink.split and not isinstance(failure, OutcomeUnknown):
                future.set_exception(
                    OutcomeUnknown(f"{failure}; other parts of this batch may have run")
                )
            else:
                future.set_exception(failure)

    @staticmethod
    def _request(chunk: _Call) -> Request:
        """The payload table (each shared payload once) and the joined items, each
        prefixed with its payload's index when it has one: "<index>|" before a text item,
        the index as a big-endian uint16 before a binary one."""
        index: dict[int, int] = {}
        payloads: list[bytes] = []
        parts: list[Any] = []
        for run in chunk.runs:
            payload = run.payload
            if payload is None:
                parts.extend(run.texts)
                continue
            position = index.get(id(payload))
            if position is None:
                position = index[id(payload)] = len(index) + 1
                payloads.append(payload)
            texts = run.texts
            # a run's items share one payload: joined at once
            prefix: Any = _INDEX.pack(position) if texts[0].__class__ is bytes else f"{position}|"
            parts.append(prefix)
            parts.append(prefix.join(texts))
        joined = (b"" if parts and parts[0].__class__ is bytes else "").join(parts)
        return Request(chunk.script, chunk.group, b"".join(payloads), joined)

    async def close(self) -> None:
        """Cancel what is in flight (those outcomes are unknown) and fail what is queued;
        later submissions fail at once."""
        self._closed = True  # a pipeline ending now must not start the next
        while self._later:  # stored, answered: their senders hear so now
            self._settle(*self._later.pop(0))
        flying = dict(self._tasks)
        for task in flying:
            task.cancel()
        await asyncio.gather(*flying, return_exceptions=True)
        for chunks in flying.values():
            # A task cancelled before its first step never sent its chunks (nothing was
            # stored): their senders are told here. `_fail` skips the futures a task that
            # did run has answered (an unknown outcome, when it was cancelled mid-call).
            for chunk in chunks:
                self._fail(chunk, BackendError("backend closed"))
        while self._ready:
            for call in self._ready.popleft():
                self._fail(call, BackendError("backend closed"))
        for call in self._queue.values():
            self._fail(call, BackendError("backend closed"))
        self._queue = {}
