"""Running the app under uvicorn with a graceful drain on SIGTERM / SIGINT.

On the signal, ``DrainingServer`` marks the app as draining at once (new requests get 503 + Retry-After,
/health turns 503), uvicorn stops listening and closes idle keep-alive connections, running requests get up to
``drain_timeout`` seconds to finish (uvicorn's ``timeout_graceful_shutdown``; requests still running after that
are cancelled, which aborts them in the engine), then the lifespan shuts the engine down and the process exits
with status 0.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from types import FrameType

import uvicorn
from fastapi import FastAPI

logger = logging.getLogger("mixtral.serve")


class DrainingServer(uvicorn.Server):
    """uvicorn's server, telling the app to refuse new work as soon as the shutdown signal arrives."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        state = getattr(self._app.state, "server", None)
        if state is not None and not state.draining:
            state.draining = True
            logger.info("signal %s: draining %d in-flight request(s) for up to %.0fs", sig, state.num_in_flight,
                        self.config.timeout_graceful_shutdown or 0)
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            # uvicorn re-raises the captured signal after shutting down, so the process would die of SIGTERM
            # (status 143) even after a clean drain; a drained server exits 0 instead.
            self._captured_signals.clear()


def make_server(app: FastAPI, *, host: str = "127.0.0.1", port: int = 8000, drain_timeout: float = 30.0,
                log_level: str = "info", access_log: bool = True) -> DrainingServer:
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                            timeout_graceful_shutdown=max(drain_timeout, 0.0),  # type: ignore[arg-type]  # float works
                            lifespan="on")
    return DrainingServer(config, app)
