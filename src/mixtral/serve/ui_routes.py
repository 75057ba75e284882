"""The web page's routes: the single-page app at ``/``, its static files, and the dashboard's ``GET /v1/stats``.

The page (``serve/ui/``: plain HTML, CSS and JavaScript shipped as package data, no build step) talks to the same
API as any client; nothing is fetched from outside the server. ``/`` and ``/ui/static/*`` are public even with
``--api-key`` (they hold no data: the page asks for the key and sends it with every API call), while
``/v1/stats`` is an API route and needs the key like every other. ``--no-ui`` leaves the page out
(``ServerSettings.ui``); ``/v1/stats`` stays, being API.

The page is served with a strict Content-Security-Policy (scripts and styles from this server only, no inline
script, no plugins, no framing): defence in depth behind the page's own rule of inserting model output as text.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse, Response

from mixtral.serve.errors import APIError
from mixtral.serve.live_stats import StatsHistory, snapshot

UI_PREFIX = "/ui/static/"
_MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                           "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; "
                           "frame-ancestors 'none'")
_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


def load_static_files() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, media type) of every file of the page, read once (a fixed set: no path is ever joined
    from a request, so nothing outside the folder can be named)."""
    folder = resources.files("mixtral.serve") / "ui"
    files = {}
    for entry in folder.iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1] if "." in entry.name else ""
        if entry.is_file() and suffix in _MEDIA_TYPES:
            files[entry.name] = (entry.read_bytes(), _MEDIA_TYPES[suffix])
    if "index.html" not in files:
        raise RuntimeError(f"the web page's index.html is missing from {folder}: the package was installed without "
                           f"its data files (reinstall it, or serve with --no-ui)")
    return files


def ui_router(state: Any, get_stats: Callable[[], Any], expert_counts: Callable[[], Any] | None, *,
              page: bool = True, history: StatsHistory | None = None) -> APIRouter:
    """The routes above; ``page=False`` (``--no-ui``) keeps only ``/v1/stats``. ``history`` samples while the app
    runs (the router's lifespan, merged into the app's)."""
    history = history or StatsHistory(get_stats)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.get_running_loop().create_task(history.run())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    router = APIRouter(lifespan=lifespan)
    args = state.model.args

    @router.get("/v1/stats")
    async def live_stats() -> JSONResponse:
        """Live figures for dashboards: tokens routed to each (layer, expert) and the engine's load (the numbers
        of ``/metrics``), plus the last minutes of tokens per second, running / waiting requests and KV-cache use.
        """
        body = snapshot(get_stats, expert_counts, num_layers=args.n_layers, num_experts=args.num_experts,
                        top_k=args.num_experts_per_tok, in_flight=state.num_in_flight)
        body["model"] = state.model.name
        body["history"] = history.series()
        return JSONResponse(body)

    if not page:
        return router
    files = load_static_files()

    def serve(name: str) -> Response:
        data, media_type = files[name]
        return Response(data, media_type=media_type, headers=_HEADERS)

    @router.get("/", include_in_schema=False)
    async def index() -> Response:
        return serve("index.html")

    @router.get(UI_PREFIX + "{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name not in files:
            raise APIError(404, f"no file {name!r} in the web page", code="not_found")
        return serve(name)

    return router
