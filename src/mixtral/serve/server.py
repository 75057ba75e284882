"""Running the app under uvicorn: a graceful drain on SIGTERM / SIGINT, an exit when the engine dies, and a read
timeout on request heads.

Drain: on the first signal ``DrainingServer`` marks the app as draining (new generation requests get 503 +
Retry-After, ``/health`` answers 503 ``{"status": "draining"}``) but keeps listening, so probes still get that
answer, while running requests finish. Once none is left, or ``drain_timeout`` seconds have passed, uvicorn shuts
down; at the timeout the requests still running are aborted in the engine first, so each stream ends with an
error event and ``[DONE]`` (a non-streaming request gets a 503) rather than a cut connection, and nothing is
cancelled mid-write (no tracebacks). The process then exits with status 0. A second signal skips what is left of
the drain.

Engine death: if the engine loop stops on an error (a bug), requests in flight have already been told (503 in
band); the server stops within a tick and ``mixtral serve`` exits with status 1, so a supervisor restarts it
instead of a process that answers 503 forever.

Slow clients: ``read_timeout`` bounds the time from a connection's first byte of a request (or its opening) to
the end of the request head; the body's own deadline is the middleware's (``middleware.py``).

``bind_socket`` reserves the address before the model loads (minutes for a real model), so a port that is taken
is reported at once; ``DrainingServer.run(sockets=[sock])`` then serves on that very socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI
from uvicorn.config import HTTP_PROTOCOLS
from uvicorn.importer import import_from_string

from mixtral.serve.state import ServerState

logger = logging.getLogger("mixtral.serve")

# After the drain timeout aborts what was left, how long the ended streams get to send their last events.
_CUT_GRACE_S = 5.0


class DrainingServer(uvicorn.Server):
    """uvicorn's server with the drain, the engine watch and the exit status described in the module docstring."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout: float = 30.0) -> None:
        super().__init__(config)
        self._app = app
        self.drain_timeout = drain_timeout
        self._drain_deadline: float | None = None
        self._cut = False
        self.exit_code = 0  # 1 when the engine died

    @property
    def _state(self) -> ServerState | None:
        return getattr(self._app.state, "server", None)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        state = self._state
        if state is None or self._drain_deadline is not None or self.should_exit:
            super().handle_exit(sig, frame)  # a second signal (or nothing to drain): stop now
            return
        self._captured_signals.append(sig)  # re-raised by uvicorn after shutdown unless cleared (see below)
        state.draining = True
        self._drain_deadline = time.monotonic() + self.drain_timeout
        logger.info("signal %s: draining %d in-flight request(s) for up to %gs", sig, state.num_in_flight,
                    self.drain_timeout)

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        state = self._state
        if state is None:
            return False
        error = state.engine.error
        if error is not None:
            logger.critical("the engine stopped on an error (%r): shutting down with exit status 1 so that a "
                            "supervisor restarts the server", error)
            self.exit_code = 1
            return True
        if self._drain_deadline is None:
            return False
        if state.num_in_flight == 0:
            return True
        if time.monotonic() < self._drain_deadline:
            return False
        if self._cut:
            return True  # the ended streams had their grace: uvicorn's own timeout closes what is left
        await self._cut_requests(state)
        self._drain_deadline = time.monotonic() + _CUT_GRACE_S
        return False

    async def _cut_requests(self, state: ServerState) -> None:
        self._cut = True
        n = await state.engine.abort_all()
        logger.warning("drain timeout (%gs) reached: ended %d unfinished request(s) with an error", self.drain_timeout,
                       n)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        state = self._state
        if state is not None and state.num_in_flight and not self._cut and state.engine.error is None:
            # A second signal skipped the drain: end the streams cleanly rather than cancel them mid-write.
            await self._cut_requests(state)
            await asyncio.sleep(0.2)
        await super().shutdown(sockets)

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


def header_timeout_protocol(base: type[asyncio.Protocol], timeout: float) -> type[asyncio.Protocol]:
    """``base`` (uvicorn's HTTP protocol class) closing a connection whose request head is not complete
    ``timeout`` seconds after the connection opened or after the first byte of its next request arrived.

    Between requests uvicorn's keep-alive timeout applies; once a head is complete the request runs (its body has
    the middleware's deadline). Relies on the ``cycle`` / ``response_complete`` attributes both of uvicorn's
    protocols (h11 and httptools) have.
    """

    class HeaderTimeoutProtocol(base):  # type: ignore[valid-type, misc]
        _head_timer: asyncio.TimerHandle | None = None

        def _idle(self) -> bool:
            cycle = getattr(self, "cycle", None)
            return cycle is None or cycle.response_complete

        def _arm(self) -> None:
            if self._head_timer is None:
                self._head_timer = asyncio.get_running_loop().call_later(timeout, self._head_timed_out)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._idle():
                self._arm()  # bytes of a new request head
            super().data_received(data)
            if not self._idle():
                self._disarm()  # the head is complete: the request runs

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _head_timed_out(self) -> None:
            self._head_timer = None
            transport = getattr(self, "transport", None)
            if self._idle() and transport is not None and not transport.is_closing():
                client = getattr(self, "client", None) or ("?", 0)
                logger.info("closing the connection from %s:%s: no complete request head within %gs "
                            "(--read-timeout)", client[0], client[1], timeout)
                transport.close()

    HeaderTimeoutProtocol.__name__ = f"HeaderTimeout{base.__name__}"
    return HeaderTimeoutProtocol


def make_server(app: FastAPI, *, host: str = "127.0.0.1", port: int = 8000, drain_timeout: float = 30.0,
                log_level: str = "info", access_log: bool = True, read_timeout: float | None = None
                ) -> DrainingServer:
    """The server for ``app``; ``read_timeout`` (seconds) bounds the time a client takes to send a request head
    (default: the app's ``ServerSettings.read_timeout``)."""
    state = getattr(app.state, "server", None)
    if read_timeout is None and state is not None:
        read_timeout = state.settings.read_timeout
    http: Any = "auto"
    if read_timeout is not None:
        http = header_timeout_protocol(import_from_string(HTTP_PROTOCOLS["auto"]), read_timeout)
    # uvicorn's own graceful timeout is only the backstop: the drain ends the requests first (see on_tick).
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log, http=http,
                            timeout_graceful_shutdown=_CUT_GRACE_S, lifespan="on")
    return DrainingServer(config, app, drain_timeout=max(drain_timeout, 0.0))


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
