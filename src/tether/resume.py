"""Settling a reconnecting tether.v1 client's stream against its hello: what it is told, re-sent."""

from __future__ import annotations

from . import protocol
from .messages import Envelope
from .session import ClientSession


def resume(
    client: ClientSession, last_seq: int, session_id: str, epoch: str | None = None
) -> tuple[protocol.Welcome, list[Envelope]]:
    """Settle a client's stream against the `last_seq` of its hello (outbox requeued).

    Not a pure function: it updates the session in place (the caller holds its lock) —
    `acked`, `next_seq`, `highest_written`, `stream_known`, and the outbox, from which
    it removes what the hello acknowledged (or which it renumbers after a reset). No
    I/O, no clock, no counting: the caller delivers, counts and writes the welcome.

    Returns the `welcome` to send and the messages the hello acknowledged (delivered).
    Every seq after the client's position that the outbox no longer holds, and that no
    earlier session acknowledged, is reported lost — never a silent gap. A `last_seq`
    this session never numbered (a restart of a non-durable hub), or of another stream
    `epoch` than the session's, is a reset: numbering continues after it and the welcome
    says so.
    """
    outbox = client.outbox
    client.highest_written = last_seq
    known = client.stream_known
    client.stream_known = True
    foreign = epoch is not None and client.epoch is not None and epoch != client.epoch
    if last_seq >= client.next_seq or (last_seq > 0 and (not known or foreign)):
        for offset, envelope in enumerate(outbox, start=last_seq + 1):
            envelope.seq = offset
        client.next_seq = last_seq + len(outbox) + 1
        client.acked = last_seq
        welcome = protocol.Welcome(
            session=session_id,
            resumed=False,
            next_seq=client.next_seq,
            reset=True,
            acked=last_seq,
            epoch=client.epoch,
        )
        return welcome, []
    delivered = outbox.ack(last_seq)
    floor = max(client.acked, last_seq)
    client.acked = floor
    client.highest_written = floor
    ranges: list[tuple[int, int]] = []
    expected = floor + 1
    for envelope in outbox:
        seq = envelope.seq or 0
        if seq > expected:
            ranges.append((expected, seq - 1))
        expected = max(expected, seq + 1)
    if expected < client.next_seq:
        ranges.append((expected, client.next_seq - 1))
    lost = sum(b - a + 1 for a, b in ranges)
    welcome = protocol.Welcome(
        session=session_id,
        resumed=lost == 0,
        next_seq=client.next_seq,
        lost=lost,
        lost_ranges=tuple(ranges),
        acked=floor,
        epoch=client.epoch,
    )
    return welcome, delivered
