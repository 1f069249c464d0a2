"""POST /api/send and /api/broadcast: the HTTP publish API, bodies validated by pydantic.

Refusals: 400 for a body that is not JSON or not valid, 401/403 from the access rules,
413 for a body or payload over `max_message_size` (naming the message and the limit),
503 while the hub shuts down.
"""

from __future__ import annotations

import contextlib
import re
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.requests import Request
from starlette.responses import Response

from ..config import format_bytes
from ..messages import SendStatus
from ..protocol import CLIENT_ID_PATTERN, has_out_of_range_int
from .responses import ErrorBody, JSONResponse, describe, error
from .routing import Endpoint

if TYPE_CHECKING:
    from .context import Monitor

__all__ = ["ENDPOINTS", "BroadcastReply", "BroadcastRequest", "SendReply", "SendRequest"]


# --------------------------------------------------------------------------- bodies


class _Publish(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    data: Any = Field(description="Payload: a JSON string goes as text, anything else as JSON.")
    critical: bool = Field(False, description="Queue, retry, deliver in order; or best-effort.")
    message_id: str | None = Field(
        None, min_length=1, max_length=256, description="Idempotency key (deduplication)."
    )
    ttl: float | None = Field(
        None, gt=0, le=86_400 * 365, description="Seconds a critical message may wait."
    )

    @field_validator("ttl", mode="before")
    @classmethod
    def _int_ttl(cls, value: Any) -> Any:
        # strict mode refuses ints for a float field; 30 is as good a ttl as 30.0
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


class SendRequest(_Publish):
    """Body of POST /api/send."""

    client_id: str = Field(
        min_length=1,
        max_length=128,
        pattern=CLIENT_ID_PATTERN.pattern,
        description="Target client id.",
    )


class BroadcastRequest(_Publish):
    """Body of POST /api/broadcast."""

    group: str | None = Field(
        None, min_length=1, max_length=256, description="Only this group's members."
    )
    exclude: list[str] = Field(default_factory=list, max_length=10_000)


# --------------------------------------------------------------------------- results


class SendReply(BaseModel):
    """The answer to POST /api/send: `SendResult.to_dict()`."""

    model_config = ConfigDict(title="SendResult", extra="forbid")

    status: SendStatus
    client_id: str
    message_id: str
    reason: str | None
    seq: int | None


class BroadcastReply(BaseModel):
    """The answer to POST /api/broadcast: `BroadcastResult.to_dict()`, counts per status."""

    model_config = ConfigDict(title="BroadcastResult", extra="forbid")

    message_id: str
    sent: int
    queued: int
    duplicate: int
    dropped: int
    rejected: int
    unknown: int
    total: int
    reasons: dict[str, int]


# --------------------------------------------------------------------------- too large

_MESSAGE_ID_FIELD = re.compile(rb'"message_id"\s*:\s*"((?:[^"\\]|\\.){1,256})"')
_PAYLOAD_SIZE = re.compile(r"payload is (\d+) bytes, over max_message_size")


def _peek_message_id(head: bytes) -> str | None:
    """The `message_id` of a body cut off for size, when it appears in what was read."""
    match = _MESSAGE_ID_FIELD.search(head[:65536])
    if match is None:
        return None
    with contextlib.suppress(orjson.JSONDecodeError):
        value = orjson.loads(b'"' + match.group(1) + b'"')
        return value if isinstance(value, str) else None
    return None


def _payload_too_large(message_id: str, reasons: list[str], limit: int) -> JSONResponse | None:
    """HTTP 413 naming the message and the limit, when the hub refused it for its size."""
    for reason in reasons:
        match = _PAYLOAD_SIZE.search(reason)
        if match is not None:
            size = format_bytes(int(match.group(1)))
            return error(
                413,
                "too_large",
                f"message {message_id!r}: payload is {size}, over the {format_bytes(limit)} "
                "limit (TETHER_MAX_MESSAGE_SIZE)",
                message_id=message_id,
                limit_bytes=limit,
            )
    return None


# --------------------------------------------------------------------------- reading a body

Body = TypeVar("Body", bound=BaseModel)


async def _read_json(request: Request, max_message_size: int) -> Any | Response:
    """The JSON body, or a 413 once it outgrows what a largest payload could need, or a 400."""
    limit = max_message_size * 2 + 4096  # room for JSON escaping and the envelope fields
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            message_id = _peek_message_id(b"".join(chunks) + chunk)
            named = f"message {message_id!r}: " if message_id else ""
            return error(
                413,
                "too_large",
                f"{named}request body over {format_bytes(limit)}; payloads are limited to "
                f"{format_bytes(max_message_size)} (TETHER_MAX_MESSAGE_SIZE)",
                message_id=message_id,
                limit_bytes=max_message_size,
            )
        chunks.append(chunk)
    body = b"".join(chunks)
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return error(400, "bad_request", f"body is not valid JSON: {exc}")
    if has_out_of_range_int(body):  # it would be delivered as a rounded float
        return error(400, "bad_request", "a number is out of range: integers must fit in 64 bits")
    return value


async def _body(request: Request, m: Monitor, model: type[Body]) -> Body | Response:
    """The validated body of a publish request, or the response refusing it."""
    raw = await _read_json(request, m.hub.config.max_message_size)
    if isinstance(raw, Response):
        return raw
    try:
        body = model.model_validate(raw)
    except ValidationError as exc:
        return error(400, "bad_request", describe(exc))
    if m.hub.closing:
        return error(503, "unavailable", "hub is shutting down")
    return body


# --------------------------------------------------------------------------- handlers


async def api_send(request: Request, m: Monitor) -> Response:
    body = await _body(request, m, SendRequest)
    if isinstance(body, Response):
        return body
    result = await m.hub.send(
        body.client_id,
        body.data,
        critical=body.critical,
        message_id=body.message_id,
        ttl=body.ttl,
    )
    limit = m.hub.config.max_message_size
    too_large = _payload_too_large(result.message_id, [result.reason or ""], limit)
    return too_large or JSONResponse(result.to_dict())


async def api_broadcast(request: Request, m: Monitor) -> Response:
    body = await _body(request, m, BroadcastRequest)
    if isinstance(body, Response):
        return body
    result = await m.hub.broadcast(
        body.data,
        critical=body.critical,
        group=body.group,
        message_id=body.message_id,
        ttl=body.ttl,
        exclude=body.exclude,
    )
    limit = m.hub.config.max_message_size
    too_large = _payload_too_large(result.message_id, list(result.reasons), limit)
    return too_large or JSONResponse(result.to_dict())


_REFUSED = {413: ErrorBody, 503: ErrorBody}

ENDPOINTS = [
    Endpoint(
        "/api/send",
        api_send,
        "publish",
        method="POST",
        summary="Send one message to one client",
        body=SendRequest,
        responses={200: SendReply, **_REFUSED},
    ),
    Endpoint(
        "/api/broadcast",
        api_broadcast,
        "publish",
        method="POST",
        summary="Send one message to every client, or to a group's members",
        body=BroadcastRequest,
        responses={200: BroadcastReply, **_REFUSED},
    ),
]
