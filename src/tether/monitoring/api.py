"""The read-only JSON API (metrics, history, clients, dead letters) and Prometheus /metrics."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.requests import Request
from starlette.responses import Response

from ..protocol import MAX_SEQ
from ..resilience import CircuitState
from .responses import ErrorBody, JSONResponse, error
from .routing import Endpoint, parse_query

if TYPE_CHECKING:
    from .context import Monitor

__all__ = ["ENDPOINTS", "ClientPage", "ClientsQuery", "DeadLettersQuery", "HistoryQuery"]

MAX_PAGE = 500
_STATE_RANK = {CircuitState.CLOSED: 0, CircuitState.HALF_OPEN: 1, CircuitState.OPEN: 2}
ClientSort = Literal[
    "id", "pending", "state", "last_activity", "-id", "-pending", "-state", "-last_activity"
]


# --------------------------------------------------------------------------- query strings


class HistoryQuery(BaseModel):
    """The query string of GET /api/history."""

    model_config = ConfigDict(extra="ignore")

    cadence: str = Field("fine", description="Ring: fine or coarse")
    since: float | None = Field(None, description="Only samples after this wall time")


class ClientsQuery(BaseModel):
    """The query string of GET /api/clients."""

    model_config = ConfigDict(extra="ignore")

    limit: int = Field(50, ge=1, le=MAX_PAGE, description="Page size")
    offset: int = Field(0, ge=0, le=MAX_SEQ, description="Rows to skip")
    sort: ClientSort = Field("id", description="Sort key; a leading - sorts descending")
    q: str = Field("", description="Client id substring (case-insensitive)")
    state: Literal["closed", "open", "half_open"] | None = Field(None, description="Breaker state")
    connected: bool | None = Field(None, description="Connected now")

    @field_validator("state", mode="before")
    @classmethod
    def _any_case(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("connected", mode="before")
    @classmethod
    def _true_or_false(cls, value: Any) -> Any:
        # exactly these four: pydantic's bool would also take yes/no/on/off
        if isinstance(value, str):
            raw = value.lower()
            if raw not in ("true", "false", "1", "0"):
                raise ValueError("connected must be true or false")
            return raw in ("true", "1")
        return value


class DeadLettersQuery(BaseModel):
    """The query string of GET /api/dead-letters."""

    model_config = ConfigDict(extra="ignore")

    limit: int = Field(100, ge=1, le=MAX_PAGE, description="At most")
    client_id: str | None = Field(None, description="Only this client's")


# --------------------------------------------------------------------------- responses


class ClientPage(BaseModel):
    """One page of GET /api/clients."""

    model_config = ConfigDict(extra="forbid")

    total: int
    offset: int
    limit: int
    sort: str
    next_offset: int | None
    items: list[dict[str, Any]]


class DeadLetterPage(BaseModel):
    """GET /api/dead-letters: the newest `limit` of `total`."""

    model_config = ConfigDict(extra="forbid")

    total: int
    limit: int
    items: list[dict[str, Any]]


# --------------------------------------------------------------------------- handlers


async def prometheus(request: Request, m: Monitor) -> Response:
    # On the event loop: the collector reads live hub state (clients, outboxes) that the
    # loop mutates; a scrape is a few hundred series, never one per client.
    body = generate_latest(m.hub.metrics.prometheus_registry)
    return Response(body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def api_metrics(request: Request, m: Monitor) -> Response:
    return JSONResponse(m.hub.metrics.snapshot().to_dict())


async def api_history(request: Request, m: Monitor) -> Response:
    samples = m.history
    samples.start()  # mounted without a lifespan: sampling starts with the first reader
    query = parse_query(request, HistoryQuery)
    if isinstance(query, Response):
        return query
    if query.cadence not in samples.rings:
        return error(400, "bad_request", f"cadence must be one of {', '.join(samples.rings)}")
    return JSONResponse(samples.to_dict(query.cadence, query.since))


async def api_clients(request: Request, m: Monitor) -> Response:
    query = parse_query(request, ClientsQuery)
    if isinstance(query, Response):
        return query
    hub = m.hub
    state = None if query.state is None else CircuitState(query.state)
    connected, needle = query.connected, query.q.lower()
    key, descending = query.sort.lstrip("-"), query.sort.startswith("-")

    # Filter and sort on cheap accessors first; build full rows only for the page.
    ids = [
        cid
        for cid in hub.clients()
        if (not needle or needle in cid.lower())
        and (state is None or hub.circuit_state(cid) is state)
        and (connected is None or hub.is_connected(cid) is connected)
    ]
    if key == "id":
        ids.sort(reverse=descending)
    else:

        def sort_key(cid: str) -> tuple[Any, ...]:
            if key == "pending":
                return (hub.pending(cid), cid)
            if key == "state":
                return (_STATE_RANK[hub.circuit_state(cid)], hub.pending(cid), cid)
            return (hub.last_activity(cid) or 0.0, cid)

        ids.sort(key=sort_key, reverse=descending)
    offset, limit = query.offset, query.limit
    page = ids[offset : offset + limit]
    items = [{"client_id": cid, **hub.metrics.client_dict(cid)} for cid in page]
    nxt = offset + limit if offset + limit < len(ids) else None
    return JSONResponse(
        {
            "total": len(ids),
            "offset": offset,
            "limit": limit,
            "sort": query.sort,
            "next_offset": nxt,
            "items": items,
        }
    )


async def api_client(request: Request, m: Monitor) -> Response:
    client_id = request.path_params["client_id"]
    info = m.hub.client_info(client_id)
    if info is None:
        return error(404, "not_found", f"unknown client {client_id!r}")
    return JSONResponse(info)


async def api_dead_letters(request: Request, m: Monitor) -> Response:
    query = parse_query(request, DeadLettersQuery)
    if isinstance(query, Response):
        return query
    hub = m.hub
    ids = [query.client_id] if query.client_id else hub.clients()
    letters = [d for cid in ids for d in hub.dead_letters(cid)]
    letters.sort(key=lambda d: d.failed_at, reverse=True)
    return JSONResponse(
        {
            "total": len(letters),
            "limit": query.limit,
            "items": [d.to_dict() for d in letters[: query.limit]],
        }
    )


ENDPOINTS = [
    Endpoint("/metrics", prometheus, "monitor"),
    Endpoint(
        "/api/metrics",
        api_metrics,
        "monitor",
        summary="Aggregate metrics (MetricsSnapshot.to_dict())",
    ),
    Endpoint(
        "/api/history",
        api_history,
        "monitor",
        summary="Recent samples (rates, latency, clients) in fixed rings",
        description=(
            "Recorded every second by the app whether or not a dashboard is "
            "open: `fine` keeps 15 minutes at 1 s, `coarse` 24 hours at 60 s. "
            "`rows` are lists in the order of `fields`, oldest first."
        ),
        query=HistoryQuery,
    ),
    Endpoint(
        "/api/clients",
        api_clients,
        "monitor",
        summary="Tracked clients, filtered, sorted and paginated",
        query=ClientsQuery,
        responses={200: ClientPage},
    ),
    Endpoint(
        "/api/clients/{client_id:str}",
        api_client,
        "monitor",
        summary="One client: breaker, outbox summary, dead letters, counters",
        responses={200: None, 404: ErrorBody},
    ),
    Endpoint(
        "/api/dead-letters",
        api_dead_letters,
        "monitor",
        summary="Dead-lettered messages, newest first",
        query=DeadLettersQuery,
        responses={200: DeadLetterPage},
    ),
]
