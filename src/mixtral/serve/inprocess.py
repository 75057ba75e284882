"""A server running inside this process: uvicorn on a free 127.0.0.1 port in a background thread.

Used by ``mixtral bench serve`` (when no ``--url`` is given) and by the server tests. The event loop, uvicorn and
the AsyncEngine's own thread all live in this process; ``stop`` shuts the server down as SIGTERM would (drain,
then the engine stops).
"""

from __future__ import annotations

import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from mixtral.serve.state import ServerSettings, ServerState

if TYPE_CHECKING:
    from mixtral.engine.llm_engine import LLMEngine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class InProcessServer:
    """``mixtral serve`` over ``model`` (a name/folder for ``LLMEngine.from_config``, or a built LLMEngine)."""

    def __init__(self, model: str | LLMEngine, *, served_model_name: str | None = None,
                 settings: ServerSettings | None = None,
                 aliases: list[str] | None = None, drain_timeout: float = 5.0, **engine_kwargs: Any) -> None:
        from mixtral.engine.async_engine import AsyncEngine
        from mixtral.serve.app import create_app
        from mixtral.serve.server import make_server

        self._model = model
        self._engine_kwargs = engine_kwargs
        self.llm = model if hasattr(model, "add_request") else self.build_engine()
        self.engine = AsyncEngine(self.llm)
        name = served_model_name or (model if isinstance(model, str) else getattr(self.llm, "model_name", "model"))
        self.app = create_app(self.engine, served_model_name=str(name), settings=settings or ServerSettings(),
                              aliases=aliases)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = make_server(self.app, host="127.0.0.1", port=self.port, drain_timeout=drain_timeout,
                                  log_level="warning", access_log=False)
        self.thread = threading.Thread(target=self.server.run, name=f"mixtral-serve-{self.port}", daemon=True)

    def build_engine(self) -> LLMEngine:
        """A fresh LLMEngine with this server's model and settings (the offline baseline of the benchmark)."""
        from mixtral.engine.llm_engine import LLMEngine

        if not isinstance(self._model, str):
            raise ValueError("build_engine needs the server to have been given a model name, not an engine")
        return LLMEngine.from_config(self._model, **{k: v for k, v in self._engine_kwargs.items() if v is not None})

    @property
    def state(self) -> ServerState:
        return self.app.state.server

    def start(self, timeout: float = 120.0) -> InProcessServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the in-process server on port {self.port} did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.handle_exit(15, None)  # what SIGTERM does: drain, then stop
        self.thread.join(timeout=60)

    def __enter__(self) -> InProcessServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
