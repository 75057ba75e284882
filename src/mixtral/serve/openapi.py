"""The OpenAPI document and the ``/docs`` page: what the server really accepts and sends, readable offline.

FastAPI writes the document from the request and response models; this module adds what it cannot know:
- the streamed events (``text/event-stream``, described per event with OpenAPI 3.2's ``itemSchema``: ``data`` is a
  ``ChatCompletionChunk`` / ``CompletionResponse`` or an ``ErrorResponse`` as JSON, or ``[DONE]``), their schemas
  added as components so every ``$ref`` resolves;
- every error status a route can answer with, each with the real error body (``ErrorResponse``), in place of
  FastAPI's default 422 schema;
- the bearer security scheme, required on the API routes (and 401 documented) when the server has an API key.
``/docs`` is Swagger UI served from the files of the ``fastapi-offline`` package (a dependency), never a CDN;
ReDoc is off (it would need one).
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, HTMLResponse, Response
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from mixtral.serve.responses import ChatCompletionChunk, CompletionResponse, ErrorResponse

# Paths of the Swagger UI files (kept open without the API key, like /docs itself).
DOCS_ASSETS = {"/docs/swagger-ui-bundle.js": "swagger-ui-bundle.js", "/docs/swagger-ui.css": "swagger-ui.css"}
SECURITY_SCHEME = "bearerAuth"
_REF = "#/components/schemas/{model}"
_ERROR_TEXT = {
    400: "well-formed but impossible (prompt past the context, conflicting fields, body not JSON)",
    401: "missing or wrong API key",
    404: "unknown model",
    413: "body larger than --max-body-bytes",
    422: "the body does not match this schema (the message names the field)",
    429: "too many requests waiting (Retry-After)",
    503: "shutting down or the engine is not serving (Retry-After)",
}


def sse_response(model: type[BaseModel], description: str) -> dict[str, Any]:
    """A 200 answer that is JSON, or with ``stream: true`` server-sent events: each event's ``data`` is ``model``
    as JSON, or an ``ErrorResponse`` when an error happens after the stream began, and the last one is
    ``[DONE]``."""
    payload = {"anyOf": [{"$ref": _REF.format(model=model.__name__)}, {"$ref": _REF.format(model="ErrorResponse")}]}
    event = {"type": "object", "required": ["data"], "properties": {"data": {"anyOf": [
        {"const": "[DONE]"},
        {"type": "string", "contentMediaType": "application/json", "contentSchema": payload},
    ]}}}
    return {200: {"description": description, "content": {"text/event-stream": {"itemSchema": event}}}}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    ref = {"$ref": _REF.format(model=ErrorResponse.__name__)}
    return {s: {"description": _ERROR_TEXT.get(s, "error"), "content": {"application/json": {"schema": ref}}}
            for s in statuses}


def _component_schemas(models: list[type[BaseModel]]) -> dict[str, Any]:
    _, top = models_json_schema([(m, "serialization") for m in models], ref_template=_REF)
    return dict(top.get("$defs", {}))


def install_openapi(app: FastAPI, *, api_key_required: bool, public_paths: tuple[str, ...]) -> None:
    """Replace ``app.openapi`` with the completed document (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = doc.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        for name, schema in _component_schemas([ChatCompletionChunk, CompletionResponse, ErrorResponse]).items():
            schemas.setdefault(name, schema)
        # FastAPI's own 422 shape is not what this server sends: every error is an ErrorResponse.
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        components["securitySchemes"] = {SECURITY_SCHEME: {
            "type": "http", "scheme": "bearer",
            "description": "Authorization: Bearer KEY, required on the API routes when the server runs with "
                           "--api-key (X-Api-Key: KEY works too)"}}
        for path, item in doc.get("paths", {}).items():
            for operation in item.values():
                responses = operation.setdefault("responses", {})
                if "422" in responses:
                    responses["422"] = error_responses(422)[422]
                if api_key_required and path not in public_paths:
                    operation["security"] = [{SECURITY_SCHEME: []}]
                    responses.setdefault("401", error_responses(401)[401])
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]


def _swagger_static() -> Path | None:
    """The folder of the Swagger UI files shipped by ``fastapi-offline``, or None when it is not installed."""
    try:
        folder = Path(str(importlib.resources.files("fastapi_offline") / "static"))
    except ModuleNotFoundError:
        return None
    return folder if (folder / "swagger-ui-bundle.js").is_file() else None


def install_docs(app: FastAPI) -> None:
    """``GET /docs``: Swagger UI from local files; its two assets under /docs/."""
    static = _swagger_static()

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        if static is None:
            return HTMLResponse("<!doctype html><title>mixtral API</title><p>The interactive docs need the "
                                "<code>fastapi-offline</code> package (<code>pip install fastapi-offline</code>). "
                                "The API is described by <a href='/openapi.json'>/openapi.json</a>.</p>")
        return get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} API",
                                   swagger_js_url="/docs/swagger-ui-bundle.js", swagger_css_url="/docs/swagger-ui.css",
                                   swagger_favicon_url="data:,")

    def serve_file(name: str) -> Any:
        media = "text/css" if name.endswith(".css") else "text/javascript"

        async def asset() -> Response:
            if static is None:
                return Response("fastapi-offline is not installed", status_code=404, media_type="text/plain")
            return FileResponse(static / name, media_type=media)

        return asset

    for path, name in DOCS_ASSETS.items():
        app.add_api_route(path, serve_file(name), methods=["GET"], include_in_schema=False)
