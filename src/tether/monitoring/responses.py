"""JSON responses for the monitoring app: orjson bodies, one error shape, validation messages."""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.responses import Response

__all__ = ["ErrorBody", "JSONResponse", "describe", "error"]


class JSONResponse(Response):
    """JSON via orjson (fast, and it serialises the hub's dicts as they are)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS)


class ErrorBody(BaseModel):
    """Every refusal: a short machine-readable `error` and a sentence for people."""

    model_config = ConfigDict(title="Error")

    error: str
    message: str


def error(status: int, error: str, message: str, **extra: Any) -> JSONResponse:
    """The error response; a 401 also names the scheme (`WWW-Authenticate: Bearer`)."""
    headers = {"WWW-Authenticate": 'Bearer realm="tether"'} if status == 401 else None
    return JSONResponse({"error": error, "message": message, **extra}, status, headers=headers)


def describe(exc: ValidationError) -> str:
    """`field: what is wrong` for each problem pydantic found, joined with `; `."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ())) or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)
