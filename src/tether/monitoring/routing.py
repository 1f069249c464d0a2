"""Endpoint: one HTTP route of the monitoring app, declared once for serving and for the OpenAPI
document; `parse_query` validates a query string with a pydantic model, as bodies are."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .responses import describe, error

if TYPE_CHECKING:
    from .context import Monitor

__all__ = ["Endpoint", "Guard", "Handler", "parse_query", "route"]

Handler = Callable[[Request, "Monitor"], Awaitable[Response]]
Guard = Literal["monitor", "publish", "page", "open"]
Model = TypeVar("Model", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A route: path, method, who may call it (`guard`, see `Access`) and, for the OpenAPI
    document, its summary, query and body models and the models of its responses (None: a
    JSON object). Routes without a summary are served but not documented."""

    path: str
    handler: Handler
    guard: Guard
    method: str = "GET"
    summary: str | None = None
    description: str | None = None
    query: type[BaseModel] | None = None
    body: type[BaseModel] | None = None
    responses: Mapping[int, type[BaseModel] | None] = field(default_factory=lambda: {200: None})
    name: str | None = None


def _refusal(guard: Guard, request: Request, monitor: Monitor) -> Response | None:
    access = monitor.access
    if guard == "monitor":
        return access.monitor(request)
    if guard == "publish":
        return access.publish(request)
    if guard == "page":
        return access.page(request)
    return None


def route(endpoint: Endpoint, monitor: Monitor) -> Route:
    """The Starlette route serving `endpoint` for `monitor`: the guard first, then the handler."""

    async def serve(request: Request) -> Response:
        refusal = _refusal(endpoint.guard, request, monitor)
        return refusal if refusal is not None else await endpoint.handler(request, monitor)

    serve.__name__ = endpoint.handler.__name__
    return Route(endpoint.path, serve, methods=[endpoint.method], name=endpoint.name)


def parse_query(request: Request, model: type[Model]) -> Model | Response:
    """The query string validated by `model` (unknown parameters ignored; a repeated one: the
    last), or a 400 naming each bad parameter."""
    try:
        return model.model_validate(dict(request.query_params))
    except ValidationError as exc:
        return error(400, "bad_request", describe(exc))
