"""The web page's routes over HTTP: the page and its files (with their security headers), ``--no-ui``, and
``GET /v1/stats`` against ``/metrics`` and the engine; the history sampler running in the app's lifespan."""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import httpx2 as httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mixtral.serve.live_stats import StatsHistory
from mixtral.serve.state import ServerSettings
from mixtral.serve.ui_routes import load_static_files


def test_the_page_and_its_files_are_served_with_a_strict_policy(live_server: Any) -> None:
    with live_server.client() as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        policy = page.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "default-src 'none'" in policy and "unsafe" not in policy
        assert page.headers["x-content-type-options"] == "nosniff"
        # Every file the page names is served from here, with its type.
        for name in ("app.js", "api.js", "render.js", "routing.js", "dashboard.js", "style.css", "favicon.svg"):
            assert f"/ui/static/{name}" in page.text or name.endswith(".js")
            resp = client.get(f"/ui/static/{name}")
            assert resp.status_code == 200, name
            assert resp.content == load_static_files()[name][0]
        assert client.get("/ui/static/app.js").headers["content-type"].startswith("text/javascript")
        missing = client.get("/ui/static/nothing.js")
        assert missing.status_code == 404 and "nothing.js" in missing.json()["message"]
        assert client.get("/ui/static/..%2Fapp.py").status_code == 404


def test_no_script_in_the_page_uses_html_parsing() -> None:
    """The page's rule: model text goes in as text. No file may use the HTML-parsing sinks at all."""
    for name, (data, _) in load_static_files().items():
        if name.endswith(".js"):
            code = [line for line in data.decode().splitlines() if not line.lstrip().startswith("//")]
            text = "\n".join(code)
            for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
                assert sink not in text, f"{name} uses {sink}"


def test_no_ui_leaves_the_page_out_and_keeps_the_api(server_factory: Any) -> None:
    with server_factory(settings=ServerSettings(ui=False)) as server, server.client() as client:
        assert client.get("/").status_code == 404
        assert client.get("/ui/static/app.js").status_code == 404
        assert client.get("/v1/stats").status_code == 200
        assert client.get("/v1/models").status_code == 200


def test_the_serve_command_has_the_flag() -> None:
    from mixtral.cli.serve import add_parser

    sub = argparse.ArgumentParser().add_subparsers()
    parser = add_parser(sub)
    assert parser.parse_args(["--no-ui"]).no_ui is True and parser.parse_args([]).no_ui is False
    assert "--no-ui" in parser.format_help()


def _scrape(url: str) -> dict[str, Any]:
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)}
    return {
        "counts": {(int(s.labels["layer"]), int(s.labels["expert"])): s.value
                   for s in families["mixtral_expert_tokens"].samples if s.name.endswith("_total")},
        "imbalance": {int(s.labels["layer"]): s.value for s in families["mixtral_expert_load_imbalance"].samples},
        "running": families["mixtral_num_requests_running"].samples[0].value,
        "waiting": families["mixtral_num_requests_waiting"].samples[0].value,
        "kv": families["mixtral_kv_cache_usage_ratio"].samples[0].value,
        "free": families["mixtral_kv_cache_free_blocks"].samples[0].value,
        "total": families["mixtral_kv_cache_total_blocks"].samples[0].value,
    }


def test_stats_are_the_numbers_of_metrics_and_the_history_moves(server_factory: Any) -> None:
    with server_factory() as server, server.client() as client:
        resp = client.post("/v1/chat/completions", json={"model": "tiny-mixtral", "max_tokens": 12,
                                                         "temperature": 0, "ignore_eos": True,
                                                         "messages": [{"role": "user", "content": "Count."}]})
        assert resp.status_code == 200
        server.wait_idle()
        stats = client.get("/v1/stats").json()
        scraped = _scrape(server.url)
        args = server.llm.model_args
        assert (stats["num_layers"], stats["num_experts"], stats["top_k"]) == (
            args.n_layers, args.num_experts, args.num_experts_per_tok)
        assert {(la, ex): c for la, row in enumerate(stats["expert_tokens"]) for ex, c in enumerate(row)} \
            == scraped["counts"]
        assert stats["expert_tokens"] == server.llm.expert_counts().tolist()
        # Every processed token is routed to top_k experts in every layer.
        assert all(sum(row) == sum(stats["expert_tokens"][0]) for row in stats["expert_tokens"])
        assert sum(stats["expert_tokens"][0]) == args.num_experts_per_tok * stats["prompt_tokens_total"] + \
            args.num_experts_per_tok * (stats["generation_tokens_total"] - 1)
        assert dict(enumerate(stats["expert_load_imbalance"])) == pytest.approx(scraped["imbalance"])
        assert (stats["requests_running"], stats["requests_waiting"]) == (scraped["running"], scraped["waiting"])
        assert stats["kv_cache_usage"] == scraped["kv"]
        assert (stats["kv_cache_free_blocks"], stats["kv_cache_total_blocks"]) == (scraped["free"], scraped["total"])
        assert stats["generation_tokens_total"] == 12 and stats["model"] == "tiny-mixtral"
        # The lifespan's sampler has been recording once a second since the server started.
        deadline = time.monotonic() + 5
        while len(client.get("/v1/stats").json()["history"]["time"]) < 2:
            assert time.monotonic() < deadline, "the stats history did not grow"
            time.sleep(0.2)
        history = client.get("/v1/stats").json()["history"]
        assert history["interval_s"] == 1.0 and history["window_s"] == 300.0
        n = len(history["time"])
        for key in ("generation_tokens_per_s", "prompt_tokens_per_s", "requests_running", "requests_waiting",
                    "kv_cache_usage"):
            assert len(history[key]) == n


class _Counters:
    def __init__(self) -> None:
        self.generated = 0.0
        self.prompt = 0.0

    def __call__(self) -> dict[str, float]:
        return {"num_generation_tokens": self.generated, "num_prompt_tokens": self.prompt, "num_running": 2,
                "num_waiting": 1, "kv_cache_usage": 0.25}


def test_history_rates_and_window() -> None:
    counters = _Counters()
    history = StatsHistory(counters, interval_s=1.0, window_s=3.0)
    for t in range(6):
        counters.generated += 10 * t  # 0, 10, 30, 60, 100, 150 -> per second: 10, 20, 30, 40, 50
        counters.prompt += 5
        history.sample(now=100.0 + t)
    series = history.series()
    # A window of 3 s keeps 4 samples, hence 3 intervals: the last three.
    assert series["time"] == [103.0, 104.0, 105.0]
    assert series["generation_tokens_per_s"] == [30.0, 40.0, 50.0]
    assert series["prompt_tokens_per_s"] == [5.0, 5.0, 5.0]
    assert series["requests_running"] == [2.0] * 3 and series["kv_cache_usage"] == [0.25] * 3
    with pytest.raises(ValueError, match="interval_s"):
        StatsHistory(counters, interval_s=0)


def test_the_sampler_survives_a_failing_read() -> None:
    counters = _Counters()
    calls = 0

    def flaky() -> dict[str, float]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("engine busy")
        return counters()

    history = StatsHistory(flaky, interval_s=0.01, window_s=1.0)

    async def run_briefly() -> None:
        task = asyncio.get_running_loop().create_task(history.run())
        await asyncio.sleep(0.2)
        task.cancel()

    asyncio.run(run_briefly())
    assert calls > 3 and len(history.series()["time"]) >= 2
