"""Training: load-balancing and z losses, LoRA, packed data, the trainer (``mixtral train``).

``from mixtral.train import train, TrainConfig, merge_lora_into`` (imported lazily: importing the package
costs nothing until one is used).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "train": "mixtral.train.trainer",
    "Trainer": "mixtral.train.trainer",
    "TrainResult": "mixtral.train.trainer",
    "TrainConfig": "mixtral.train.config",
    "LoRAConfig": "mixtral.train.lora",
    "add_lora": "mixtral.train.lora",
    "merge_lora": "mixtral.train.lora",
    "merge_lora_into": "mixtral.train.lora",
    "save_lora": "mixtral.train.lora",
    "load_balancing_loss": "mixtral.train.losses",
    "router_z_loss": "mixtral.train.losses",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mixtral.train' has no attribute {name!r}")
