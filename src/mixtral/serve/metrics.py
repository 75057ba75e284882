"""Prometheus metrics of the server, including expert utilization per (layer, expert).

Each app gets its own ``CollectorRegistry`` (no process-wide globals, so tests can run several servers).
Request-level figures (finish reasons, TTFT, inter-token latency, end-to-end latency, token counts) are
recorded by the handlers through ``ServerMetrics``; engine state (running / waiting requests, KV usage,
prefix-cache hit rate) and expert routing counts are read from the engine at scrape time by ``EngineCollector``,
so a scrape always shows the current numbers and the engine pays nothing between scrapes.

Expert utilization: ``mixtral_expert_tokens_total{layer, expert}`` counts tokens routed to each expert (the
figure Mixtral's documentation tells operators to watch: a skewed router overloads one expert's GPU under expert
parallelism); ``mixtral_expert_load_imbalance{layer}`` is max/mean of those counts (1.0 = perfectly balanced).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# Latency buckets in seconds: from sub-millisecond CPU decode steps to minutes-long requests.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                    1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)


def stat(stats: Any, *names: str, default: float = 0.0) -> float:
    """First of ``names`` found in ``stats`` (a dict or an object): engines name these figures differently."""
    for name in names:
        value = stats.get(name) if isinstance(stats, dict) else getattr(stats, name, None)
        if value is not None:
            return float(value)
    return default


class EngineCollector(Collector):
    """Reads the engine's live figures at each scrape."""

    def __init__(self, get_stats: Callable[[], Any], expert_counts: Callable[[], Any] | None) -> None:
        self._get_stats = get_stats
        self._expert_counts = expert_counts

    def collect(self) -> Iterator[Metric]:
        stats = self._get_stats()
        for name, doc, keys in (
            ("mixtral_num_requests_running", "requests the engine is generating for", ("running", "num_running")),
            ("mixtral_num_requests_waiting", "requests waiting for KV blocks or a batch slot",
             ("waiting", "num_waiting")),
            ("mixtral_kv_cache_usage_ratio", "fraction of KV cache blocks in use (0..1)",
             ("kv_cache_usage", "kv_usage", "gpu_cache_usage")),
            ("mixtral_prefix_cache_hit_rate", "fraction of prompt tokens served from the prefix cache (0..1)",
             ("prefix_cache_hit_rate", "prefix_hit_rate")),
            ("mixtral_kv_cache_free_blocks", "free KV cache blocks", ("num_free_blocks", "free_blocks")),
            ("mixtral_kv_cache_total_blocks", "KV cache blocks in all", ("num_total_blocks", "total_blocks",
                                                                          "num_blocks")),
        ):
            yield GaugeMetricFamily(name, doc, value=stat(stats, *keys))
        if self._expert_counts is None:
            return
        counts = self._expert_counts()
        if counts is None:
            return
        rows = counts.tolist() if hasattr(counts, "tolist") else counts  # [L, E]
        tokens = CounterMetricFamily("mixtral_expert_tokens", "tokens routed to each expert of each layer",
                                     labels=["layer", "expert"])
        imbalance = GaugeMetricFamily("mixtral_expert_load_imbalance",
                                      "max/mean tokens per expert in each layer (1.0 = balanced)", labels=["layer"])
        for layer, row in enumerate(rows):
            for expert, count in enumerate(row):
                tokens.add_metric([str(layer), str(expert)], float(count))
            mean = sum(row) / len(row) if row else 0.0
            imbalance.add_metric([str(layer)], (max(row) / mean) if mean > 0 else 1.0)
        yield tokens
        yield imbalance


class ServerMetrics:
    """The request-level metrics of one app, in its own registry."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        self._model = model_name
        self.requests = Counter("mixtral_requests", "finished requests by finish reason",
                                ["model_name", "finish_reason"], registry=self.registry)
        self.rejected = Counter("mixtral_requests_rejected", "requests refused before generation, by HTTP status",
                                ["model_name", "status"], registry=self.registry)
        self.ttft = Histogram("mixtral_time_to_first_token_seconds", "time from arrival to the first token",
                              labels, buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("mixtral_inter_token_latency_seconds", "time between consecutive output tokens",
                             labels, buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("mixtral_e2e_request_latency_seconds", "time from arrival to the last token",
                             labels, buckets=_E2E_BUCKETS, registry=self.registry)
        self.prompt_tokens = Counter("mixtral_prompt_tokens", "prompt tokens processed", labels,
                                     registry=self.registry)
        self.cached_prompt_tokens = Counter("mixtral_cached_prompt_tokens", "prompt tokens served from the prefix "
                                            "cache", labels, registry=self.registry)
        self.generation_tokens = Counter("mixtral_generation_tokens", "tokens generated", labels,
                                         registry=self.registry)
        self.in_flight = Gauge("mixtral_http_requests_in_flight", "generation requests the server is handling",
                               labels, registry=self.registry)

    def attach_engine(self, get_stats: Callable[[], Any], expert_counts: Callable[[], Any] | None) -> None:
        self.registry.register(EngineCollector(get_stats, expert_counts))

    def finished(self, finish_reason: str, *, prompt_tokens: int, cached_tokens: int, generated: int,
                 e2e_s: float) -> None:
        self.requests.labels(self._model, finish_reason).inc()
        self.prompt_tokens.labels(self._model).inc(prompt_tokens)
        self.cached_prompt_tokens.labels(self._model).inc(cached_tokens)
        self.generation_tokens.labels(self._model).inc(generated)
        self.e2e.labels(self._model).observe(e2e_s)

    def first_token(self, seconds: float) -> None:
        self.ttft.labels(self._model).observe(seconds)

    def inter_token(self, seconds: float, tokens: int) -> None:
        """``tokens`` arrived together after ``seconds``: each is counted with an equal share of the gap."""
        if tokens <= 0:
            return
        hist = self.itl.labels(self._model)
        for _ in range(tokens):
            hist.observe(seconds / tokens)

    def reject(self, status: int) -> None:
        self.rejected.labels(self._model, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
