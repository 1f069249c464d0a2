"""How envelopes travel through Redis: stream entries, and the pub/sub messages between nodes.

Stream entry fields (entry id "<seq>-0"):

    m  message id      d  data (bytes)      t  kind: "j" JSON, "s" text, "b" bytes
    x  expires at, wall-clock ms             c  created at, wall-clock ms

Pub/sub messages are JSON objects. On `{prefix}:node:<node_id>` (one node's inbox):

    {"t": "n", "c": cid or [cid, ...]}      doorbell: critical messages were stored for cid(s)
    {"t": "f", "c": cid, "e": envelope}     a best-effort message forwarded to cid
    {"t": "k", "c": cid, "n": node}         cid connected to `node`: close yours, drop your copy

On `{prefix}:broadcast`: {"e": envelope, "g": group or null, "o": origin node}, a
best-effort broadcast. An envelope on the wire: {"i": id, "t": kind, "d": data (base64 for
bytes), "x": expires wall ms, "c": created wall ms, "k": dedup key, "q": seq, "r": critical}.

Deadlines cross processes as wall-clock milliseconds; each node converts them to and from
its own (injected) monotonic clock.
"""

from __future__ import annotations

import base64
from typing import Any

import orjson

from ..clock import Clock
from ..messages import Envelope


def _data(kind: str, raw: bytes) -> tuple[str | bytes, bytes | None, str | None]:
    if kind == "b":
        return raw, None, "base64"
    text = raw.decode("utf-8", "surrogatepass")
    return text, (raw if kind == "j" else None), None


def _fields(raw: Any) -> dict[str, bytes]:
    if isinstance(raw, dict):
        return {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}
    flat = list(raw)  # scripts return an entry's fields as a flat list
    return {flat[i].decode(): flat[i + 1] for i in range(0, len(flat), 2)}


class WireCodec:
    """Converts envelopes to and from their Redis forms with one node's clock."""

    __slots__ = ("clock",)

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def wall_ms(self, monotonic: float) -> int:
        """A hub-clock instant as wall-clock milliseconds (comparable across processes)."""
        return int((monotonic - self.clock.now() + self.clock.wall()) * 1000)

    def local(self, wall_ms: int) -> float:
        return wall_ms / 1000 - self.clock.wall() + self.clock.now()

    def payload(self, envelope: Envelope) -> bytes:
        """An envelope's entry in an `APPEND` call's payload table (see `redis_scripts`):
        "kind|expires wall ms|created wall ms|id length|data length|" + id + data."""
        kind, raw = envelope.stored_form()
        clock = self.clock
        offset = clock.wall() - clock.now()
        mid = envelope.message_id.encode()  # valid: checked when prepared
        return b"%s|%d|%d|%d|%d|%s%s" % (
            kind.encode(),
            int((envelope.expires_at + offset) * 1000),
            int((envelope.created_at + offset) * 1000),
            len(mid),
            len(raw),
            mid,
            raw,
        )

    def from_entry(self, entry: Any) -> Envelope:
        """An envelope from a stream entry `(id, fields)`."""
        entry_id, raw_fields = entry
        if isinstance(entry_id, bytes):
            entry_id = entry_id.decode()
        f = _fields(raw_fields)
        data, data_json, enc = _data(f["t"].decode(), f["d"])
        return Envelope(
            message_id=f["m"].decode(),
            data=data,
            data_json=data_json,
            critical=True,
            created_at=self.local(int(f["c"])),
            expires_at=self.local(int(f["x"])),
            enc=enc,
            seq=int(entry_id.split("-", 1)[0]),
        )

    def to_wire(self, envelope: Envelope) -> dict[str, Any]:
        kind, raw = envelope.stored_form()
        return {
            "i": envelope.message_id,
            "t": kind,
            "d": base64.b64encode(raw).decode("ascii")
            if kind == "b"
            else raw.decode("utf-8", "surrogatepass"),
            "x": self.wall_ms(envelope.expires_at),
            "c": self.wall_ms(envelope.created_at),
            "k": envelope.dedup_key,
            "q": envelope.seq,
            "r": envelope.critical,
        }

    def from_wire(self, wire: dict[str, Any]) -> Envelope:
        kind = wire["t"]
        raw = (
            base64.b64decode(wire["d"])
            if kind == "b"
            else wire["d"].encode("utf-8", "surrogatepass")
        )
        data, data_json, enc = _data(kind, raw)
        return Envelope(
            message_id=wire["i"],
            data=data,
            data_json=data_json,
            critical=bool(wire.get("r", False)),
            created_at=self.local(int(wire["c"])),
            expires_at=self.local(int(wire["x"])),
            enc=enc,
            seq=wire.get("q"),
            dedup_key=wire.get("k"),
        )

    # -- pub/sub messages

    @staticmethod
    def doorbell(client_id: str | list[str]) -> bytes:
        return orjson.dumps({"t": "n", "c": client_id})

    @staticmethod
    def kick(client_id: str, node_id: str) -> bytes:
        return orjson.dumps({"t": "k", "c": client_id, "n": node_id})

    def forward(self, client_id: str, envelope: Envelope) -> bytes:
        return orjson.dumps({"t": "f", "c": client_id, "e": self.to_wire(envelope)})

    def broadcast(self, envelope: Envelope, group: str | None, origin: str) -> bytes:
        return orjson.dumps({"e": self.to_wire(envelope), "g": group, "o": origin})
