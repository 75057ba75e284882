"""``mixtral bench serve``: the load generator against a live server, and its in-process mode with the offline
comparison."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from mixtral.bench import serve as bench


def _args(**overrides: Any) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args([])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def test_percentile() -> None:
    assert bench.percentile([], 50) == 0.0
    assert bench.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert bench.percentile(list(map(float, range(101))), 99) == 99.0


def test_bad_request_rate_is_refused_before_any_work(capsys: Any) -> None:
    # No server is started (url is unset): the check must come first, else 0 divided the arrival gaps.
    for rate in (0.0, -2.0, float("nan")):
        assert bench.run(_args(request_rate=rate, concurrency=None)) == 2
        assert "--request-rate must be > 0" in capsys.readouterr().err


def test_bench_against_running_server(live_server: Any, tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "bench.json"
    args = _args(url=live_server.url, num_requests=6, request_rate=50.0, concurrency=None, input_len=12,
                 output_len=5, json=str(out))
    assert bench.run(args) == 0
    report = json.loads(out.read_text())
    assert report["requests"] == 6 and report["failed"] == 0
    # One chunk per engine step: 4 gaps after the first token; fewer when the server merged steps for a client
    # that fell behind (its stream keeps only the newest output: on a loaded machine even none, all 5 tokens in
    # the first chunk).
    assert all(r["output_tokens"] == 5 and len(r["itls"]) <= 4 for r in report["results"]), report["results"]
    assert 0 < report["ttft_p50_ms"] <= report["e2e_p99_ms"] and report["output_tokens_per_s"] > 0
    assert "offline_wall_s" not in report  # only the in-process mode has an offline baseline
    assert "TTFT p50 / p99" in capsys.readouterr().out
    stats = live_server.wait_idle()
    assert stats.num_free_blocks == stats.num_total_blocks


def test_bench_in_process_with_offline_baseline(tiny_hf_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = _args(model=str(tiny_hf_checkpoint), device="cpu", num_requests=8, concurrency=4, input_len=16,
                 output_len=6, kv_cache_bytes=4 << 20, json=str(out))
    assert bench.run(args) == 0
    report = json.loads(out.read_text())
    assert report["failed"] == 0 and report["offline_wall_s"] > 0
    assert report["server_overhead_pct"] == 100 * (report["wall_s"] / report["offline_wall_s"] - 1)
    assert sum(r["output_tokens"] for r in report["results"]) == 8 * 6


def test_steps_without_text_still_time_tokens() -> None:
    """A token that completes no character yet (byte fallback) is still a step: TTFT + one ITL per later token."""
    import asyncio

    import httpx2 as httpx

    events = [{"choices": [{"index": 0, "text": "a", "finish_reason": None}]},
              {"choices": [{"index": 0, "text": "", "finish_reason": None}]},  # first byte of a 2-byte character
              {"choices": [{"index": 0, "text": "é", "finish_reason": None}]},
              {"choices": [{"index": 0, "text": "b", "finish_reason": "length"}],
               "usage": {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}}]
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"

    async def main() -> Any:
        transport = httpx.MockTransport(lambda request: httpx.Response(
            200, content=body.encode(), headers={"content-type": "text/event-stream"}))
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            return await bench._one_request(client, "m", [5, 6], 4)

    result = asyncio.run(main())
    assert result.ok and result.output_tokens == 4
    assert result.ttft > 0 and len(result.itls) == 3, result
