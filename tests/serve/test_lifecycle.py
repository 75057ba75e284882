"""Load and lifecycle of the live server: disconnects free KV blocks, 64 concurrent streams, 429 with Retry-After,
the API key, metrics (expert utilization included), and SIGTERM draining a real ``mixtral serve`` process."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import time
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from serve_testing import serve_process

from mixtral.serve.state import ServerSettings

LONG = {"model": "tiny-mixtral", "messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 200,
        "ignore_eos": True, "temperature": 0}


def metric(text: str, name: str, labels: str = "") -> float:
    """Sum of the samples of ``name`` whose label set contains ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {") and labels in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_disconnect_mid_stream_aborts_and_frees_blocks(live_server: Any) -> None:
    with live_server.client() as client:
        before = metric(client.get("/metrics").text, "mixtral_requests_total", 'finish_reason="abort"')
        with client.stream("POST", "/v1/chat/completions", json={**LONG, "stream": True}) as resp:
            assert resp.status_code == 200
            lines = []
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    lines.append(line)
                if len(lines) >= 4:
                    break  # hang up after a few tokens of 200
        stats = live_server.wait_idle()
        assert stats.num_free_blocks == stats.num_total_blocks
        after = metric(client.get("/metrics").text, "mixtral_requests_total", 'finish_reason="abort"')
        assert after == before + 1
        # Same for a non-streaming request whose client hangs up while the engine generates.
        payload = json.dumps({**LONG, "max_tokens": 230}).encode()
        with socket.create_connection(("127.0.0.1", live_server.port)) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
            deadline = time.monotonic() + 10
            while live_server.llm.get_stats().num_running == 0:
                assert time.monotonic() < deadline, "the request never started"
                time.sleep(0.002)
        # The socket is closed: the server notices the disconnect and aborts the request.
        stats = live_server.wait_idle()
        assert stats.num_free_blocks == stats.num_total_blocks
        assert metric(client.get("/metrics").text, "mixtral_requests_total", 'finish_reason="abort"') == after + 1


async def _stream_one(client: httpx.AsyncClient, i: int) -> tuple[str, str, int]:
    body = {"model": "tiny-mixtral", "messages": [{"role": "user", "content": f"Request {i}"}], "max_tokens": 12,
            "stream": True, "temperature": 0.8, "random_seed": i}
    text, finish, usage, done = "", "", 0, False
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                text += chunk["choices"][0]["delta"].get("content") or ""
                finish = chunk["choices"][0]["finish_reason"] or finish
                usage = (chunk.get("usage") or {}).get("completion_tokens", usage)
    assert done
    return text, finish, usage


def test_64_concurrent_streams(live_server: Any) -> None:
    async def main() -> list[tuple[str, str, int]]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=live_server.url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(_stream_one(client, i) for i in range(64)))

    results = asyncio.run(main())
    assert len(results) == 64
    for _text, finish, usage in results:
        assert finish in ("stop", "length") and 1 <= usage <= 12
    stats = live_server.wait_idle()
    assert stats.num_free_blocks == stats.num_total_blocks
    # Seeded sampling is reproducible whatever else shared the batch: request 5 alone gives the same text.
    alone = asyncio.run(_alone(live_server.url, 5))
    assert alone == results[5][0]


async def _alone(url: str, i: int) -> str:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        return (await _stream_one(client, i))[0]


def test_queue_limit_gives_429_with_retry_after(server_factory: Any) -> None:
    with server_factory(max_num_seqs=1, settings=ServerSettings(max_queued_requests=2)) as server:

        async def main() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
                return await asyncio.gather(*(client.post("/v1/chat/completions", json={**LONG, "max_tokens": 60})
                                              for _ in range(6)))

        responses = asyncio.run(main())
        codes = sorted(r.status_code for r in responses)
        assert codes.count(429) >= 1 and codes.count(200) >= 2 and set(codes) == {200, 429}, codes
        for r in responses:
            if r.status_code == 429:
                assert r.headers["retry-after"] == "1" and "max-queued-requests=2" in r.json()["message"]
        with server.client() as client:
            assert client.post("/v1/chat/completions", json={**LONG, "max_tokens": 2}).status_code == 200
            assert metric(client.get("/metrics").text, "mixtral_requests_rejected_total", 'status="429"') == \
                codes.count(429)
        stats = server.wait_idle()
        assert stats.num_free_blocks == stats.num_total_blocks


def test_api_key(server_factory: Any) -> None:
    from openai import AuthenticationError, OpenAI

    with server_factory(settings=ServerSettings(api_key="s3cret")) as server:
        body = {**LONG, "max_tokens": 2}
        with server.client() as client:
            assert client.post("/v1/chat/completions", json=body).status_code == 401
            bad = client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"})
            assert bad.status_code == 401 and "API key" in bad.json()["message"]
            assert client.get("/v1/models").status_code == 401
            assert client.get("/health").status_code == 200  # probes stay open
            good = client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer s3cret"})
            assert good.status_code == 200
        try:
            OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
            raise AssertionError("a wrong key must be refused")
        except AuthenticationError as exc:
            assert exc.status_code == 401
        assert OpenAI(base_url=f"{server.url}/v1", api_key="s3cret").models.list().data[0].id == "tiny-mixtral"


