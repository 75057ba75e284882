"""Timeouts, drain and engine death (issue 17, items 1 and 3), over real sockets on 127.0.0.1.

- a client that does not finish its request head, or its body, within ``--read-timeout`` is dropped (the body
  case is answered 408);
- a stream whose client stopped reading is aborted after ``--stall-timeout``: the engine frees its KV blocks
  long before the request would have finished;
- during a SIGTERM drain ``/health`` answers 503 ``draining`` while running streams finish; streams still running
  at ``--drain-timeout`` end with an error event and ``[DONE]``; no traceback reaches the log;
- an engine loop that dies (an injected bug) makes ``mixtral serve`` exit non-zero within seconds.

The ``mixtral serve`` processes run the tiny checkpoint on the CPU; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from serve_testing import serve_process

from mixtral.serve.state import ServerSettings

HERE = Path(__file__).parent
CHAT = {"model": "tiny-mixtral", "messages": [{"role": "user", "content": "Tell me a story"}], "temperature": 0,
        "ignore_eos": True}


def _recv_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and the seconds that took."""
    sock.settimeout(timeout)
    start = time.monotonic()
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data, time.monotonic() - start
        data += chunk


@pytest.fixture(scope="module")
def strict_server(server_factory: Any) -> Iterator[Any]:
    """Read and stall timeouts of 1 s; a 2048-token context so a request can outlast them."""
    server = server_factory(settings=ServerSettings(read_timeout=1.0, stall_timeout=1.0), max_model_len=2048)
    with server:
        yield server


def test_a_slow_request_head_is_dropped(strict_server: Any) -> None:
    for head in (b"", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: appl"):
        with socket.create_connection(("127.0.0.1", strict_server.port)) as sock:
            sock.sendall(head)
            data, waited = _recv_until_closed(sock, timeout=10)
        assert data == b"" and 0.8 <= waited < 5, (head, data, waited)
    with strict_server.client() as client:  # a keep-alive client that sends at normal speed is unaffected
        for _ in range(2):
            assert client.get("/health").status_code == 200


def test_a_slow_request_body_gets_408(strict_server: Any) -> None:
    with socket.create_connection(("127.0.0.1", strict_server.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 500\r\n\r\n{\"model\": ")
        data, waited = _recv_until_closed(sock, timeout=10)
    assert data.startswith(b"HTTP/1.1 408 "), data[:200]
    assert b"did not arrive within 1s (--read-timeout)" in data and 0.8 <= waited < 5


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_stream_whose_client_stopped_reading_is_aborted(strict_server: Any) -> None:
    llm = strict_server.llm
    before = llm.get_stats()
    records = _Records()
    for name in ("mixtral.serve", "uvicorn.error"):
        logging.getLogger(name).addHandler(records)
    # 4 samples x 2000 tokens with 20 alternatives each: ~16 MB of events, past the ~4 MB that the kernel's and the
    # server's send buffers hold for a client that reads nothing.
    body = json.dumps({**CHAT, "max_tokens": 2000, "n": 4, "temperature": 1.0, "stream": True, "logprobs": True,
                       "top_logprobs": 20}).encode()
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", strict_server.port))
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 20
        while llm.get_stats().num_requests == 0:
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.01)
        # Read nothing: the buffers fill, the server's sends wait, and after 1 s the stream is given up.
        stats = strict_server.wait_idle(timeout=120)
        data, _ = _recv_until_closed(sock, timeout=30)  # the server dropped the connection
    generated = stats.num_generation_tokens - before.num_generation_tokens
    assert generated < 4 * 2000, "the request ran to max_tokens: it was not aborted"
    assert stats.num_free_blocks == stats.num_total_blocks
    assert data.startswith(b"HTTP/1.1 200 ") and b"data: [DONE]" not in data
    for name in ("mixtral.serve", "uvicorn.error"):
        logging.getLogger(name).removeHandler(records)
    messages = [(r.levelno, r.getMessage()) for r in records.records]
    assert any("stopped reading for 1s (--stall-timeout)" in m for _, m in messages), messages
    assert not [m for level, m in messages if level >= logging.ERROR], messages  # expected, so no error lines
    with strict_server.client() as client:
        text = client.get("/metrics").text
        assert 'mixtral_requests_total{finish_reason="abort",model_name="tiny-mixtral"} 1.0' in text


# --------------------------------------------------------------------------- real `mixtral serve` processes
async def _stream(client: httpx.AsyncClient, body: dict[str, Any]) -> list[str]:
    async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as resp:
        assert resp.status_code == 200
        return [line[6:] async for line in resp.aiter_lines() if line.startswith("data: ")]


def _finish(events: list[str]) -> str | None:
    finish = None
    for event in events:
        if event.startswith("{"):
            chunk = json.loads(event)
            for choice in chunk.get("choices", []):
                finish = choice["finish_reason"] or finish
    return finish


def test_health_says_draining_while_running_streams_finish(tiny_hf_checkpoint: Path) -> None:
    with serve_process(tiny_hf_checkpoint, "--drain-timeout", "60", "--max-num-seqs", "2") as (proc, url):

        async def main() -> tuple[list[list[str]], list[tuple[int, Any]]]:
            async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                tasks = [asyncio.create_task(_stream(client, {**CHAT, "max_tokens": 200})) for _ in range(4)]
                while not (await client.get("/metrics")).text.count("mixtral_generation_tokens_total"):
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.3)
                proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.3)
                probes = []
                async with httpx.AsyncClient(base_url=url, timeout=5) as prober:  # a new connection, as an LB's
                    for _ in range(3):
                        health = await prober.get("/health")
                        probes.append((health.status_code, health.json()))
                        await asyncio.sleep(0.1)
                return list(await asyncio.gather(*tasks)), probes

        streams, probes = asyncio.run(main())
        assert all(p == (503, {"status": "draining"}) for p in probes), probes
        for events in streams:
            assert events[-1] == "[DONE]" and _finish(events) == "length", events[-3:]
        assert proc.wait(timeout=60) == 0
        log = proc.stdout.read() if proc.stdout else ""
        assert "Traceback" not in log, log


