"""The server's OpenAPI schema (`/openapi.json`, `/docs`) as the API is: LibreTranslate's
`POST /translate` body, which the route reads by hand, and errors as 400 `{"error": ...}`."""

from __future__ import annotations

from fastapi import FastAPI

_LIBRETRANSLATE_FIELDS = {
    "type": "object",
    "required": ["q", "source", "target"],
    "properties": {
        "q": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        "source": {"type": "string", "description": "a language code, or auto"},
        "target": {"type": "string"},
        "format": {"type": "string", "enum": ["text", "html"], "default": "text"},
        "alternatives": {"type": "integer", "default": 0, "maximum": 16},
        "api_key": {"type": "string"},
        "early_exit": {
            "type": "boolean",
            "description": "qkv's: end the beam search when its best candidate ends (default: the "
            "server's, qkv serve --early-exit)",
        },
    },
}
# What LibreTranslate's clients send to POST /translate (read by hand, `_fields`), for /docs
LIBRETRANSLATE_BODY = {
    "required": True,
    "content": {
        kind: {"schema": _LIBRETRANSLATE_FIELDS}
        for kind in ("application/json", "application/x-www-form-urlencoded")
    },
}
_ERROR = {
    "description": 'A bad or missing field: {"error": "..."}',
    "content": {
        "application/json": {
            "schema": {"type": "object", "properties": {"error": {"type": "string"}}}
        }
    },
}


def openapi_with_our_errors(app: FastAPI) -> dict:
    """FastAPI's schema of the API, saying 400 {"error"} where FastAPI says 422 (`invalid_request`
    answers its validation errors so)."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        for operations in schema["paths"].values():
            for operation in operations.values():
                responses = operation.get("responses", {})
                if responses.pop("422", None) is not None or "requestBody" in operation:
                    responses["400"] = _ERROR
        for unused in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(unused, None)
        app.openapi_schema = schema
    return app.openapi_schema
