"""The route table: every HTTP route of the monitoring app in serving order, and /openapi.json
generated from it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from . import api, channels, health, pages, publish
from .openapi import openapi_document
from .responses import JSONResponse
from .routing import Endpoint

if TYPE_CHECKING:
    from .context import Monitor

__all__ = ["ROUTES", "openapi_spec"]


def openapi_spec(ws_path: str = "/ws") -> dict[str, Any]:
    """An OpenAPI 3.1 description of the JSON routes (WebSockets are described in text)."""
    return openapi_document(ROUTES, ws_path)


async def openapi(request: Request, m: Monitor) -> Response:
    return JSONResponse(openapi_spec(m.ws_path))


ROUTES: list[Endpoint] = [
    *health.ENDPOINTS,
    *api.ENDPOINTS,
    *publish.ENDPOINTS,
    *channels.ENDPOINTS,
    Endpoint("/openapi.json", openapi, "monitor"),
    *pages.ENDPOINTS,
]