def test_streams_cut_by_the_drain_timeout_end_with_an_error_event(tiny_hf_checkpoint: Path) -> None:
    with serve_process(tiny_hf_checkpoint, "--drain-timeout", "1", "--max-num-seqs", "2") as (proc, url):

        async def main() -> tuple[list[list[str]], float]:
            async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                tasks = [asyncio.create_task(_stream(client, {**CHAT, "max_tokens": 230})) for _ in range(8)]
                await asyncio.sleep(0.5)
                proc.send_signal(signal.SIGTERM)
                start = time.monotonic()
                streams = list(await asyncio.gather(*tasks))
                return streams, time.monotonic() - start

        streams, took = asyncio.run(main())
        cut = 0
        for events in streams:
            assert events[-1] == "[DONE]", events[-3:]
            last = json.loads(events[-2])
            if last.get("object") == "error":
                cut += 1
                assert last["code"] == "shutting_down" and "--drain-timeout" in last["message"], last
            else:
                assert _finish(events) == "length"
        assert cut >= 1, "no stream outlasted a 1 s drain: the test did not exercise the cut"
        assert took < 10
        assert proc.wait(timeout=30) == 0
        log = proc.stdout.read() if proc.stdout else ""
        assert "Traceback" not in log and "drain timeout (1s) reached" in log, log


def test_an_engine_that_dies_makes_the_process_exit_non_zero(tiny_hf_checkpoint: Path) -> None:
    script = [str(HERE / "serve_with_engine_bug.py"), "5"]  # the 5th engine step raises
    with serve_process(tiny_hf_checkpoint, script=script) as (proc, url):
        with httpx.Client(base_url=url, timeout=30) as client, client.stream("POST", "/v1/chat/completions",
                           json={**CHAT, "max_tokens": 50, "stream": True}) as resp:
            events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])
        assert error["code"] == "engine_unavailable" and "injected engine bug" in error["message"]
        start = time.monotonic()
        code = proc.wait(timeout=20)
        assert code != 0 and time.monotonic() - start < 10
        with pytest.raises(httpx.TransportError):  # nothing is left answering 503 forever
            httpx.get(f"{url}/health", timeout=2)
        log = proc.stdout.read() if proc.stdout else ""
        assert "the engine stopped on an error" in log and "exit status 1" in log, log
