"""The dashboard page and its assets, the favicon, `/` redirecting to the dashboard, /static."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from .responses import error
from .routing import Endpoint

if TYPE_CHECKING:
    from .context import Monitor

__all__ = ["CLIENT_STATIC_DIR", "DASHBOARD_DIR", "ENDPOINTS", "static_files"]

_HERE = Path(__file__).resolve().parent
DASHBOARD_DIR = _HERE / "static"
CLIENT_STATIC_DIR = _HERE.parent / "static"  # tether.js and other assets for clients

_PAGE_HEADERS = {
    # everything is same-origin; the token may sit in the URL once, so send no referrer
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self' ws: wss:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


async def dashboard(request: Request, m: Monitor) -> Response:
    return FileResponse(DASHBOARD_DIR / "dashboard.html", headers=_PAGE_HEADERS)


async def dashboard_asset(request: Request, m: Monitor) -> Response:
    name = request.path_params["name"]
    if name not in ("dashboard.css", "dashboard.js"):
        return error(404, "not_found", "no such asset")
    return FileResponse(DASHBOARD_DIR / name, headers=_PAGE_HEADERS)


async def favicon(request: Request, m: Monitor) -> Response:
    return FileResponse(CLIENT_STATIC_DIR / "favicon.svg", media_type="image/svg+xml")


async def root(request: Request, m: Monitor) -> Response:
    return RedirectResponse(str(request.url_for("dashboard")), 307)


def static_files() -> Mount:
    """/static: tether.js and the other files browser clients load."""
    return Mount(
        "/static", StaticFiles(directory=CLIENT_STATIC_DIR, check_dir=False), name="static"
    )


ENDPOINTS = [
    Endpoint("/", root, "open"),
    Endpoint("/favicon.ico", favicon, "open"),
    Endpoint("/dashboard", dashboard, "page", name="dashboard"),
    Endpoint("/dashboard/{name:str}", dashboard_asset, "page"),
]
