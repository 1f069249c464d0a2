"""Who may use the monitoring app: monitor and API tokens, the loopback-only rule, Origin checks.

Host and Origin matching itself lives one layer down in `tether.access`; this module
applies it to monitoring requests and turns a refusal into the HTTP response.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.requests import HTTPConnection
from starlette.responses import Response

from ..access import host_allowed, origin_allowed
from .responses import error

__all__ = ["Access", "cross_origin", "is_loopback"]


def is_loopback(host: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost: addresses only this machine can reach."""
    if host is None:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _bearer(conn: HTTPConnection, *, allow_query: bool) -> str | None:
    header = conn.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    if allow_query:
        return conn.query_params.get("token")
    return None


def _token_ok(given: str | None, expected: str) -> bool:
    # compare_digest keeps the comparison time independent of where the strings differ
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def cross_origin(
    conn: HTTPConnection, allowed: list[re.Pattern[str]], hosts: list[str] | None = None
) -> bool:
    """True when a browser sent this request from another site's page.

    Browsers send `Origin` with every POST and WebSocket handshake; a page elsewhere
    could otherwise publish through (or watch) a server that trusts loopback callers,
    since the victim's browser *is* on loopback. Non-browser clients send no Origin.
    Same-origin means the Origin equals the Host *and* names an allowed host: a DNS
    rebinding page controls both headers, but not the allowlist.
    """
    origin = conn.headers.get("origin")
    if origin is None:
        return False
    if allowed and origin_allowed(origin, allowed):
        return False
    host = conn.headers.get("host", "")
    netloc = urlsplit(origin).netloc
    if netloc.lower() != host.lower():
        return True
    return bool(hosts) and not host_allowed(netloc, hosts or [])


@dataclass(frozen=True, slots=True)
class Access:
    """The app's access rules: each check returns None to let a request in, else the refusal."""

    monitor_token: str | None
    api_token: str | None
    public_bind: bool  # bound beyond loopback
    origins: list[re.Pattern[str]]  # allowed_origins, besides the app's own
    hosts: list[str] | None = None  # allowed Host names (empty: any)

    def _remote(self, conn: HTTPConnection) -> bool:
        return self.public_bind and not is_loopback(conn.client.host if conn.client else None)

    def monitor(self, conn: HTTPConnection, *, allow_query: bool = False) -> Response | None:
        """Monitoring data: the monitor token when set, else loopback callers only (when the
        server is reachable from the network)."""
        if self.monitor_token is not None:
            if not _token_ok(_bearer(conn, allow_query=allow_query), self.monitor_token):
                return error(401, "unauthorized", "monitoring needs Authorization: Bearer <token>")
            return None
        if self._remote(conn):
            # no token and reachable from the network: only this machine may look
            return error(
                403, "forbidden", "monitoring answers loopback only; set TETHER_MONITOR_TOKEN"
            )
        return None

    def page(self, conn: HTTPConnection) -> Response | None:
        """The dashboard page and its assets hold no data, so they load without the token
        (the page then asks for it); the loopback-only rule still applies."""
        return self.monitor(conn) if self.monitor_token is None else None

    def live(self, conn: HTTPConnection) -> Response | None:
        """The /ws/live feed: monitoring access (the token may ride in the query string,
        browsers cannot set headers on a WebSocket) and never from another site's page."""
        refusal = self.monitor(conn, allow_query=True)
        if refusal is None and cross_origin(conn, self.origins, self.hosts):
            # another site's page in an operator's browser must not watch the feed
            refusal = error(403, "forbidden", "cross-origin")
        return refusal

    def publish(self, conn: HTTPConnection) -> Response | None:
        """POST /api/send and /api/broadcast: same-origin, and the API token when set, else
        loopback callers only (when the server is reachable from the network)."""
        if cross_origin(conn, self.origins, self.hosts):
            return error(403, "forbidden", "cross-origin publishing is refused")
        if self.api_token is not None:
            if not _token_ok(_bearer(conn, allow_query=False), self.api_token):
                return error(
                    401, "unauthorized", "publishing needs Authorization: Bearer <api token>"
                )
            return None
        if self._remote(conn):
            return error(403, "forbidden", "the publish API needs TETHER_API_TOKEN")
        return None

    @staticmethod
    def open(conn: HTTPConnection) -> Response | None:
        """Routes anyone may load (the favicon, the redirect to the dashboard)."""
        return None
