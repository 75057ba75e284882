"""``mixtral serve`` claims its address before loading the model: a taken port is reported at once (it used to be
found only after the load, minutes on a real model), the port stays reserved through the load, and uvicorn serves
on that same socket. Only 127.0.0.1 is bound here.
"""

from __future__ import annotations

import argparse
import errno
import socket
import threading
import time
import urllib.request
from typing import Any

import pytest

from mixtral.cli import serve
from mixtral.cli.main import build_parser
from mixtral.serve import server as server_module
from mixtral.serve.inprocess import free_port

pytestmark = pytest.mark.usefixtures("single_torch_thread")  # tests/conftest.py says why


def _args(port: int) -> argparse.Namespace:
    return build_parser("serve").parse_args(["serve", "tiny", "--device", "cpu", "--max-model-len", "64",
                                             "--kv-cache-bytes", str(1 << 20), "--port", str(port),
                                             "--log-level", "warning", "--no-access-log", "--drain-timeout", "1"])


def test_taken_port_is_reported_before_the_model_loads(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    def must_not_load(args: argparse.Namespace) -> Any:
        raise AssertionError("the model was loaded although the port is taken")

    monkeypatch.setattr(serve, "load_engine", must_not_load)
    with socket.socket() as other:  # another server, listening on the port
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        assert serve.run(_args(port)) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"mixtral serve: cannot listen on 127.0.0.1:{port}: the port is already in use"), err
    assert "--port" in err and "Traceback" not in err


def test_bind_socket_names_host_and_port() -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(OSError, match=rf"cannot listen on 127\.0\.0\.1:{port}: the port is already in use") as e:
            server_module.bind_socket("127.0.0.1", port)
    assert e.value.errno == errno.EADDRINUSE


def test_port_is_held_during_the_load_and_served_on(monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    taken_during_load: list[bool] = []
    servers: list[Any] = []
    real_load, real_make_server = serve.load_engine, server_module.make_server

    def load_and_probe(args: argparse.Namespace) -> Any:
        with socket.socket() as intruder:  # no SO_REUSEADDR: any bound socket on the port refuses it
            try:
                intruder.bind(("127.0.0.1", port))
                taken_during_load.append(False)
            except OSError as exc:
                taken_during_load.append(exc.errno == errno.EADDRINUSE)
        return real_load(args)

    def make_server(*a: Any, **kw: Any) -> Any:
        servers.append(real_make_server(*a, **kw))
        return servers[-1]

    monkeypatch.setattr(serve, "load_engine", load_and_probe)
    monkeypatch.setattr(server_module, "make_server", make_server)
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(serve.run(_args(port))), daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not (servers and servers[0].started):
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as resp:
        assert resp.status == 200
    servers[0].handle_exit(15, None)  # what SIGTERM does
    thread.join(timeout=30)
    assert result == [0] and taken_during_load == [True]
    with socket.socket() as after:  # the socket was closed with the server
        after.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        after.bind(("127.0.0.1", port))
