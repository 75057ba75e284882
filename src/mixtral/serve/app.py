"""The FastAPI app of ``mixtral serve``: Mistral- and OpenAI-compatible endpoints over one AsyncEngine.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models`` (Mistral model cards, one
per name the model answers to), ``GET /v1/models/{id}``, vLLM's ``POST /tokenize``, ``POST /detokenize`` and
``GET /tokenizer_info``, ``GET /health``, ``GET /metrics`` (Prometheus text), ``/openapi.json`` and ``/docs``
(Swagger UI from local files; see ``openapi.py``).
``create_app`` builds the app around an ``AsyncEngine``; the app's lifespan starts the engine and, on shutdown,
stops admission (503 + Retry-After) and gives running requests ``drain_timeout`` seconds to finish before the
engine stops.

Behaviour worth knowing (details in the modules that implement it):
- errors carry Mistral's and OpenAI's body shapes at once (``errors.py``); 422 names the bad field, 400 gives both
  numbers for a prompt or ``max_tokens`` past the context, 404 unknown model, 401 bad key (when ``api_key`` is
  set; ``/health``, ``/metrics`` and the docs stay open), 413 body over ``max_body_bytes``, 429 + Retry-After
  when ``max_queued_requests`` requests already wait for their first token;
- tool calls in the model's native ``[TOOL_CALLS]`` format (``chat.py``, ``tools.py``); on a v1-tokenizer model
  (no tool tokens) ``tools`` are dropped when ``tool_choice`` is ``"none"`` and refused with a 400 otherwise, and
  its model card says ``function_calling: false``;
- a client that disconnects aborts its request, which frees its KV blocks (``generate.py``, ``sse.py``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import anyio
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from mixtral import __version__
from mixtral.serve.chat import ChatHandler
from mixtral.serve.completions import CompletionHandler
from mixtral.serve.errors import install_error_handlers, logger
from mixtral.serve.metrics import ServerMetrics
from mixtral.serve.middleware import PUBLIC_PATHS, GuardMiddleware
from mixtral.serve.models import ServedModel
from mixtral.serve.openapi import error_responses, install_docs, install_openapi, sse_response
from mixtral.serve.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from mixtral.serve.responses import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionResponse,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeResponse,
    TokenizerInfoResponse,
)
from mixtral.serve.state import ServerSettings, ServerState
from mixtral.serve.tokenize import TokenizerEndpoints
from mixtral.serve.ui_routes import ui_router

if TYPE_CHECKING:
    from mixtral.engine.async_engine import AsyncEngine
    from mixtral.engine.llm_engine import LLMEngine
    from mixtral.tokenizer import Tokenizer


def llm_engine_of(async_engine: AsyncEngine) -> LLMEngine:
    """The LLMEngine inside an AsyncEngine (which wraps it as ``.engine``)."""
    return async_engine.engine


def create_app(engine: AsyncEngine, *, served_model_name: str, tokenizer: Tokenizer | None = None,
               settings: ServerSettings | None = None, aliases: list[str] | None = None,
               manage_engine: bool = True, allowed_origins: list[str] | None = None) -> FastAPI:
    """The ASGI app serving ``engine`` (an ``AsyncEngine``) as ``served_model_name``.

    ``manage_engine``: the lifespan starts the engine and shuts it down (off when a test owns the engine).
    ``allowed_origins``: origins browsers may call from (CORS); None keeps CORS off.
    """
    settings = settings or ServerSettings()
    llm = llm_engine_of(engine)
    tokenizer = tokenizer or llm.tokenizer
    if tokenizer is None:
        raise ValueError("serving needs a tokenizer: the engine has none and none was given")
    served = ServedModel(name=served_model_name, args=llm.model_args, max_model_len=llm.config.max_model_len,
                         supports_tools=bool(tokenizer.supports_tools), extra_aliases=list(aliases or []),
                         max_num_seqs=getattr(llm.config, "max_num_seqs", None))
    metrics = ServerMetrics(served_model_name)
    metrics.attach_engine(llm.get_stats, getattr(llm, "expert_counts", None))
    state = ServerState(engine, tokenizer, served, settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage_engine:
            await engine.start()
        logger.info("serving %s (aliases %s), max_model_len %d", served.name, served.aliases, served.max_model_len)
        try:
            yield
        finally:
            state.draining = True
            if manage_engine:
                await engine.shutdown(settings.drain_timeout)

    app = FastAPI(title="mixtral", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Mistral- and OpenAI-compatible API for Mixtral models.")
    app.state.server = state
    install_error_handlers(app)
    app.add_middleware(GuardMiddleware, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes,
                       on_reject=metrics.reject, read_timeout=settings.read_timeout,
                       max_json_depth=settings.max_json_depth)
    if allowed_origins:
        # Added last, so outermost: a browser's preflight (OPTIONS, no key) is answered before the key check.
        app.add_middleware(CORSMiddleware, allow_origins=allowed_origins, allow_methods=["*"], allow_headers=["*"])
    install_openapi(app, api_key_required=settings.api_key is not None, public_paths=PUBLIC_PATHS)
    install_docs(app)
    tokenizer_endpoints = TokenizerEndpoints(state)
    generation_errors = error_responses(400, 404, 413, 422, 429, 503)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse,
              responses={**sse_response(ChatCompletionChunk, "the completion, or with stream=true its chunks"),
                         **generation_errors})
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        """Chat completion (Mistral and OpenAI fields, vLLM's extras); SSE when ``stream`` is true."""
        # Built off the event loop: its checks include jsonschema's look at every schema (~2.5 s per MB, pure
        # Python), which would stall every running stream meanwhile.
        handler = await anyio.to_thread.run_sync(ChatHandler, state, body, request)
        return await handler.run()

    @app.post("/v1/completions", response_model=CompletionResponse,
              responses={**sse_response(CompletionResponse, "the completion, or with stream=true its chunks"),
                         **generation_errors})
    async def completions(body: CompletionRequest, request: Request) -> Response:
        """Plain-prompt completion (one prompt or a batch; scoring with echo + logprobs); SSE when ``stream``."""
        handler = await anyio.to_thread.run_sync(CompletionHandler, state, body, request)  # as chat's: off the loop
        return await handler.run()

    @app.get("/v1/models", response_model=ModelList)
    async def list_models() -> ModelList:
        """A Mistral model card for every name the served model answers to."""
        return served.model_list()

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=error_responses(404))
    async def retrieve_model(model_id: str) -> ModelCard:
        return served.card(served.resolve(model_id))

    @app.post("/tokenize", response_model=TokenizeResponse, responses=error_responses(400, 404, 413, 422))
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        """vLLM's: the token ids of a text (``prompt``) or of a chat prompt (``messages``)."""
        return tokenizer_endpoints.tokenize(body)

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=error_responses(400, 404, 413, 422))
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        """vLLM's: the text of token ids (control tokens written out)."""
        return tokenizer_endpoints.detokenize(body)

    @app.get("/tokenizer_info", response_model=TokenizerInfoResponse)
    async def tokenizer_info() -> TokenizerInfoResponse:
        """vLLM's: the special tokens and context length (what lm-eval's remote tokenizer reads)."""
        return tokenizer_endpoints.info()

    @app.get("/health", responses={503: {"description": "draining or the engine stopped", "content": {
        "application/json": {"schema": {"type": "object", "properties": {"status": {"type": "string"}}}}}}})
    async def health() -> Response:
        """200 while serving; 503 once shutting down or if the engine stopped (load balancers stop sending)."""
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not engine.is_running:  # the process exits within a tick (server.py): a supervisor restarts it
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return JSONResponse({"status": "ok", "model": served.name, "in_flight": state.num_in_flight})

    @app.get("/metrics", response_class=PlainTextResponse, responses={200: {
        "description": "Prometheus text exposition format",
        "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def prometheus_metrics() -> Response:
        """Prometheus text format: request, latency and token metrics, engine state, expert utilization."""
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # The web page at / (unless --no-ui) and GET /v1/stats, its dashboard's figures (serve/ui_routes.py).
    app.include_router(ui_router(state, llm.get_stats, getattr(llm, "expert_counts", None), page=settings.ui))
    return app
