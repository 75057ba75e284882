"""ASGI middleware in front of the API: the API key (401), the request body's size (413), read time (408) and
JSON nesting (400).

Pure ASGI rather than Starlette's ``BaseHTTPMiddleware``, so the app still sees the client's ``http.disconnect``
(the disconnect watchers in ``generate.py`` and ``sse.py`` rely on it). The body is read here, at most
``max_body_bytes`` of it, within ``read_timeout`` seconds (a client trickling it in is answered 408 and dropped),
and replayed to the app; a ``Content-Length`` above the limit is refused before any byte is read. A JSON body
nested deeper than ``max_json_depth`` is refused before any parser recurses into it (``limits.py``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mixtral.serve.errors import error_body
from mixtral.serve.limits import json_depth

# Paths that stay open without the key: probes and scrapers usually carry no credentials.
PUBLIC_PATHS = ("/health", "/metrics", "/openapi.json", "/docs", "/docs/swagger-ui-bundle.js", "/docs/swagger-ui.css",
                "/")
# The web page's files (serve/ui_routes.py) hold no data: the page asks for the key and sends it on API calls.
PUBLIC_PREFIXES = ("/ui/static/",)


async def _send_error(send: Send, status: int, message: str, code: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(error_body(status, message, code=code)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class GuardMiddleware:
    """API-key check (constant-time) and body-size limit for every HTTP request."""

    def __init__(self, app: ASGIApp, *, api_key: str | None, max_body_bytes: int,
                 on_reject: Callable[[int], None] | None = None, read_timeout: float | None = None,
                 max_json_depth: int | None = None) -> None:
        self.app = app
        # Kept as a digest: comparing fixed-length digests takes the same time whatever the token's length.
        self.api_key = hashlib.sha256(api_key.encode()).digest() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.on_reject = on_reject or (lambda status: None)
        self.read_timeout = read_timeout
        self.max_json_depth = max_json_depth

    def _authorized(self, scope: Scope) -> bool:
        if self.api_key is None or scope["path"] in PUBLIC_PATHS or scope["path"].startswith(PUBLIC_PREFIXES):
            return True
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() != b"bearer":
            token = headers.get(b"x-api-key", b"")
        return hmac.compare_digest(hashlib.sha256(token.strip()).digest(), self.api_key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self._authorized(scope):
            self.on_reject(401)
            await _send_error(send, 401, "missing or invalid API key: send the header 'Authorization: Bearer <key>'",
                              "invalid_api_key", {"WWW-Authenticate": "Bearer"})
            return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await _send_error(send, 400, f"invalid Content-Length header {length.decode(errors='replace')!r}",
                                  "invalid_request")
                return
            if declared > self.max_body_bytes:
                await self._too_large(send, declared)
                return
        chunks: list[bytes] = []
        total = 0
        more = True
        with anyio.move_on_after(self.read_timeout) as reading:
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                total += len(chunk)
                if total > self.max_body_bytes:
                    await self._too_large(send, total)
                    return
                chunks.append(chunk)
                more = message.get("more_body", False)
        if reading.cancelled_caught:
            self.on_reject(408)
            # Answered, then the connection is closed (the rest of the body is never read).
            await _send_error(send, 408, f"the request body did not arrive within {self.read_timeout:g}s "
                                         f"(--read-timeout); {total} bytes came", "request_timeout",
                              {"Connection": "close"})
            return
        body = b"".join(chunks)
        if self.max_json_depth is not None and _is_json(scope):
            depth = json_depth(body)
            if depth > self.max_json_depth:
                self.on_reject(400)
                await _send_error(send, 400, f"the request body nests {depth} levels deep; the limit is "
                                             f"{self.max_json_depth} levels of JSON objects and arrays",
                                  "too_deeply_nested")
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send: Send, size: int) -> None:
        self.on_reject(413)
        await _send_error(send, 413, f"request body of {size}+ bytes exceeds the limit of {self.max_body_bytes} bytes "
                                     f"(--max-body-bytes)", "request_too_large")


def _is_json(scope: Scope) -> bool:
    """Whether the body is to be read as JSON (the API's content type, or none given)."""
    kind = dict(scope.get("headers") or []).get(b"content-type", b"application/json")
    return b"json" in kind.lower()
