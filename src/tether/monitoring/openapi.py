"""The OpenAPI 3.1 document of the JSON routes."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from .._version import __version__
from .api import MAX_PAGE as _MAX_PAGE
from .publish import BroadcastRequest, SendRequest

__all__ = ["openapi_spec"]

_SORT_KEYS = ("id", "pending", "state", "last_activity")


def _schema(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_json_schema(ref_template="#/components/schemas/{model}")


def openapi_spec(ws_path: str = "/ws") -> dict[str, Any]:
    """An OpenAPI 3.1 description of the JSON routes (WebSockets are described in text)."""

    def ref(name: str) -> dict[str, str]:
        return {"$ref": f"#/components/schemas/{name}"}

    def ok(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
        return {"description": description, "content": {"application/json": {"schema": schema}}}

    error = ok(ref("Error"), "Error")
    monitor_sec: list[dict[str, list[str]]] = [{"monitorToken": []}, {}]
    api_sec: list[dict[str, list[str]]] = [{"apiToken": []}, {}]
    obj: dict[str, Any] = {"type": "object"}
    int_param = {"type": "integer", "minimum": 0}

    def q(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
        return {
            "name": name,
            "in": "query",
            "required": False,
            "schema": schema,
            "description": description,
        }

    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Tether monitoring and publish API",
            "version": __version__,
            "description": (
                f"Health, metrics and clients of a Tether hub, and HTTP publishing. The delivery "
                f"WebSocket is at `{ws_path}` (subprotocol `tether.v1` or plain); `/ws/live` "
                "pushes dashboard updates (JSON typed hello / realtime / performance / aggregate). "
                "`/metrics` serves Prometheus text."
            ),
        },
        "components": {
            "securitySchemes": {
                "monitorToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "TETHER_MONITOR_TOKEN",
                },
                "apiToken": {"type": "http", "scheme": "bearer", "description": "TETHER_API_TOKEN"},
            },
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error", "message"],
                    "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
                },
                "SendRequest": _schema(SendRequest),
                "BroadcastRequest": _schema(BroadcastRequest),
                "SendResult": {
                    "type": "object",
                    "required": ["status", "client_id", "message_id"],
                    "properties": {
                        "status": {"enum": ["sent", "queued", "duplicate", "dropped", "rejected"]},
                        "client_id": {"type": "string"},
                        "message_id": {"type": "string"},
                        "reason": {"type": ["string", "null"]},
                        "seq": {"type": ["integer", "null"]},
                    },
                },
                "BroadcastResult": {
                    "type": "object",
                    "properties": {
                        "message_id": {"type": "string"},
                        **{
                            k: {"type": "integer"}
                            for k in ("sent", "queued", "duplicate", "dropped", "rejected", "total")
                        },
                        "reasons": {"type": "object", "additionalProperties": {"type": "integer"}},
                    },
                },
                "Health": {
                    "type": "object",
                    "required": ["status", "reasons"],
                    "properties": {
                        "status": {"enum": ["ok", "degraded", "failing"]},
                        "reasons": {"type": "array", "items": {"type": "string"}},
                        "checks": obj,
                    },
                },
                "ClientPage": {
                    "type": "object",
                    "properties": {
                        "total": {"type": "integer"},
                        "offset": {"type": "integer"},
                        "limit": {"type": "integer"},
                        "next_offset": {"type": ["integer", "null"]},
                        "items": {"type": "array", "items": obj},
                    },
                },
            },
        },
        "paths": {
            "/health": {
                "get": {
                    "summary": "Health: ok / degraded (200) or failing (503), with reasons",
                    "security": monitor_sec,
                    "responses": {
                        "200": ok(ref("Health")),
                        "503": ok(ref("Health"), "Failing"),
                        "401": error,
                        "403": error,
                    },
                }
            },
            "/api/metrics": {
                "get": {
                    "summary": "Aggregate metrics (MetricsSnapshot.to_dict())",
                    "security": monitor_sec,
                    "responses": {"200": ok(obj), "401": error, "403": error},
                }
            },
            "/api/history": {
                "get": {
                    "summary": "Recent samples (rates, latency, clients) in fixed rings",
                    "description": (
                        "Recorded every second by the app whether or not a dashboard is "
                        "open: `fine` keeps 15 minutes at 1 s, `coarse` 24 hours at 60 s. "
                        "`rows` are lists in the order of `fields`, oldest first."
                    ),
                    "security": monitor_sec,
                    "parameters": [
                        q("cadence", {"enum": ["fine", "coarse"], "default": "fine"}, "Ring"),
                        q("since", {"type": "number"}, "Only samples after this wall time"),
                    ],
                    "responses": {"200": ok(obj), "400": error, "401": error, "403": error},
                }
            },
            "/api/clients": {
                "get": {
                    "summary": "Tracked clients, filtered, sorted and paginated",
                    "security": monitor_sec,
                    "parameters": [
                        q(
                            "limit",
                            {"type": "integer", "minimum": 1, "maximum": _MAX_PAGE, "default": 50},
                            "Page size",
                        ),
                        q("offset", {**int_param, "default": 0}, "Rows to skip"),
                        q(
                            "sort",
                            {
                                "enum": [*_SORT_KEYS, *("-" + k for k in _SORT_KEYS)],
                                "default": "id",
                            },
                            "Sort key; a leading - sorts descending",
                        ),
                        q("q", {"type": "string"}, "Client id substring (case-insensitive)"),
                        q("state", {"enum": ["closed", "open", "half_open"]}, "Breaker state"),
                        q("connected", {"type": "boolean"}, "Connected now"),
                    ],
                    "responses": {
                        "200": ok(ref("ClientPage")),
                        "400": error,
                        "401": error,
                        "403": error,
                    },
                }
            },
            "/api/clients/{client_id}": {
                "get": {
                    "summary": "One client: breaker, outbox summary, dead letters, counters",
                    "security": monitor_sec,
                    "parameters": [
                        {
                            "name": "client_id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                    "responses": {"200": ok(obj), "404": error, "401": error, "403": error},
                }
            },
            "/api/dead-letters": {
                "get": {
                    "summary": "Dead-lettered messages, newest first",
                    "security": monitor_sec,
                    "parameters": [
                        q(
                            "limit",
                            {"type": "integer", "minimum": 1, "maximum": _MAX_PAGE, "default": 100},
                            "At most",
                        ),
                        q("client_id", {"type": "string"}, "Only this client's"),
                    ],
                    "responses": {"200": ok(obj), "400": error, "401": error, "403": error},
                }
            },
            "/api/send": {
                "post": {
                    "summary": "Send one message to one client",
                    "security": api_sec,
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": ref("SendRequest")}},
                    },
                    "responses": {
                        "200": ok(ref("SendResult")),
                        "400": error,
                        "401": error,
                        "403": error,
                        "413": error,
                        "503": error,
                    },
                }
            },
            "/api/broadcast": {
                "post": {
                    "summary": "Send one message to every client, or to a group's members",
                    "security": api_sec,
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": ref("BroadcastRequest")}},
                    },
                    "responses": {
                        "200": ok(ref("BroadcastResult")),
                        "400": error,
                        "401": error,
                        "403": error,
                        "413": error,
                        "503": error,
                    },
                }
            },
        },
    }