def test_metrics(live_server: Any) -> None:
    with live_server.client() as client:
        text0 = client.get("/metrics").text
        counts0 = live_server.llm.expert_counts().clone()
        resp = client.post("/v1/chat/completions", json={**LONG, "max_tokens": 5})
        usage = resp.json()["usage"]
        live_server.wait_idle()
        text = client.get("/metrics").text
    counts = live_server.llm.expert_counts()
    assert metric(text, "mixtral_generation_tokens_total") - metric(text0, "mixtral_generation_tokens_total") == 5
    assert metric(text, "mixtral_prompt_tokens_total") - metric(text0, "mixtral_prompt_tokens_total") == \
        usage["prompt_tokens"]
    assert metric(text, "mixtral_time_to_first_token_seconds_count") == \
        metric(text0, "mixtral_time_to_first_token_seconds_count") + 1
    assert metric(text, "mixtral_inter_token_latency_seconds_count") - \
        metric(text0, "mixtral_inter_token_latency_seconds_count") == 4
    assert metric(text, "mixtral_requests_total", 'finish_reason="length"') > 0
    for name in ("mixtral_num_requests_running", "mixtral_num_requests_waiting", "mixtral_kv_cache_usage_ratio",
                 "mixtral_prefix_cache_hit_rate"):
        assert re.search(rf"^{name} ", text, re.M), name
    # Expert utilization: one sample per (layer, expert) equal to the engine's counters; each token routed to
    # top-2 experts in each layer, so a layer's counts grew by 2 x the tokens this request ran through the model.
    layers, experts = counts.shape
    for layer in range(layers):
        for expert in range(experts):
            value = metric(text, "mixtral_expert_tokens_total", f'expert="{expert}",layer="{layer}"')
            assert value == float(counts[layer, expert]), (layer, expert)
    ran = usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"] + usage["completion_tokens"] - 1
    grown = (counts - counts0).sum(dim=1)
    assert grown.tolist() == [2 * ran] * layers
    assert metric(text, "mixtral_expert_load_imbalance", 'layer="0"') >= 1.0


def test_sigterm_drains_running_requests(tiny_hf_checkpoint: Path) -> None:
    with serve_process(tiny_hf_checkpoint, "--drain-timeout", "30", "--log-level", "warning") as (proc, url):
        async def main() -> tuple[list[tuple[str, str, int]], int]:
            async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                body = {**LONG, "max_tokens": 150, "stream": True}

                async def one() -> tuple[str, str, int]:
                    text, finish, usage = "", "", 0
                    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
                        async for line in resp.aiter_lines():
                            if line.startswith("data: {"):
                                chunk = json.loads(line[6:])
                                text += chunk["choices"][0]["delta"].get("content") or ""
                                finish = chunk["choices"][0]["finish_reason"] or finish
                                usage = (chunk.get("usage") or {}).get("completion_tokens", usage)
                    return text, finish, usage

                tasks = [asyncio.create_task(one()) for _ in range(3)]
                await asyncio.sleep(0.5)  # the streams are running
                proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.3)
                try:  # new work is refused while draining (503) or the port is already closed
                    late = (await client.post("/v1/chat/completions", json={**LONG, "max_tokens": 2})).status_code
                except httpx.TransportError:
                    late = 0
                return list(await asyncio.gather(*tasks)), late

        results, late = asyncio.run(main())
        for _text, finish, usage in results:
            assert finish == "length" and usage == 150, "running requests must finish during the drain"
        assert late in (0, 503)
        assert proc.wait(timeout=60) == 0


def test_engine_failure_mid_stream_is_reported_in_band(server_factory: Any) -> None:
    """An engine-loop failure after the stream began goes out as ``data: {error}`` then ``[DONE]``; then the server
    stops with exit status 1 (``mixtral serve`` exits with it, so a supervisor restarts the process) instead of
    staying up answering 503 forever (tests/serve/test_timeouts_drain.py checks the real process)."""
    with server_factory() as server:
        real_step = server.llm.step
        steps = {"n": 0}

        def failing_step(*args: Any, **kwargs: Any) -> Any:
            steps["n"] += 1
            if steps["n"] == 4:
                raise RuntimeError("injected engine failure")
            return real_step(*args, **kwargs)

        server.llm.step = failing_step
        with server.client() as client:
            with client.stream("POST", "/v1/chat/completions", json={**LONG, "stream": True}) as resp:
                assert resp.status_code == 200
                events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            error = json.loads(events[-2])
            assert error["object"] == "error" and error["error"]["code"] == "engine_unavailable", error
            assert "injected engine failure" in error["message"]
            assert any("choices" in json.loads(e) for e in events[:-2])  # tokens had been streamed before
        server.thread.join(timeout=10)
        assert not server.thread.is_alive(), "the server kept running on a dead engine"
        assert server.server.exit_code == 1
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{server.url}/health", timeout=2)
