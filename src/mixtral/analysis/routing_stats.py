"""Routing statistics over captured prompts: expert load and imbalance, top-k co-occurrence, entropy, label
preferences. Pure numpy on the arrays of ``routing_capture.PromptRouting``; knows nothing about models.

Definitions (L layers, E experts, k chosen per token, T tokens in all; each token counts once per chosen expert):

- load ``counts[l, e]``: tokens that chose expert e in layer l; ``share = counts / (T k)`` (balanced: 1/E);
- imbalance: max/mean of a layer's counts (as ``mixtral_expert_load_imbalance`` on ``/metrics``; 1 = balanced,
  E/k = every token to the same k experts) and the coefficient of variation (std/mean);
- co-occurrence ``pairs[l, i, j]``: tokens whose k choices in layer l include both i and j (i != j; symmetric;
  for Mixtral's k = 2 that is the top-2 pair);
- entropy: the router's per-token entropy of its softmax over all E experts, averaged (``token_entropy``: low =
  confident routing), and the entropy of the layer's load distribution (``load_entropy``); both also divided by
  ln E (1 = uniform);
- label preference: a label's share divided by everyone's share (``lift``; 2.0 = the label sends twice its
  fair share of tokens there), and the Jensen-Shannon divergence (bits) of the label's load from everyone's per
  layer: how much that layer's routing depends on the label.
Expert ids are per layer: expert 3 of layer 0 and expert 3 of layer 1 share nothing but the number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import numpy as np

from mixtral.analysis.routing_capture import PromptRouting


@dataclass
class RoutingReport:
    num_layers: int
    num_experts: int
    top_k: int
    num_prompts: int = 0
    num_tokens: int = 0
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [L, E]
    pairs: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [L, E, E]
    entropy_sum: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [L], summed over tokens (nats)
    label_counts: dict[str, np.ndarray] = field(default_factory=dict)  # label -> [L, E]
    label_tokens: dict[str, int] = field(default_factory=dict)
    label_prompts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        L, E = self.num_layers, self.num_experts
        self.counts = np.zeros((L, E), dtype=np.int64)
        self.pairs = np.zeros((L, E, E), dtype=np.int64)
        self.entropy_sum = np.zeros(L, dtype=np.float64)

    # ------------------------------------------------------------------ accumulation
    def add(self, routed: PromptRouting) -> None:
        experts = np.asarray(routed.experts)  # [T, L, k]
        t, n_layers, k = experts.shape
        if (n_layers, k) != (self.num_layers, self.top_k):
            raise ValueError(f"routing of shape [T, {n_layers}, {k}] does not fit a report of "
                             f"{self.num_layers} layers, top-{self.top_k}")
        counts = np.zeros((self.num_layers, self.num_experts), dtype=np.int64)
        for layer in range(n_layers):
            counts[layer] = np.bincount(experts[:, layer].reshape(-1), minlength=self.num_experts)
            for a, b in combinations(range(k), 2):
                np.add.at(self.pairs[layer], (experts[:, layer, a], experts[:, layer, b]), 1)
                np.add.at(self.pairs[layer], (experts[:, layer, b], experts[:, layer, a]), 1)
        probs = np.asarray(routed.probs, dtype=np.float64)  # [T, L, E]
        self.entropy_sum += -(probs * np.log(np.clip(probs, 1e-30, None))).sum(-1).sum(0)
        self.counts += counts
        self.num_prompts += 1
        self.num_tokens += t
        if routed.label is not None:
            self.label_counts.setdefault(routed.label, np.zeros_like(counts))
            self.label_counts[routed.label] += counts
            self.label_tokens[routed.label] = self.label_tokens.get(routed.label, 0) + t
            self.label_prompts[routed.label] = self.label_prompts.get(routed.label, 0) + 1

    # ------------------------------------------------------------------ derived figures
    @property
    def share(self) -> np.ndarray:
        """[L, E] share of each layer's routings."""
        return self.counts / np.clip(self.counts.sum(1, keepdims=True), 1, None)

    @property
    def imbalance(self) -> np.ndarray:
        """[L] max/mean tokens per expert (1.0 where a layer saw no tokens)."""
        mean = self.counts.mean(1)
        return np.where(mean > 0, self.counts.max(1) / np.clip(mean, 1e-12, None), 1.0)

    @property
    def cv(self) -> np.ndarray:
        mean = self.counts.mean(1)
        return np.where(mean > 0, self.counts.std(1) / np.clip(mean, 1e-12, None), 0.0)

    @property
    def token_entropy(self) -> np.ndarray:
        """[L] mean per-token router entropy in nats."""
        return self.entropy_sum / max(self.num_tokens, 1)

    @property
    def load_entropy(self) -> np.ndarray:
        """[L] entropy (nats) of each layer's load distribution."""
        return _entropy(self.share)

    def label_share(self, label: str) -> np.ndarray:
        counts = self.label_counts[label]
        return counts / np.clip(counts.sum(1, keepdims=True), 1, None)

    def lift(self, label: str) -> np.ndarray:
        """[L, E] the label's share over everyone's (NaN where nobody chose the expert)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.share > 0, self.label_share(label) / self.share, np.nan)

    def divergence(self, label: str) -> np.ndarray:
        """[L] Jensen-Shannon divergence (bits) between the label's load and everyone's."""
        return _js_bits(self.label_share(label), self.share)

    # ------------------------------------------------------------------ output
    def top_pairs(self, layer: int, n: int = 3) -> list[dict[str, Any]]:
        upper = np.triu(self.pairs[layer], 1)
        order = np.argsort(upper, axis=None)[::-1][:n]
        out = []
        for flat in order:
            i, j = divmod(int(flat), self.num_experts)
            if upper[i, j] == 0:
                break
            out.append({"experts": [i, j], "tokens": int(upper[i, j]),
                        "share_of_tokens": float(upper[i, j] / max(self.num_tokens, 1))})
        return out

    def label_summary(self, label: str, min_tokens: int = 1) -> dict[str, Any]:
        lift = self.lift(label)
        counts = self.label_counts[label]
        per_layer = []
        for layer in range(self.num_layers):
            row = np.where(counts[layer] >= min_tokens, lift[layer], np.nan)
            best = int(np.nanargmax(row)) if np.isfinite(row).any() else int(np.argmax(counts[layer]))
            per_layer.append({"layer": layer, "preferred_expert": best, "lift": _num(lift[layer, best]),
                              "share": float(self.label_share(label)[layer, best]),
                              "js_divergence_bits": float(self.divergence(label)[layer])})
        flat = [(lift[la, ex], la, ex) for la in range(self.num_layers) for ex in range(self.num_experts)
                if counts[la, ex] >= min_tokens and np.isfinite(lift[la, ex])]
        top = sorted(flat, reverse=True)[:5]
        return {
            "prompts": self.label_prompts[label], "tokens": self.label_tokens[label],
            "counts": counts.tolist(), "share": self.label_share(label).tolist(),
            "lift": [[_num(v) for v in row] for row in lift],
            "per_layer": per_layer,
            "strongest": [{"layer": la, "expert": ex, "lift": float(v)} for v, la, ex in top],
            "most_label_dependent_layer": int(np.argmax(self.divergence(label))),
        }

    def to_json(self) -> dict[str, Any]:
        log_e = math.log(self.num_experts)
        return {
            "num_prompts": self.num_prompts, "num_tokens": self.num_tokens, "num_layers": self.num_layers,
            "num_experts": self.num_experts, "top_k": self.top_k,
            "definitions": {
                "counts": "tokens that chose each expert, per layer (each token counts once per chosen expert)",
                "imbalance": "max/mean of a layer's counts (1 = balanced; as /metrics)",
                "cv": "std/mean of a layer's counts",
                "cooccurrence": "tokens whose top-k choices include both experts, per layer",
                "token_entropy": "mean per-token entropy (nats) of the router softmax over all experts",
                "load_entropy": "entropy (nats) of the layer's load distribution; *_normalized divides by ln E",
                "lift": "a label's share of an expert over everyone's share (per layer)",
                "js_divergence_bits": "Jensen-Shannon divergence of a label's load from everyone's",
            },
            "layers": [{
                "layer": layer,
                "counts": self.counts[layer].tolist(),
                "share": self.share[layer].tolist(),
                "imbalance": float(self.imbalance[layer]),
                "cv": float(self.cv[layer]),
                "token_entropy": float(self.token_entropy[layer]),
                "token_entropy_normalized": float(self.token_entropy[layer] / log_e),
                "load_entropy": float(self.load_entropy[layer]),
                "load_entropy_normalized": float(self.load_entropy[layer] / log_e),
                "top_pairs": self.top_pairs(layer),
                "cooccurrence": self.pairs[layer].tolist(),
            } for layer in range(self.num_layers)],
            "labels": {label: self.label_summary(label) for label in sorted(self.label_counts)},
        }


def build_report(routed: Sequence[PromptRouting], num_experts: int) -> RoutingReport:
    if not routed:
        raise ValueError("no prompts to report on")
    _, n_layers, k = np.asarray(routed[0].experts).shape
    report = RoutingReport(n_layers, num_experts, k)
    for r in routed:
        report.add(r)
    return report


def _num(value: float) -> float | None:
    """JSON has no NaN: an undefined figure is null."""
    return float(value) if np.isfinite(value) else None


def _entropy(p: np.ndarray) -> np.ndarray:
    return -(p * np.log(np.clip(p, 1e-30, None))).sum(-1)


def _kl_bits(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * (np.log2(np.clip(a, 1e-30, None)) - np.log2(np.clip(b, 1e-30, None)))).sum(-1)


def _js_bits(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    m = (p + q) / 2
    return 0.5 * _kl_bits(p, m) + 0.5 * _kl_bits(q, m)
