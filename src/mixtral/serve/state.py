"""What every request handler shares: the engine, tokenizer, served model, metrics, limits and admission.

Admission control lives here. A request is *queued* from the moment the server accepts it until its first
token arrives (it is waiting for prompt encoding, a batch slot, KV blocks or its prefill); once more than
``max_queued_requests`` are queued, new ones get 429 with ``Retry-After`` instead of piling up. While the server
drains (SIGTERM), new requests get 503 with ``Retry-After`` and ``/health`` says so, while the ones already
admitted run to completion.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mixtral.serve.errors import APIError
from mixtral.serve.metrics import ServerMetrics
from mixtral.serve.models import ServedModel

if TYPE_CHECKING:
    from mixtral.engine.async_engine import AsyncEngine
    from mixtral.serve.guide_compiler import GuideLimits
    from mixtral.tokenizer import Tokenizer


@dataclass
class ServerSettings:
    """Limits and options of one server (the ``mixtral serve`` flags that are not engine knobs)."""

    api_key: str | None = None
    max_queued_requests: int | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    drain_timeout: float = 30.0
    # Seconds a client is told to wait after a 429/503.
    retry_after_s: int = 1
    # The web page at / (--no-ui turns it off; see ui_routes.py).
    ui: bool = True
    # Seconds a client has to send a request's headers, then again its body; slower ones are dropped (408).
    read_timeout: float = 30.0
    # Seconds a stream may wait on a client that stopped reading before it is aborted (its KV blocks freed).
    stall_timeout: float = 30.0
    # Deepest JSON nesting a request body may have (deeper: 400 naming the depth).
    max_json_depth: int = 64
    # Constrained decoding: compiled-grammar cache size and per-schema bounds (None: GuideLimits' defaults). The
    # compiler is one per process: the last server built sets it.
    guide_limits: GuideLimits | None = None

    def __post_init__(self) -> None:
        for name in ("read_timeout", "stall_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ServerSettings.{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.drain_timeout < 0:
            raise ValueError(f"ServerSettings.drain_timeout must be >= 0, got {self.drain_timeout}")
        if self.max_json_depth < 1 or self.max_body_bytes < 1:
            raise ValueError(f"ServerSettings.max_json_depth and max_body_bytes must be >= 1, got "
                             f"{self.max_json_depth} and {self.max_body_bytes}")


class RequestTracker:
    """One admitted request's life: when it stops being queued (first token) and when it is done (``release``).

    ``release`` is idempotent and must run exactly once per admitted request, whatever happens to it; handlers
    call it in a ``finally`` (or hand it to the streaming response, which calls it when the stream closes).
    """

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.arrival = time.monotonic()
        self.queued = True
        self.released = False

    def started(self) -> None:
        """The first token arrived: the request no longer counts against the queue limit."""
        if self.queued:
            self.queued = False
            self.state.num_queued -= 1

    def release(self) -> None:
        if self.released:
            return
        self.started()
        self.released = True
        self.state.num_in_flight -= 1
        self.state.metrics.in_flight.labels(self.state.model.name).dec()


class ServerState:
    """Shared by the handlers of one app (held in ``app.state.server``)."""

    def __init__(self, engine: AsyncEngine, tokenizer: Tokenizer, model: ServedModel, settings: ServerSettings,
                 metrics: ServerMetrics) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.model = model
        self.settings = settings
        self.metrics = metrics
        self.num_queued = 0
        self.num_in_flight = 0
        self.draining = False
        from mixtral.serve.guide_compiler import GuideLimits, configure

        configure(settings.guide_limits or GuideLimits())  # the compiler every chat request's guide is built with

    def new_request_id(self, prefix: str) -> str:
        """A fresh id (the engine's request id too): random, so ids stay distinct across restarts in logs."""
        return f"{prefix}-{secrets.token_hex(12)}"

    def admit(self) -> RequestTracker:
        """Admit one generation request or raise 503 (draining) / 429 (queue full) with Retry-After."""
        retry = {"Retry-After": str(self.settings.retry_after_s)}
        if self.draining:
            self.metrics.reject(503)
            raise APIError(503, "server is shutting down and takes no new requests", code="shutting_down",
                           headers=retry)
        limit = self.settings.max_queued_requests
        if limit is not None and self.num_queued >= limit:
            self.metrics.reject(429)
            raise APIError(429, f"too many requests waiting ({self.num_queued} queued, limit --max-queued-requests="
                                f"{limit}); retry after {self.settings.retry_after_s}s", code="queue_full",
                           headers=retry)
        tracker = RequestTracker(self)
        self.num_queued += 1
        self.num_in_flight += 1
        self.metrics.in_flight.labels(self.model.name).inc()
        return tracker
