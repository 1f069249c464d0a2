"""Applying what a store returns to a session: mirrored messages, adopted streams, lost streams."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from .accounting import Accounting
from .backends import StoredOutbox
from .messages import Envelope
from .registry import ClientRegistry
from .session import ClientSession
from .tasks import BackgroundTasks

log = logging.getLogger("tether")


def mirror(client: ClientSession, envelope: Envelope) -> None:
    """Put a stored message into the session's outbox. The store already applied the
    bound, so the local copy must not refuse it."""
    if not client.outbox.push(envelope).accepted:
        client.outbox.queue.append(envelope)


class StreamKeeper:
    """Keeps a session's stream (numbering, epoch, outbox) in step with a shared store."""

    __slots__ = ("_acct", "_registry", "_tasks", "restore")

    def __init__(
        self, accounting: Accounting, registry: ClientRegistry, tasks: BackgroundTasks
    ) -> None:
        self._acct = accounting
        self._registry = registry
        self._tasks = tasks
        # Stores a plain-mode client's copies again in its recreated stream (the
        # pipeline's `restore`); None: there is no store to put them back into.
        self.restore: (
            Callable[[ClientSession, list[Envelope], str | None, int | None], Awaitable[None]]
            | None
        ) = None

    def adopt(self, client: ClientSession, stored: StoredOutbox) -> None:
        """Make the session mirror the stored stream (lock held)."""
        client.outbox.drain()
        for envelope in stored.envelopes:
            mirror(client, envelope)
        if stored.epoch != client.epoch:  # another numbering: nothing of ours carries over
            client.next_seq = stored.next_seq
            client.acked = stored.acked
        else:
            client.next_seq = max(client.next_seq, stored.next_seq)
            client.acked = max(client.acked, stored.acked)
        client.epoch = stored.epoch
        client.stream_known = True
        for _ in stored.expired:
            self._acct.expired(client)

    def extend(self, client: ClientSession, stored: StoredOutbox, after: int) -> bool:
        """Add what other nodes stored after seq `after` (lock held). False — and the
        connection is closed — when the stored stream is another epoch."""
        for _ in stored.expired:  # past their TTL, removed by the load: counted here
            self._acct.expired(client)
        if client.epoch is not None and (
            stored.epoch != client.epoch or stored.next_seq < client.next_seq
        ):
            # recreated under this connection (keys vanished), or rolled back (a failover
            # lost the last writes, whose numbers may now be reused)
            rolled = stored.epoch == client.epoch
            self.lost(client, stored.next_seq - 1 if rolled else None)
            return False
        client.epoch = stored.epoch
        for envelope in stored.envelopes:
            if (envelope.seq or 0) > after:
                mirror(client, envelope)
        client.next_seq = max(client.next_seq, stored.next_seq)
        return True

    def lost(self, client: ClientSession, upto: int | None = None) -> None:
        """The stored stream was recreated under a connected client (its keys vanished):
        its numbering is no longer the one this connection speaks. Close the connection
        (1012, so the client comes back at once); its resume is answered with a reset and
        nothing is resumed over. A plain-mode client has no resume to be told of a loss:
        the copies this node holds for it (undelivered: written is delivered in plain
        mode) are stored again in the new stream, in order (`restore`). `upto`: the stream
        was rolled back (same epoch) to that counter; the copies numbered up to there that
        another node delivered meanwhile are not stored again."""
        log.warning(
            "tether: the stored stream of %s was recreated under its connection; "
            "closing it so that its resume reports the reset",
            client.client_id,
        )
        transport = client.transport
        drained = client.outbox.drain()
        if drained and not client.v1 and self.restore is not None:
            # the epoch their seqs belong to: those another node delivered meanwhile
            # (acked in that epoch) are not stored again
            self._tasks.spawn(self.restore(client, drained, client.epoch, upto))
        client.epoch = None
        client.stream_known = False
        if transport is not None:
            self._registry.detach(client, transport, failed=False)
            self._tasks.close_later(transport, 1012, "stream reset; reconnect")
