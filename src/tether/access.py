"""Host and Origin checks for HTTP and WebSocket handshakes (`allowed_hosts`, `allowed_origins`)."""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["host_allowed", "host_of", "origin_allowed", "origin_patterns"]


def origin_patterns(allowed: Iterable[str]) -> list[re.Pattern[str]]:
    """Compiled `allowed_origins`: exact matches, case-insensitive, trailing slash ignored."""
    return [re.compile(re.escape(origin.rstrip("/")), re.IGNORECASE) for origin in allowed]


def origin_allowed(origin: str | None, patterns: list[re.Pattern[str]]) -> bool:
    """Whether a handshake with this `Origin` header may proceed.

    No patterns: every origin. No header: allowed, since only browsers send one and
    non-browser clients could forge it anyway; the check exists to stop other sites'
    pages from opening a connection with a user's cookies or network position.
    """
    if not patterns or origin is None:
        return True
    return any(p.fullmatch(origin) is not None for p in patterns)


_HOST_HEADER = re.compile(r"(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<name>[^\[\]:/@\s]+))(?::\d{1,5})?")


def host_of(header: str | None) -> str | None:
    """The host of a `Host` header, lower-cased, brackets kept for IPv6; None if malformed."""
    if header is None:
        return None
    match = _HOST_HEADER.fullmatch(header.strip())
    if match is None:
        return None
    if match["ipv6"] is not None:
        return f"[{match['ipv6'].lower()}]"
    return str(match["name"]).lower()


def host_allowed(header: str | None, allowed: Iterable[str]) -> bool:
    """Whether a request's `Host` header names an allowed host (any port).

    The same rule as Starlette's `TrustedHostMiddleware`: exact names, `*.example.com`
    for subdomains, `*` for any; no allowlist means no check. A missing or malformed
    header is refused when there is an allowlist (DNS rebinding sends the attacker's name).
    """
    patterns = [p.lower() for p in allowed]
    if not patterns or "*" in patterns:
        return True
    host = host_of(header)
    if host is None:
        return False
    return any(host == p or (p.startswith("*.") and host.endswith(p[1:])) for p in patterns)
