"""Origin checks for WebSocket and HTTP handshakes from browsers (`allowed_origins`)."""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["origin_allowed", "origin_patterns"]


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
