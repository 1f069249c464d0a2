"""Broadcast fan-out: one envelope to many clients, without a task per client where possible."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from .backends import Accepted, Backend, BackendError, Refused
from .envelopes import Rejected, copy_for_client
from .messages import BroadcastResult, Envelope, SendResult, SendStatus
from .pipeline import DeliveryPipeline, Trims, may_write_directly
from .protocol import valid_client_id
from .registry import ClientRegistry
from .session import ClientSession
from .tasks import BackgroundTasks
from .writes import OK

log = logging.getLogger("tether")


class FanOut:
    """Delivers a broadcast: picks the targets, fans out, publishes to the cluster."""

    __slots__ = ("_backend", "_pipeline", "_registry", "_tasks")

    def __init__(
        self,
        backend: Backend,
        registry: ClientRegistry,
        pipeline: DeliveryPipeline,
        tasks: BackgroundTasks,
    ) -> None:
        self._backend = backend
        self._registry = registry
        self._pipeline = pipeline
        self._tasks = tasks

    def targets(
        self, group: str | None, *, critical: bool, exclude: Iterable[str], closing: bool
    ) -> tuple[list[ClientSession], Awaitable[list[ClientSession]] | None]:
        """The sessions a broadcast goes to: connected ones (critical: every known one),
        of `group` if given. With a shared backend a critical broadcast also covers the
        clients only other nodes know: the second value, a task already asking the store
        (its round trip then overlaps the storing of the local copies), gives their
        sessions (tracked here from now on); None when there is nothing to ask."""
        registry = self._registry
        ids: Iterable[str] = (
            registry.groups.get(group, ()) if group is not None else registry.sessions
        )
        skip = set(exclude)
        sessions = registry.sessions
        local = [
            c
            for cid in list(ids)
            if cid not in skip
            and (c := sessions.get(cid)) is not None
            and (critical or c.connected)
        ]
        if not (critical and self._backend.shared and not closing):
            return local, None
        skip.update(c.client_id for c in local)
        return local, asyncio.ensure_future(self._cluster_only(group, skip))

    async def _cluster_only(self, group: str | None, skip: set[str]) -> list[ClientSession]:
        """The sessions of the clients the cluster knows in `group` but not in `skip`
        (the ones this node did not track yet are tracked from now on); none when the
        store cannot say (logged: the broadcast reaches the local ones, whose copies may
        be stored already)."""
        try:
            cluster = await self._backend.members(group)
        except BackendError as exc:
            log.warning("tether: cluster membership unavailable: %s", exc)
            return []
        except Exception:
            log.exception("tether: cluster membership unavailable")
            return []
        registry = self._registry
        sessions = registry.sessions
        for cid in cluster or ():
            if cid not in sessions and valid_client_id(cid):
                with contextlib.suppress(Rejected):
                    registry.track(cid)
        if not cluster:
            return []
        return [c for cid in cluster.difference(skip) if (c := sessions.get(cid)) is not None]

    async def deliver(
        self,
        targets: list[ClientSession],
        template: Envelope,
        more: Awaitable[list[ClientSession]] | None = None,
    ) -> list[SendResult]:
        """Deliver `template` to every target, concurrently where it must wait; and to
        the sessions `more` gives (see `targets`) as soon as it gives them."""
        if more is not None:
            # The local part runs in this task, so it takes its clients' locks before the
            # first await (in order with the deliveries started after this broadcast);
            # the others join when the store has named them.
            there = asyncio.ensure_future(self._deliver_more(more, template))
            try:
                here = await self.deliver(targets, template)
            except BaseException:
                there.cancel()
                raise
            return here + await there
        pipeline = self._pipeline
        if not template.critical:
            # A best-effort envelope is never stored or changed per client: shared. Without
            # a dedup key (checked through the backend) most deliveries finish synchronously,
            # in one batch: one clock read stamps them, one latency sample times them.
            if template.dedup_key is not None:
                return await _fan_out(
                    targets, template, copies=False, now=None, awaited=pipeline.deliver
                )
            best_effort = pipeline.best_effort
            best_effort.start_batch()
            return await _fan_out(
                targets,
                template,
                copies=False,
                now=best_effort.send_now_batched,
                awaited=pipeline.deliver,
                synchronous_done=best_effort.end_batch,
            )
        if pipeline.append_now is None:  # a store that must be awaited
            return await self._deliver_stored(targets, template)
        # each client's copy gets its own seq and attempts in its outbox
        pipeline.start_batch()
        return await _fan_out(
            targets,
            template,
            copies=True,
            now=pipeline.accept_now,
            awaited=pipeline.deliver,
            synchronous_done=pipeline.end_batch,
        )

    async def _deliver_more(
        self, more: Awaitable[list[ClientSession]], template: Envelope
    ) -> list[SendResult]:
        targets = await more
        return await self.deliver(targets, template) if targets else []

    async def publish(self, template: Envelope, group: str | None) -> None:
        """Hand a best-effort broadcast to the other nodes (they deliver to their clients)."""
        if template.critical or not self._backend.shared:
            return
        try:
            await self._backend.publish_broadcast(template, group)
        except BackendError as exc:
            log.warning("tether: broadcast not published to the cluster: %s", exc)

    async def _deliver_stored(
        self, targets: list[ClientSession], template: Envelope
    ) -> list[SendResult]:
        """A critical broadcast through a store that must be awaited: every client's copy
        is stored in one batch (one or a few round trips), then written without a task
        per client. Clients whose lock is taken (a send in progress) keep their order by
        going through the per-client path."""
        trims: Trims = []
        busy: list[ClientSession] = []
        unwritten: list[ClientSession] = []
        results = await self._store_and_write(targets, template, trims, busy, unwritten)
        if trims:
            self._tasks.spawn(self._trim_stored(trims))
        if busy or unwritten:
            deliver = self._pipeline.deliver
            results += await asyncio.gather(
                *(deliver(c, copy_for_client(template)) for c in busy),
                *(deliver(c, copy_for_client(template)) for c in unwritten),
            )
        return results

    async def _store_and_write(
        self,
        targets: list[ClientSession],
        template: Envelope,
        trims: Trims,
        busy: list[ClientSession],
        unwritten: list[ClientSession],
    ) -> list[SendResult]:
        """Store a copy for each client, in the backend's `store_slice` slices handed to
        the store as they are built: a store a round trip away gets the first slices on
        their way while this process builds the later ones, and works on the later ones
        while it writes the copies of the first. The first slice is a quarter of the
        others, so the store starts sooner. Every target's lock is taken first, in one
        step without awaiting (a client found busy goes to `busy`), so this broadcast is
        ordered against other deliveries for all its clients at once, and each slice's
        locks are given back once its copies are written. A plain-mode client the store
        clears for direct delivery is written to without a stored copy; one whose socket
        does not take it goes to `unwritten`."""
        pipeline = self._pipeline
        results: list[SendResult] = []
        free: list[ClientSession] = []
        for client in targets:
            if (client.connected and client.try_send is None) or (not client.lock.take_if_free()):
                busy.append(client)
            else:
                free.append(client)
        slices: list[list[tuple[ClientSession, Envelope, bool]]] = []
        stored = []
        append_many = self._backend.append_many
        size = getattr(self._backend, "store_slice", None) or max(1, len(free))
        released = 0  # clients of `free` whose locks were given back, in order
        settled = 0  # slices whose store outcome this broadcast took in
        try:
            start, step = 0, size if size >= len(free) else max(1, size // 4)
            while start < len(free):
                if slices:
                    # the previous slice's task submits it, and a later turn sends it
                    await asyncio.sleep(0)
                part = []
                for client in free[start : start + step]:
                    envelope = copy_for_client(template)
                    envelope.direct = may_write_directly(client, envelope)
                    part.append((client, envelope, client.connected))
                start, step = start + step, size
                slices.append(part)
                stored.append(asyncio.ensure_future(append_many(part)))
            for part, pending in zip(slices, stored, strict=True):
                outcomes = await pending
                settled += 1
                now = pipeline.clock.now()
                # nothing awaited until `end_batch`: the slice's plain-mode deliveries are
                # timed by one weighted latency sample, as the memory store's fan-out does
                pipeline.start_batch()
                try:
                    self._settle_slice(part, outcomes, now, results, trims, unwritten)
                finally:
                    pipeline.end_batch(template)
                for client, _, _ in part:
                    client.lock.release()
                released += len(part)
        finally:
            for client in free[released:]:
                client.lock.release()
            if self._backend.shared:
                # Cancelled (or failed) with slices on their way: their copies may be
                # stored without this node mirroring them. Once the store has answered,
                # their clients connected here load what it holds (as `_accept` does).
                for part, pending in zip(slices[settled:], stored[settled:], strict=True):
                    ids = [client.client_id for client, _, _ in part]
                    self._tasks.spawn(self._load_after(pending, ids))
        return results

    async def _load_after(self, pending: asyncio.Future[Any], client_ids: list[str]) -> None:
        await asyncio.wait([pending])  # the store's answer, whatever it was
        load_new = self._pipeline.load_new
        await asyncio.gather(*(load_new(cid) for cid in client_ids))

    def _settle_slice(
        self,
        part: list[tuple[ClientSession, Envelope, bool]],
        outcomes: list[Accepted | Refused | BackendError],
        now: float,
        results: list[SendResult],
        trims: Trims,
        unwritten: list[ClientSession],
    ) -> None:
        """Apply a slice's store outcomes: write what the store cleared or stored for a
        connected client (locks held), answer the rest."""
        pipeline = self._pipeline
        write_now, written_directly = pipeline.writer.write_now, pipeline.written_directly
        for (client, envelope, local), outcome in zip(part, outcomes, strict=True):
            client.last_seen = now
            if isinstance(outcome, BackendError):
                results.append(pipeline.store_failed(client, envelope, outcome))
                continue
            if isinstance(outcome, Accepted) and outcome.direct:
                if write_now(client, envelope.data) is OK:
                    results.append(written_directly(client, envelope, now))
                else:  # the socket did not take it: stored after all, in order
                    unwritten.append(client)
                continue
            settled = pipeline.settle(client, envelope, outcome, local)
            if settled is None:
                settled = pipeline.write_stored_now(client, envelope, trims)
            results.append(settled)

    async def _trim_stored(self, trims: Trims) -> None:
        """Tell a durable store that plain-mode writes delivered these messages."""
        try:
            await self._backend.ack_many(trims)
        except BackendError as exc:  # re-sent after a reconnect; counted by the backend
            log.warning("tether: could not record %d deliveries: %s", len(trims), exc)


async def _fan_out(
    targets: list[ClientSession],
    template: Envelope,
    *,
    copies: bool,
    now: Callable[[ClientSession, Envelope], SendResult | None] | None,
    awaited: Callable[[ClientSession, Envelope], Awaitable[SendResult]],
    synchronous_done: Callable[[Envelope], None] | None = None,
) -> list[SendResult]:
    """Deliver to each target with `now` (no task) when it completes synchronously, the
    rest with `awaited`, concurrently. `copies`: each client gets its own envelope.
    `synchronous_done` is called once the synchronous part is over, before any await."""
    results: list[SendResult] = []
    waiting = []
    try:
        for client in targets:
            envelope = copy_for_client(template) if copies else template
            result = now(client, envelope) if now is not None else None
            if result is None:
                waiting.append(awaited(client, envelope))
            else:
                results.append(result)
    finally:
        if synchronous_done is not None:
            synchronous_done(template)
    if waiting:
        results += await asyncio.gather(*waiting)
    return results


def tally(message_id: str, results: Iterable[SendResult]) -> BroadcastResult:
    """Count a broadcast's per-client results by status and reason."""
    counts = dict.fromkeys(SendStatus, 0)
    reasons: dict[str, int] = {}
    for result in results:
        counts[result.status] += 1
        if result.reason is not None:
            reasons[result.reason] = reasons.get(result.reason, 0) + 1
    return BroadcastResult(
        message_id,
        sent=counts[SendStatus.SENT],
        queued=counts[SendStatus.QUEUED],
        duplicate=counts[SendStatus.DUPLICATE],
        dropped=counts[SendStatus.DROPPED],
        rejected=counts[SendStatus.REJECTED],
        reasons=reasons,
        unknown=counts[SendStatus.UNKNOWN],
    )
