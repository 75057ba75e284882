"""The expert-utilization heatmap (layer x expert) the trainer writes next to its checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch


def expert_load_heatmap(counts: torch.Tensor, path: str | Path, top_k: int = 2, title: str | None = None) -> Path:
    """counts [L, E] (routing hits) -> PNG heatmap of each layer's share per expert; 1/E everywhere is balanced."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    if counts.dim() != 2:
        raise ValueError(f"expert counts must be [layers, experts], got shape {tuple(counts.shape)}")
    share = (counts.float() / counts.float().sum(dim=1, keepdim=True).clamp_min(1)).cpu().numpy()  # [L, E]
    n_layers, n_experts = share.shape
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n_experts, 1.2 + 0.35 * n_layers))
    im = ax.imshow(share, cmap="viridis", aspect="auto", vmin=0.0)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_xticks(range(n_experts))
    ax.set_yticks(range(n_layers))
    ax.set_title(title or f"expert load (share of top-{top_k} routings; balanced = {1 / n_experts:.3f})")
    if n_layers * n_experts <= 512:
        for i in range(n_layers):
            for j in range(n_experts):
                ax.text(j, i, f"{share[i, j]:.2f}", ha="center", va="center", fontsize=7, color="white")
    fig.colorbar(im, ax=ax, label="share of routings")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
