"""The PNG of ``mixtral routing``: one figure summing up a ``RoutingReport``.

Panels: the layer x expert load (share of each layer's routings), imbalance and normalised entropies per layer,
the top-k co-occurrence summed over layers, and one lift heatmap per label (log2 of the label's share over
everyone's; red = the label prefers that expert). Files only (matplotlib's Agg backend), never a window.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from mixtral.analysis.routing_stats import RoutingReport

MAX_LABEL_PANELS = 8


def write_report_png(report: RoutingReport, path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted(report.label_counts, key=lambda lab: -report.label_tokens[lab])[:MAX_LABEL_PANELS]
    n_label_rows = math.ceil(len(labels) / 4) if labels else 0
    L, E = report.num_layers, report.num_experts
    heat_h = max(2.5, 0.22 * L + 1.2)
    fig = plt.figure(figsize=(16, heat_h + n_label_rows * heat_h + 0.6), constrained_layout=True)
    grid = fig.add_gridspec(1 + n_label_rows, 4)

    ax = fig.add_subplot(grid[0, 0])
    im = ax.imshow(report.share, cmap="viridis", aspect="auto", vmin=0.0)
    ax.set(title=f"load: share of routings (balanced {1 / E:.3f})", xlabel="expert", ylabel="layer")
    fig.colorbar(im, ax=ax)

    ax = fig.add_subplot(grid[0, 1])
    layers = np.arange(L)
    ax.plot(layers, report.imbalance, marker="o", label="imbalance (max/mean)")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set(title="imbalance per layer", xlabel="layer", ylabel="max/mean")
    ax.legend(loc="upper left", fontsize=8)

    ax = fig.add_subplot(grid[0, 2])
    log_e = math.log(E)
    ax.plot(layers, report.token_entropy / log_e, marker="o", label="router entropy per token")
    ax.plot(layers, report.load_entropy / log_e, marker="s", label="entropy of the load")
    ax.set(title="entropy / ln E (1 = uniform)", xlabel="layer", ylim=(0, 1.05))
    ax.legend(loc="lower left", fontsize=8)

    ax = fig.add_subplot(grid[0, 3])
    pairs = report.pairs.sum(0) / max(report.num_tokens * L, 1)  # [E, E] share of (token, layer) routings
    im = ax.imshow(pairs, cmap="magma", vmin=0.0)
    ax.set(title=f"top-{report.top_k} co-occurrence (all layers)", xlabel="expert", ylabel="expert")
    fig.colorbar(im, ax=ax, label="share of token-layers")

    for n, label in enumerate(labels):
        ax = fig.add_subplot(grid[1 + n // 4, n % 4])
        lift = np.log2(np.nan_to_num(report.lift(label), nan=1.0).clip(1 / 16, 16))  # [L, E]
        bound = max(0.5, float(np.abs(lift).max()))
        im = ax.imshow(lift, cmap="RdBu_r", aspect="auto", vmin=-bound, vmax=bound)
        ax.set(title=f"label {label!r}: log2 lift ({report.label_tokens[label]} tokens)", xlabel="expert",
               ylabel="layer")
        fig.colorbar(im, ax=ax)
    fig.suptitle(title or f"routing of {report.num_prompts} prompts, {report.num_tokens} tokens")
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
