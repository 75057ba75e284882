"""A LoRA adapter that changes the model, for the CLI and serve tests (a plain module at the top of tests/, which
the root conftest puts on ``sys.path``; fixtures are in the conftest files).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mixtral.model.mixtral import Transformer
from mixtral.train.lora import LoRAConfig, add_lora, lora_state_dict, save_lora


def save_nonzero_adapter(model: Transformer, folder: Path) -> Path:
    """Add a rank-2 LoRA on wo and w13 to ``model`` with B drawn non-zero (a fresh adapter is a no-op, B = 0),
    and save it the way ``mixtral train`` does; the adapter's folder."""
    add_lora(model, LoRAConfig(rank=2, alpha=4, targets=("wo", "w13")))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in lora_state_dict(model).items():
            if name.endswith("lora_B"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.05)
    return save_lora(model, folder)
