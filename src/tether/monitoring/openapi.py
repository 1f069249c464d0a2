"""The OpenAPI 3.1 document, generated from the route table and the pydantic models it names.

An `Endpoint` with a summary is documented: its path and method, security from its guard,
query parameters from its query model, the request body from its body model, and its
responses from their models, plus the refusals its guard and validation can answer with.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from http import HTTPStatus
from typing import Any, Literal

from pydantic import BaseModel

from .._version import __version__
from .responses import ErrorBody
from .routing import Endpoint, Guard

__all__ = ["openapi_document"]

_REF = "#/components/schemas/{model}"
_SECURITY: dict[Guard, list[dict[str, list[str]]]] = {
    "monitor": [{"monitorToken": []}, {}],
    "publish": [{"apiToken": []}, {}],
}
# what a guard refuses with: 401 without the right token, 403 for a remote or cross-origin caller
_GUARD_REFUSALS: dict[Guard, tuple[int, ...]] = {
    "monitor": (401, 403),
    "publish": (401, 403),
    "page": (403,),
    "open": (),
}
_PATH_PARAM = re.compile(r"\{(\w+)(?::\w+)?\}")


class _Components:
    """`components.schemas`: each model once, under its title, its nested models beside it."""

    def __init__(self) -> None:
        self.schemas: dict[str, Any] = {}

    def ref(self, model: type[BaseModel], mode: Literal["validation", "serialization"]) -> Any:
        schema = model.model_json_schema(ref_template=_REF, mode=mode)
        self.schemas.update(schema.pop("$defs", {}))
        name = schema["title"]
        self.schemas[name] = schema
        return {"$ref": _REF.format(model=name)}


def _query_parameters(model: type[BaseModel], components: _Components) -> list[dict[str, Any]]:
    schema = model.model_json_schema(ref_template=_REF)
    components.schemas.update(schema.get("$defs", {}))
    required = set(schema.get("required", ()))
    parameters = []
    for name, prop in schema["properties"].items():
        prop = dict(prop)
        prop.pop("title", None)
        description = prop.pop("description", None)
        parameter = {"name": name, "in": "query", "required": name in required, "schema": prop}
        if description:
            parameter["description"] = description
        parameters.append(parameter)
    return parameters


def _operation(endpoint: Endpoint, components: _Components) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": endpoint.summary}
    if endpoint.description:
        operation["description"] = endpoint.description
    if endpoint.guard in _SECURITY:
        operation["security"] = [dict(scheme) for scheme in _SECURITY[endpoint.guard]]
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in _PATH_PARAM.findall(endpoint.path)
    ]
    if endpoint.query is not None:
        parameters += _query_parameters(endpoint.query, components)
    if parameters:
        operation["parameters"] = parameters
    if endpoint.body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {
                "application/json": {"schema": components.ref(endpoint.body, "validation")}
            },
        }

    models: dict[int, type[BaseModel] | None] = dict(endpoint.responses)
    invalid = (400,) if endpoint.query is not None or endpoint.body is not None else ()
    for status in (*invalid, *_GUARD_REFUSALS[endpoint.guard]):
        models.setdefault(status, ErrorBody)
    operation["responses"] = {
        str(status): {
            "description": HTTPStatus(status).phrase,
            "content": {
                "application/json": {
                    "schema": {"type": "object"}
                    if model is None
                    else components.ref(model, "serialization")
                }
            },
        }
        for status, model in sorted(models.items())
    }
    return operation


def openapi_document(endpoints: Iterable[Endpoint], ws_path: str = "/ws") -> dict[str, Any]:
    """The OpenAPI 3.1 description of the documented `endpoints` (WebSockets are described
    in the text: OpenAPI has no way to describe them)."""
    components = _Components()
    components.ref(ErrorBody, "serialization")
    paths: dict[str, dict[str, Any]] = {}
    for endpoint in endpoints:
        if endpoint.summary is None:
            continue
        path = _PATH_PARAM.sub(r"{\1}", endpoint.path)
        paths.setdefault(path, {})[endpoint.method.lower()] = _operation(endpoint, components)
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
            "schemas": components.schemas,
        },
        "paths": paths,
    }
