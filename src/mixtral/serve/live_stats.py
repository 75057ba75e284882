"""The live figures behind the web page's dashboard (``GET /v1/stats``): the same numbers as ``/metrics``, as JSON,
plus a short history of throughput and load.

``snapshot`` reads the engine at call time exactly as the Prometheus collector does (``metrics.EngineCollector``):
tokens routed to each (layer, expert), requests running and waiting, KV-cache use. ``StatsHistory`` samples the
engine's cumulative token counters every ``interval_s`` (a task of the app's lifespan) and keeps the last
``window_s`` seconds, from which it derives tokens per second; it costs one ``get_stats`` call per interval.

Not for: Prometheus (``metrics.py`` is the scrape endpoint), per-request routing (``routing.py``).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from mixtral.serve.errors import logger
from mixtral.serve.metrics import stat


@dataclass(frozen=True)
class _Sample:
    t: float  # time.time() of the sample
    generation_tokens: float  # cumulative tokens sampled
    prompt_tokens: float  # cumulative prompt tokens computed
    running: float
    waiting: float
    kv_cache_usage: float


class StatsHistory:
    """A ring of engine samples, one per ``interval_s``, covering the last ``window_s`` seconds."""

    def __init__(self, get_stats: Callable[[], Any], *, interval_s: float = 1.0, window_s: float = 300.0) -> None:
        if interval_s <= 0 or window_s < interval_s:
            raise ValueError(f"need 0 < interval_s <= window_s, got interval_s={interval_s}, window_s={window_s}")
        self._get_stats = get_stats
        self.interval_s = interval_s
        self.window_s = window_s
        self._samples: deque[_Sample] = deque(maxlen=int(window_s / interval_s) + 1)

    def sample(self, now: float | None = None) -> None:
        stats = self._get_stats()
        self._samples.append(_Sample(
            t=time.time() if now is None else now,
            generation_tokens=stat(stats, "num_generation_tokens"),
            prompt_tokens=stat(stats, "num_prompt_tokens"),
            running=stat(stats, "running", "num_running"),
            waiting=stat(stats, "waiting", "num_waiting"),
            kv_cache_usage=stat(stats, "kv_cache_usage", "kv_usage", "gpu_cache_usage"),
        ))

    async def run(self) -> None:
        """Sample forever (cancelled with the app). A failed sample is logged once and skipped: the history is a
        convenience, never a reason to take the server down."""
        warned = False
        while True:
            try:
                self.sample()
            except Exception:
                if not warned:
                    logger.exception("could not sample the engine's stats for /v1/stats; the history skips them")
                    warned = True
            await asyncio.sleep(self.interval_s)

    def series(self) -> dict[str, Any]:
        """Per interval: its end time, tokens/s generated and prefilled over it, and the load at its end."""
        s = list(self._samples)
        pairs = list(pairwise(s))
        return {
            "interval_s": self.interval_s,
            "window_s": self.window_s,
            "time": [b.t for _, b in pairs],
            "generation_tokens_per_s": [max(b.generation_tokens - a.generation_tokens, 0.0) / max(b.t - a.t, 1e-9)
                                        for a, b in pairs],
            "prompt_tokens_per_s": [max(b.prompt_tokens - a.prompt_tokens, 0.0) / max(b.t - a.t, 1e-9)
                                    for a, b in pairs],
            "requests_running": [b.running for _, b in pairs],
            "requests_waiting": [b.waiting for _, b in pairs],
            "kv_cache_usage": [b.kv_cache_usage for _, b in pairs],
        }


def snapshot(get_stats: Callable[[], Any], expert_counts: Callable[[], Any] | None, *, num_layers: int,
             num_experts: int, top_k: int, in_flight: int) -> dict[str, Any]:
    """The current figures, named and computed as ``/metrics`` names and computes them."""
    stats = get_stats()
    counts = expert_counts() if expert_counts is not None else None
    rows = (counts.tolist() if hasattr(counts, "tolist") else counts) if counts is not None else None  # [L, E]
    imbalance = None
    if rows is not None:
        imbalance = []
        for row in rows:
            mean = sum(row) / len(row) if row else 0.0
            imbalance.append((max(row) / mean) if mean > 0 else 1.0)
    return {
        "num_layers": num_layers,
        "num_experts": num_experts,
        "top_k": top_k,
        "expert_tokens": rows,  # mixtral_expert_tokens_total{layer, expert}
        "expert_load_imbalance": imbalance,  # mixtral_expert_load_imbalance{layer}
        "requests_running": stat(stats, "running", "num_running"),  # mixtral_num_requests_running
        "requests_waiting": stat(stats, "waiting", "num_waiting"),  # mixtral_num_requests_waiting
        "kv_cache_usage": stat(stats, "kv_cache_usage", "kv_usage", "gpu_cache_usage"),
        "kv_cache_free_blocks": stat(stats, "num_free_blocks", "free_blocks"),
        "kv_cache_total_blocks": stat(stats, "num_total_blocks", "total_blocks", "num_blocks"),
        "prefix_cache_hit_rate": stat(stats, "prefix_cache_hit_rate", "prefix_hit_rate"),
        "generation_tokens_total": stat(stats, "num_generation_tokens"),
        "prompt_tokens_total": stat(stats, "num_prompt_tokens"),
        "http_requests_in_flight": in_flight,
    }
