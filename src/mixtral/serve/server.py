"""Running the app under uvicorn with a graceful drain on SIGTERM / SIGINT.

On the signal, ``DrainingServer`` marks the app as draining at once (new requests get 503 + Retry-After,
/health turns 503), uvicorn stops listening and closes idle keep-alive connections, running requests get up to
``drain_timeout`` seconds to finish (uvicorn's ``timeout_graceful_shutdown``; requests still running after that
are cancelled, which aborts them in the engine), then the lifespan shuts the engine down and the process exits
with status 0.

``bind_socket`` reserves the address before the model loads (minutes for a real model), so a port that is taken
is reported at once; ``DrainingServer.run(sockets=[sock])`` then serves on that very socket.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
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

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if sockets is not None and self.started:
            # uvicorn announces the address only of sockets it binds itself; `mixtral serve` binds its own first.
            protocol = "https" if self.config.is_ssl else "http"
            logging.getLogger("uvicorn.error").info(
                "Uvicorn running on %s://%s (Press CTRL+C to quit)", protocol,
                _address(self.config.host, sockets[0].getsockname()[1]))

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


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port``, not listening yet (uvicorn listens on it once the app starts).

    Set up as uvicorn binds its own (SO_REUSEADDR, so a port left in TIME_WAIT by a stopped server is reusable;
    IPv6 when the host has a colon). Raises ``OSError`` with a message naming host and port, and what to do.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {_address(host, port)}: {_why(exc, port)}") from exc
    sock.set_inheritable(True)
    return sock


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _why(exc: OSError, port: int) -> str:
    if isinstance(exc, socket.gaierror):
        return f"the host name does not resolve ({exc.strerror}); check --host"
    if exc.errno == errno.EADDRINUSE:
        return "the port is already in use (another server?); choose another --port or stop that process"
    if exc.errno == errno.EACCES:
        hint = "ports below 1024 need root; choose a --port of 1024 or more" if port < 1024 else "check --port"
        return f"permission denied ({hint})"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "this machine has no such address; check --host (0.0.0.0 listens on all addresses)"
    return f"{exc.strerror or exc}"
