"""Error responses every client can read, and the exception handlers that produce them.

One body carries both shapes: Mistral's flat ``{"object": "error", "message", "type", "param", "code"}`` and
OpenAI's ``{"error": {...}}``; validation errors add FastAPI's ``detail`` list, which the mistralai SDK parses
into ``HTTPValidationError``. Status codes: 400 impossible request or unparsable body, 401 bad key, 404 unknown
model or path, 413 body too large, 422 schema violation (the message names the field), 429/503 with
``Retry-After`` when the server cannot take the request now, 500 only for bugs (logged with a traceback, the
server keeps serving).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("mixtral.serve")

# HTTP status -> the ``type`` both APIs use for it.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error the client caused or must handle; raised anywhere in a request, rendered by ``error_response``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, detail: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers
        self.detail = detail


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None,
               detail: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    err_type = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "internal_server_error")
    inner = {"message": message, "type": err_type, "param": param, "code": code if code is not None else str(status)}
    body: dict[str, Any] = {"object": "error", **inner, "error": inner}
    if detail is not None:
        body["detail"] = detail
    return body


def error_response(exc: APIError) -> JSONResponse:
    body = error_body(exc.status, exc.message, param=exc.param, code=exc.code, detail=exc.detail)
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


# Tags pydantic puts in an error's ``loc`` for union branches and message roles: not field names.
_UNION_TAGS = ("str", "int", "float", "bool", "system", "developer", "user", "assistant", "tool")


def _is_tag(part: Any, first: bool) -> bool:
    if not isinstance(part, str):
        return False
    if first and part == "body":
        return True
    return (part in _UNION_TAGS or "[" in part or part[:1].isupper()
            or part.startswith(("function-", "literal", "is-instance", "json-or-python", "constrained-", "nullable")))


def _loc_to_param(loc: tuple[Any, ...] | list[Any]) -> str:
    """('body', 'messages', 0, 'user', 'content', 'str') -> 'messages[0].content'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _is_tag(part, first=not out):
            out += f".{part}" if out else str(part)
    return out


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """Turn pydantic's error list into one readable 422 (or 400 for a body that is not JSON at all)."""
    if any(e.get("type") == "json_invalid" for e in errors):
        err = next(e for e in errors if e.get("type") == "json_invalid")
        reason = (err.get("ctx") or {}).get("error", "JSON decode error")
        return APIError(400, f"request body is not valid JSON: {reason}", code="invalid_json")
    parts = []
    detail = []
    for e in errors[:8]:
        param = _loc_to_param(e.get("loc", ()))
        # pydantic prefixes the text of a ValueError raised by a validator; the client needs only the text.
        msg = e.get("msg", "invalid value").removeprefix("Value error, ")
        if e.get("type") == "extra_forbidden":
            msg = "unknown field (not part of the API)"
        elif e.get("type") == "missing":
            msg = "field required"
        parts.append(f"{param or 'body'}: {msg}")
        detail.append({"loc": list(e.get("loc", ())), "msg": msg, "type": e.get("type", "value_error")})
    more = f" (and {len(errors) - 8} more)" if len(errors) > 8 else ""
    first = _loc_to_param(errors[0].get("loc", ())) if errors else None
    return APIError(422, "invalid request: " + "; ".join(parts) + more, param=first or None,
                    code="invalid_request", detail=detail)


def _v1_hint(request: Request) -> str:
    """A pointer to the /v1 route when the client left /v1 out of its base URL (a common OpenAI SDK slip)."""
    path = request.url.path
    if path.startswith("/v1/"):
        return ""
    wanted = "/v1" + path.rstrip("/")
    if any(getattr(route, "path", None) == wanted for route in request.app.routes):
        return f"; did you mean {wanted}? (an OpenAI client's base_url must end in /v1; a Mistral client's " \
               f"server_url is the server root)"
    return ""


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception a request can raise to an error body; unknown ones are 500 and logged."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 400 and "parsing the body" in message:
            message = "request body could not be read as UTF-8 JSON"
        elif exc.status_code == 404:
            message = f"not found: {message}" if message != "Not Found" else \
                f"no such endpoint: {request.method} {request.url.path}" + _v1_hint(request)
        elif exc.status_code == 405:
            message = f"{message}: {request.method} is not allowed on {request.url.path}"
        return error_response(APIError(exc.status_code, message, headers=getattr(exc, "headers", None)))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error serving %s %s", request.method, request.url.path)
        return error_response(APIError(500, f"internal server error: {type(exc).__name__}: {exc}"))
