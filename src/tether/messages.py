"""The values a hub hands back and the envelope a message travels in."""

from __future__ import annotations

import base64
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple


class SendStatus(StrEnum):
    """What became of one send to one client."""

    SENT = "sent"  # written to the client's connection now
    QUEUED = "queued"  # kept in the client's outbox; delivered later, in order
    DUPLICATE = "duplicate"  # already accepted for this client within the dedup window
    DROPPED = "dropped"  # best-effort message that could not be sent now
    REJECTED = "rejected"  # refused, certainly not stored: bad payload, full outbox, shutting down
    # (critical, shared backend) the store got the write but its reply never came: it may
    # be stored. Resend with the result's message_id: dedup answers DUPLICATE if it was.
    UNKNOWN = "unknown"


class SendResult(NamedTuple):
    """The outcome of `Hub.send`: a status, and why when it is not SENT.

    Immutable. A NamedTuple rather than a frozen dataclass because the hub makes one per
    delivery and a frozen dataclass's `__init__` (five `object.__setattr__` calls) costs
    about 4× as much; the attributes, `accepted` and `to_dict()` are unchanged.
    """

    status: SendStatus
    client_id: str
    message_id: str
    reason: str | None = None
    seq: int | None = None

    @property
    def accepted(self) -> bool:
        """True when the hub now owns the message (SENT or QUEUED)."""
        return self.status in (SendStatus.SENT, SendStatus.QUEUED)

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status.value,
            "client_id": self.client_id,
            "message_id": self.message_id,
            "reason": self.reason,
            "seq": self.seq,
        }


@dataclass(frozen=True, slots=True)
class BroadcastResult:
    """The outcome of `Hub.broadcast`: how many clients got each status."""

    message_id: str
    sent: int = 0
    queued: int = 0
    duplicate: int = 0
    dropped: int = 0
    rejected: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    unknown: int = 0

    @property
    def total(self) -> int:
        return (
            self.sent + self.queued + self.duplicate + self.dropped + self.rejected + self.unknown
        )

    def count(self, status: SendStatus) -> int:
        return int(getattr(self, status.value))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["total"] = self.total
        return data


@dataclass(frozen=True, slots=True)
class ShutdownStats:
    """What `Hub.shutdown` did. Every message pending at shutdown is in exactly one of
    flushed, persisted or dropped."""

    pending_messages_flushed: int = 0
    pending_messages_dropped: int = 0
    pending_messages_persisted: int = 0
    connections_closed: int = 0
    background_tasks_stopped: int = 0
    metrics_cleaned: int = 0
    duration_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def unicode_text(value: str) -> bool:
    """True when `value` encodes as UTF-8: no lone surrogates (which Python strings may
    hold, but no store, wire format or peer can carry)."""
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(slots=True)
class Envelope:
    """One message on its way to one client.

    `attempts` counts failed delivery attempts; it travels with the message through the
    outbox, retries and the dead-letter store and is never reset.
    """

    message_id: str
    data: str | bytes  # the wire form in plain mode
    data_json: bytes | None  # the JSON form for tether.v1 `msg.data`, made when first needed
    critical: bool
    created_at: float
    expires_at: float
    enc: str | None = None  # "base64" when `data` is bytes and travels as base64 in tether.v1
    seq: int | None = None
    attempts: int = 0
    next_attempt_at: float = 0.0
    dedup_key: str | None = None
    written_once: bool = False  # written at least once on any connection
    # written on the current tether.v1 connection and awaiting its ack (set by the outbox)
    in_flight: bool = False
    # (shared stores) may be written without being stored, if the store finds nothing of
    # the client's held anywhere: see pipeline.may_write_directly
    direct: bool = False

    @property
    def size(self) -> int:
        return len(self.data)

    def stored_form(self) -> tuple[str, bytes]:
        """How a durable store keeps the payload: "b" (bytes), "j" (JSON) or "s" (text),
        and its bytes — a JSON payload's are the hub's encoding, reused.

        A JSON payload carries `data_json` from the start, and `data` is it decoded. A text
        payload gets a `data_json` too once written to a tether.v1 client: a JSON string,
        so it starts with a quote and never equals the text itself. A JSON payload may
        start with a quote as well (a datetime, a UUID): the comparison tells them apart.
        """
        data = self.data
        if data.__class__ is bytes:
            return "b", data
        raw = self.data_json
        if raw is not None and (raw[0] != 0x22 or raw.decode() == data):
            return "j", raw
        return "s", data.encode("utf-8", "surrogatepass")  # type: ignore[union-attr]

    def to_dict(self, now: float) -> dict[str, Any]:
        """A JSON-safe summary (no payload) for inspection APIs."""
        return {
            "message_id": self.message_id,
            "seq": self.seq,
            "critical": self.critical,
            "attempts": self.attempts,
            "age_seconds": round(max(0.0, now - self.created_at), 3),
            "expires_in_seconds": round(self.expires_at - now, 3),
            "size_bytes": self.size,
        }


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A critical message that used up its retries, kept for inspection."""

    client_id: str
    message_id: str
    seq: int | None
    attempts: int
    reason: str
    failed_at: float  # wall-clock seconds
    data: str | bytes

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> DeadLetter:
        """A dead letter from a store's JSON record (bytes travel as base64)."""
        data: str | bytes = record.get("data") or ""
        if record.get("enc") == "base64" and isinstance(data, str):
            data = base64.b64decode(data)
        return cls(
            client_id=str(record.get("client_id", "")),
            message_id=str(record.get("message_id", "")),
            seq=record.get("seq"),
            attempts=int(record.get("attempts", 0)),
            reason=str(record.get("reason", "")),
            failed_at=float(record.get("failed_at", 0.0)),
            data=data,
        )

    def to_dict(self) -> dict[str, Any]:
        shown: Any = self.data
        if isinstance(shown, bytes):
            shown = shown.decode("utf-8", "replace")
        if len(shown) > 2048:
            shown = shown[:2048] + "…"
        return {
            "client_id": self.client_id,
            "message_id": self.message_id,
            "seq": self.seq,
            "attempts": self.attempts,
            "reason": self.reason,
            "failed_at": self.failed_at,
            "data": shown,
        }
