"""Envelope preparation: a payload encoded once, checked, and given its id, dedup key and TTL."""

from __future__ import annotations

import itertools
from typing import Any

import orjson

from .clock import Clock
from .config import DedupMode, HubConfig
from .messages import Envelope, unicode_text
from .resilience import content_key

MAX_TTL = 10 * 365 * 86_400.0  # seconds: a finite deadline every store can represent


class Rejected(Exception):
    """A send refused before anything was stored; `reason` goes into the result."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class EnvelopeFactory:
    """Makes the envelopes of one hub (message ids `<prefix>-<n>` when none is given)."""

    __slots__ = ("_clock", "_config", "_id_prefix", "_ids")

    def __init__(self, config: HubConfig, clock: Clock, id_prefix: str) -> None:
        self._config = config
        self._clock = clock
        self._id_prefix = id_prefix
        self._ids = itertools.count(1)

    def new_id(self) -> str:
        """A message id of this hub's, for a message that named none."""
        return f"{self._id_prefix}-{next(self._ids)}"

    def prepare(
        self, payload: Any, critical: bool, message_id: str | None, ttl: float | None
    ) -> Envelope:
        """Encode once, check size, pick the message id and dedup key. Raises `Rejected`
        for a payload that cannot be encoded or is too big, a bad ttl or message_id."""
        data, data_json, enc, size = _encode(payload, critical)
        cfg = self._config
        if size > cfg.max_message_size:
            raise Rejected(
                f"payload is {size} bytes, over max_message_size ({cfg.max_message_size})"
            )
        if ttl is not None and not 0 < ttl <= MAX_TTL:
            raise Rejected(f"ttl must be positive and at most {MAX_TTL:.0f} seconds, got {ttl!r}")
        if message_id is not None:
            if not isinstance(message_id, str):
                raise Rejected("message_id must be a string")
            if not unicode_text(message_id):
                raise Rejected("message_id is not valid Unicode text (a lone surrogate)")
            explicit = message_id
        else:
            explicit = explicit_id(payload, None)
        mode = cfg.dedup_mode
        dedup_key: str | None = None
        if mode is DedupMode.ID and explicit:
            dedup_key = "i:" + explicit
        elif mode is DedupMode.CONTENT:
            dedup_key = content_key(data_json if data_json is not None else data)
        now = self._clock.now()
        return Envelope(  # positional: about half the cost of keywords on this hot path
            explicit or f"{self._id_prefix}-{next(self._ids)}",
            data,
            data_json,
            critical,
            now,  # created_at
            now + (ttl if ttl is not None else cfg.message_ttl),  # expires_at
            enc,
            None,  # seq
            0,  # attempts
            0.0,  # next_attempt_at
            dedup_key,
        )


def _encode(payload: Any, critical: bool) -> tuple[str | bytes, bytes | None, str | None, int]:
    """(wire data, JSON form, enc, size in bytes) of a payload. Raises `Rejected`."""
    if isinstance(payload, str):
        try:  # also refuses lone surrogates, which no WebSocket text frame can carry
            size = len(payload.encode("utf-8"))
        except UnicodeEncodeError as exc:
            raise Rejected(f"payload is not valid Unicode text: {exc.reason}") from None
        return payload, None, None, size
    if isinstance(payload, bytes | bytearray | memoryview):
        data = bytes(payload)
        return data, None, "base64", len(data)
    try:
        data_json = orjson.dumps(payload)
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise Rejected(f"payload is not JSON-serialisable: {exc}") from None
    if critical:
        # orjson's bytes keep their growth buffer (~4 KB of RSS for a 500-byte payload);
        # a critical message may wait in an outbox for minutes, so it keeps an exact-size
        # copy (~200 ns) and outbox memory tracks payload size.
        data_json = bytes(memoryview(data_json))
    return data_json.decode(), data_json, None, len(data_json)


def explicit_id(payload: Any, message_id: str | None) -> str:
    """The id a sender gave: `message_id`, else a dict payload's `"id"`, else ""."""
    if message_id is not None:
        return str(message_id)
    if isinstance(payload, dict):
        value = payload.get("id")
        if isinstance(value, str | int) and not isinstance(value, bool):
            return str(value)
    return ""


def copy_for_client(template: Envelope) -> Envelope:
    """One client's copy of a broadcast envelope: shared payload, its own seq and attempts."""
    return Envelope(
        template.message_id,
        template.data,
        template.data_json,
        template.critical,
        template.created_at,
        template.expires_at,
        template.enc,
        None,  # seq
        0,  # attempts
        0.0,  # next_attempt_at
        template.dedup_key,
    )
