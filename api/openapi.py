"""The OpenAPI 3.0 document served at ``/api/v1/openapi.json``, built from the routes' declarations.

Each :class:`~api.infra.Endpoint` carries its parameters (the same :class:`~api.params.Param`
objects the parser reads), its response media types and whether it authenticates; this module
only renders them. JRC's generated spec drifted from its routes; here the parameters cannot, and
``tests/integration/test_openapi.py`` fuzzes every operation with schemathesis against the document.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from api.infra import Endpoint
from api.params import Params
from api.responses import ApiJSONResponse

JSON = "application/json"
OPENAPI_PATH = "/api/v1/openapi.json"

STR: dict[str, Any] = {"type": "string"}
BINARY: dict[str, Any] = {"type": "string", "format": "binary"}
OBJECT: dict[str, Any] = {"type": "object"}
NULLNUM: dict[str, Any] = {"type": "number", "nullable": True}
COLUMNS: dict[str, Any] = {
    "type": "object",
    "additionalProperties": {"type": "array"},
    "description": "column name → list of values",
}
ERROR: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
        }
    },
}


def json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {JSON: {"schema": schema}}


def _err(desc: str) -> dict[str, Any]:
    return {"description": desc, "content": {JSON: {"schema": {"$ref": "#/components/schemas/Error"}}}}


def operation(endpoint: Endpoint) -> dict[str, Any]:
    """The path item of one endpoint (a single GET)."""
    responses: dict[str, Any] = {"200": {"description": "success", "content": endpoint.content}}
    if endpoint.params:
        responses["400"] = _err("a parameter is missing or invalid")
    if endpoint.auth:
        responses["401"] = _err("missing or wrong credentials (with WWW-Authenticate)")
        responses["403"] = _err(
            "the dataset is not granted to the caller, or credentials were sent over plain HTTP"
            " from a non-loopback client (insecure_transport)"
        )
        responses["429"] = _err("too many failed logins from this address (with Retry-After)")
    if endpoint.found:
        responses["404"] = _err("unknown dataset, parcel or parcel type")
    responses["503"] = _err("database unavailable or query timeout")
    op: dict[str, Any] = {
        "summary": endpoint.summary,
        "tags": [endpoint.tag],
        "parameters": [param.openapi() for param in endpoint.params],
        "responses": responses,
    }
    if not endpoint.auth:
        op["security"] = []
    return {"get": op}


def document(endpoints: Sequence[Endpoint], server_url: str = "") -> dict[str, Any]:
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "cbmflow API",
            "version": "1",
            "description": "JRC CbM-compatible /query routes and the versioned /api/v1 routes. Errors are"
            ' {"error": {"code", "message"}}.',
        },
        "servers": [{"url": server_url or "/"}],
        "security": [{"basic": []}, {"bearer": []}],
        "components": {
            "securitySchemes": {
                "basic": {"type": "http", "scheme": "basic"},
                "bearer": {"type": "http", "scheme": "bearer", "description": "token from `cbmflow users token`"},
            },
            "schemas": {"Error": ERROR},
        },
        "paths": {endpoint.path: operation(endpoint) for endpoint in endpoints},
    }


def routes(others: Sequence[Endpoint]) -> list[Endpoint]:
    """The document's own route, describing ``others`` and itself."""

    def openapi(request: Request, p: Params) -> Response:
        return ApiJSONResponse(document(everything, str(request.base_url).rstrip("/")))

    own = Endpoint(OPENAPI_PATH, openapi, "this document", json_content(OBJECT), auth=False, found=False)
    everything = [*others, own]
    return [own]
