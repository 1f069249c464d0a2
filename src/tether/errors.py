"""The exceptions a hub raises to its callers (transport adapters and applications)."""

from __future__ import annotations


class HubClosedError(RuntimeError):
    """The hub is shutting down or stopped and accepts no new connections."""


class HubUnavailable(ValueError):
    """The hub cannot take this client now — `max_clients` are tracked, or a shared
    backend cannot load the client's stream — but may later: transport adapters close
    with 1013 (try again later). A `ValueError` subclass, so code written when these
    were plain `ValueError`s keeps working."""
