"""POST /api/publish and GET /api/channels, /api/channels/{name}/history and /presence.

Refusals: 400 for a bad body, channel name or query, 401/403 from the access rules, 413 for
a payload over `max_message_size`, 503 while the hub shuts down or the channel store is down.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import Response

from ..backends.base import BackendError
from ..channels import PublishStatus
from ..protocol import CHANNEL_PATTERN, MAX_CHANNEL_LENGTH, MAX_SEQ
from .api import MAX_PAGE
from .publish import _body, _payload_too_large
from .responses import ErrorBody, JSONResponse, error
from .routing import Endpoint, parse_query

if TYPE_CHECKING:
    from .context import Monitor

__all__ = [
    "ENDPOINTS",
    "ChannelHistoryQuery",
    "ChannelPublishReply",
    "ChannelPublishRequest",
]


class ChannelPublishRequest(BaseModel):
    """Body of POST /api/publish."""

    model_config = ConfigDict(extra="forbid", strict=True)

    channel: str = Field(
        min_length=1,
        max_length=MAX_CHANNEL_LENGTH,
        pattern=f"^{CHANNEL_PATTERN.pattern}$",
        description="The channel.",
    )
    data: Any = Field(description="Payload: a JSON string goes as text, anything else as JSON.")
    id: str | None = Field(
        None, min_length=1, max_length=256, description="Message id (dedup within the history)."
    )


class ChannelPublishReply(BaseModel):
    """The answer to POST /api/publish: `PublishResult.to_dict()`."""

    model_config = ConfigDict(title="PublishResult", extra="forbid")

    channel: str
    offset: int
    epoch: str
    status: PublishStatus
    id: str
    reason: str | None
    delivered: int


class ChannelHistoryQuery(BaseModel):
    """The query string of GET /api/channels/{name}/history."""

    model_config = ConfigDict(extra="ignore")

    since: int = Field(0, ge=0, le=MAX_SEQ, description="Only messages after this offset")
    limit: int = Field(100, ge=1, le=MAX_PAGE, description="At most")


def _store_down(exc: BackendError) -> JSONResponse:
    return error(503, "unavailable", f"channel store unavailable: {exc}")


def _channel_name(request: Request) -> str | Response:
    name = str(request.path_params["name"])
    if CHANNEL_PATTERN.fullmatch(name) is None:
        return error(400, "bad_request", f"invalid channel name {name!r}")
    return name


async def api_publish(request: Request, m: Monitor) -> Response:
    body = await _body(request, m, ChannelPublishRequest)
    if isinstance(body, Response):
        return body
    result = await m.hub.publish(body.channel, body.data, message_id=body.id)
    reason = result.reason or ""
    if result.status is PublishStatus.REJECTED and reason.startswith("backend unavailable"):
        return error(503, "unavailable", reason, id=result.id)
    too_large = _payload_too_large(result.id, [reason], m.hub.config.max_message_size)
    return too_large or JSONResponse(result.to_dict())


async def api_channels(request: Request, m: Monitor) -> Response:
    try:
        channels = await m.hub.channels.channels()
    except BackendError as exc:
        return _store_down(exc)
    return JSONResponse({"channels": channels})


async def api_channel_history(request: Request, m: Monitor) -> Response:
    name = _channel_name(request)
    if isinstance(name, Response):
        return name
    query = parse_query(request, ChannelHistoryQuery)
    if isinstance(query, Response):
        return query
    try:
        epoch, messages = await m.hub.channels.read(name, query.since, query.limit)
    except BackendError as exc:
        return _store_down(exc)
    return JSONResponse(
        {"channel": name, "epoch": epoch, "messages": [msg.to_dict() for msg in messages]}
    )


async def api_channel_presence(request: Request, m: Monitor) -> Response:
    name = _channel_name(request)
    if isinstance(name, Response):
        return name
    try:
        members = await m.hub.presence(name)
    except BackendError as exc:
        return _store_down(exc)
    return JSONResponse({"channel": name, "presence": members})


_BAD_NAME = {400: ErrorBody, 503: ErrorBody}

ENDPOINTS = [
    Endpoint(
        "/api/publish",
        api_publish,
        "publish",
        method="POST",
        summary="Publish one message to a channel (stored once, fanned out)",
        body=ChannelPublishRequest,
        responses={200: ChannelPublishReply, 413: ErrorBody, 503: ErrorBody},
    ),
    Endpoint(
        "/api/channels",
        api_channels,
        "monitor",
        summary="Channels with their epoch, last offset, history depth, subscribers",
        responses={200: None, 503: ErrorBody},
    ),
    Endpoint(
        "/api/channels/{name:str}/history",
        api_channel_history,
        "monitor",
        summary="Messages a channel still holds, oldest first",
        query=ChannelHistoryQuery,
        responses={200: None, **_BAD_NAME},
    ),
    Endpoint(
        "/api/channels/{name:str}/presence",
        api_channel_presence,
        "monitor",
        summary="Who is subscribed to a channel, across every node",
        responses={200: None, **_BAD_NAME},
    ),
]
