"""LoRA adapters for Mixtral: attention (``wqkv``, ``wo``) and every expert's projections (``w13``, ``w2``).

An adapter adds ``scale * B @ A`` to a frozen weight, with ``scale = alpha / r``:
- attention Linear weight W [out, in]: A [r, in], B [out, r];
- stacked expert weights W [E, out, in] (``w13`` [E, 2F, D], ``w2`` [E, D, F]): one low-rank delta per
  expert, A [E, r, in], B [E, out, r], so delta = bmm(B, A) [E, out, in].
Adapters are attached as ``torch.nn.utils.parametrize`` parametrizations: the model's forward is
unchanged and sees W + delta, ``merge_lora`` bakes the delta in, and the saved file holds only A and B.

Cost: the parametrization materialises W + delta for the whole stacked expert tensor at each forward, i.e.
one extra copy of a layer's expert weights at a time (with gradient checkpointing, again in backward).
That keeps every experts path (the reference, the grouped PyTorch path, the Triton kernels) usable unchanged.

On disk (a folder): ``adapter_model.safetensors`` (``<param path>.lora_A`` / ``.lora_B``, e.g.
``layers.0.feed_forward.w13.lora_A``) and ``adapter_config.json`` (rank, alpha, targets).
This module does not train; see trainer.py.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize

from mixtral.model.mixtral import Transformer

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# Target name -> (module path inside a block, parameter name).
TARGETS: dict[str, tuple[str, str]] = {
    "wqkv": ("attention.wqkv", "weight"),
    "wo": ("attention.wo", "weight"),
    "w13": ("feed_forward", "w13"),
    "w2": ("feed_forward", "w2"),
}


@dataclass(frozen=True)
class LoRAConfig:
    """Rank, scaling and which projections get adapters."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("wqkv", "wo", "w13", "w2")

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown or not self.targets:
            raise ValueError(f"unknown LoRA target(s) {unknown or self.targets}; choose from {sorted(TARGETS)}")
        object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRADelta(nn.Module):
    """Parametrization W -> W + scale * B @ A for a [out, in] or stacked [E, out, in] weight."""

    def __init__(self, weight: torch.Tensor, rank: int, scale: float) -> None:
        super().__init__()
        *lead, out_f, in_f = weight.shape  # lead = [] or [E]
        self.scale = scale
        # A random, B zero: the adapter starts as the identity map, as in the LoRA paper.
        a = torch.empty(*lead, rank, in_f, device=weight.device, dtype=torch.float32)
        nn.init.kaiming_uniform_(a.view(-1, in_f), a=math.sqrt(5))
        self.lora_A = nn.Parameter(a)  # [(E,) r, in]
        self.lora_B = nn.Parameter(torch.zeros(*lead, out_f, rank, device=weight.device))  # [(E,) out, r]

    def delta(self) -> torch.Tensor:
        return torch.matmul(self.lora_B, self.lora_A) * self.scale  # [(E,) out, in] fp32

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta().to(weight.dtype)


def _target_modules(model: Transformer, targets: tuple[str, ...]) -> list[tuple[str, nn.Module, str]]:
    """(adapter name prefix, owning module, parameter name) for every adapted weight, layer by layer.

    The prefix names the weight without a trailing ``.weight``: ``layers.0.attention.wqkv``,
    ``layers.0.feed_forward.w13``.
    """
    found = []
    for i, layer in enumerate(model.layers):
        for t in targets:
            module_path, pname = TARGETS[t]
            module = layer.get_submodule(module_path)
            prefix = f"layers.{i}.{module_path}" + ("" if pname == "weight" else f".{pname}")
            found.append((prefix, module, pname))
    return found


def add_lora(model: Transformer, config: LoRAConfig) -> list[nn.Parameter]:
    """Freeze every base weight, attach adapters, return the trainable adapter parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    params: list[nn.Parameter] = []
    for _, module, pname in _target_modules(model, config.targets):
        if parametrize.is_parametrized(module, pname):
            raise ValueError(f"{type(module).__name__}.{pname} already has a LoRA adapter")
        delta = LoRADelta(getattr(module, pname), config.rank, config.scale)
        parametrize.register_parametrization(module, pname, delta, unsafe=True)
        params += [delta.lora_A, delta.lora_B]
    model.lora_config = config  # type: ignore[attr-defined]
    return params


def lora_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The adapters' A and B tensors by name (``layers.0.attention.wqkv.lora_A`` ...)."""
    config: LoRAConfig | None = getattr(model, "lora_config", None)
    if config is None:
        raise ValueError("this model has no LoRA adapters; call add_lora first")
    out = {}
    for prefix, module, pname in _target_modules(model, config.targets):
        delta = module.parametrizations[pname][0]
        out[f"{prefix}.lora_A"] = delta.lora_A.detach().contiguous()
        out[f"{prefix}.lora_B"] = delta.lora_B.detach().contiguous()
    return out


def load_lora_state_dict(model: Transformer, tensors: dict[str, torch.Tensor]) -> None:
    """Copy saved A/B tensors into a model that already has adapters (resume)."""
    own = lora_state_dict(model)
    if set(own) != set(tensors):
        raise ValueError(f"adapter names differ: missing {sorted(set(own) - set(tensors))[:4]}, "
                         f"unexpected {sorted(set(tensors) - set(own))[:4]}")
    config: LoRAConfig = model.lora_config  # type: ignore[attr-defined]
    with torch.no_grad():
        for prefix, module, pname in _target_modules(model, config.targets):
            delta = module.parametrizations[pname][0]
            delta.lora_A.copy_(tensors[f"{prefix}.lora_A"])
            delta.lora_B.copy_(tensors[f"{prefix}.lora_B"])


def save_lora(model: Transformer, folder: str | Path) -> Path:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config: LoRAConfig = model.lora_config  # type: ignore[attr-defined]
    save_file({k: v.float().cpu() for k, v in lora_state_dict(model).items()}, str(folder / ADAPTER_WEIGHTS))
    meta = {**asdict(config), "targets": list(config.targets), "format": "mixtral-lora",
            "base_model": base_model_shape(model)}
    (folder / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def merge_lora(model: Transformer) -> None:
    """Bake attached adapters into the base weights and remove them (the model becomes a plain Transformer)."""
    config: LoRAConfig | None = getattr(model, "lora_config", None)
    if config is None:
        return
    for _, module, pname in _target_modules(model, config.targets):
        parametrize.remove_parametrizations(module, pname, leave_parametrized=True)
    del model.lora_config


# The base model's shape an adapter records (and is checked against when merged).
_SHAPE_FIELDS = ("dim", "n_layers", "hidden_dim", "n_heads", "n_kv_heads", "head_dim", "num_experts")


def base_model_shape(model: Transformer) -> dict[str, int]:
    return {name: int(getattr(model.args, name)) for name in _SHAPE_FIELDS}


def _has_adapter(folder: Path) -> bool:
    return (folder / ADAPTER_WEIGHTS).is_file() and (folder / ADAPTER_CONFIG).is_file()


def find_adapter(path: str | Path) -> Path:
    """The adapter folder ``path`` names: an adapter folder itself (or its .safetensors file), or a training run's
    output folder (``mixtral train --lora-rank R --output-dir RUN``): its final ``adapter/``, else its latest
    ``checkpoint-NNNNNN/``. FileNotFoundError saying what was looked for."""
    path = Path(path).expanduser()
    folder = path.parent if path.is_file() else path
    if _has_adapter(folder):
        return folder
    if not folder.is_dir():
        raise FileNotFoundError(f"LoRA adapter {path} does not exist; pass the output folder of `mixtral train "
                                f"--lora-rank R --output-dir RUN` (or its adapter/ folder)")
    if _has_adapter(folder / "adapter"):
        return folder / "adapter"
    checkpoints = sorted(p for p in folder.glob("checkpoint-*") if _has_adapter(p))
    if checkpoints:
        return checkpoints[-1]
    raise FileNotFoundError(
        f"no LoRA adapter in {folder}: expected {ADAPTER_WEIGHTS} + {ADAPTER_CONFIG} there, in {folder / 'adapter'} "
        f"(a finished `mixtral train --lora-rank R` run) or in a checkpoint-NNNNNN/ folder; it holds "
        f"{sorted(p.name for p in folder.iterdir())[:10]}")


def read_lora(path: str | Path) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """Load an adapter (folder, its .safetensors file, or a training run's folder) -> (config, tensors)."""
    config, _, tensors = _read_lora(find_adapter(path))
    return config, tensors


def _read_lora(folder: Path) -> tuple[LoRAConfig, dict[str, Any], dict[str, torch.Tensor]]:
    meta = json.loads((folder / ADAPTER_CONFIG).read_text())
    config = LoRAConfig(rank=int(meta["rank"]), alpha=float(meta["alpha"]), targets=tuple(meta["targets"]))
    return config, meta, load_file(str(folder / ADAPTER_WEIGHTS))


def _describe(shape: dict[str, Any]) -> str:
    return ", ".join(f"{k} {shape[k]}" for k in _SHAPE_FIELDS if k in shape)


def merge_lora_into(model: Transformer, path: str | Path) -> LoRAConfig:
    """Add a saved adapter's deltas to a loaded model's weights in place (``mixtral serve --lora PATH``).

    ``path``: an adapter folder or a training run's output folder (see ``find_adapter``). Works on any plain model
    (no adapters attached); the delta is computed in fp32 and cast to the weight's dtype. An adapter trained on
    another base model fails with a ValueError naming both models' shapes, before any weight is changed.
    """
    folder = find_adapter(path)
    config, meta, tensors = _read_lora(folder)
    ours = base_model_shape(model)
    theirs = meta.get("base_model") or {}
    if any(k in theirs and int(theirs[k]) != ours[k] for k in _SHAPE_FIELDS):
        raise ValueError(f"the LoRA adapter in {folder} was trained on a base model of shape ({_describe(theirs)}), "
                         f"but the model being served has shape ({_describe(ours)}); use the base model the adapter "
                         f"was trained on")
    targets = _target_modules(model, config.targets)
    for prefix, module, pname in targets:  # all checked first: a mismatch never leaves the model half-merged
        try:
            a, b = tensors[f"{prefix}.lora_A"], tensors[f"{prefix}.lora_B"]
        except KeyError:
            raise ValueError(f"adapter in {folder} has no tensors for {prefix}: it was trained on another base model "
                             f"({_describe(theirs) or 'shape not recorded'}; this one: {_describe(ours)}) or for "
                             f"other targets ({list(config.targets)})") from None
        weight = getattr(module, pname)
        delta_shape = (*b.shape[:-1], a.shape[-1])  # B @ A: [(E,) out, r] @ [(E,) r, in]
        if tuple(delta_shape) != tuple(weight.shape) or b.shape[-1] != a.shape[-2]:
            raise ValueError(f"adapter delta for {prefix} has shape {tuple(delta_shape)}, the model's weight is "
                             f"{tuple(weight.shape)}: the adapter in {folder} was trained on another base model "
                             f"({_describe(theirs) or 'shape not recorded'}; this one: {_describe(ours)})")
    with torch.no_grad():
        for prefix, module, pname in targets:
            a, b = tensors[f"{prefix}.lora_A"], tensors[f"{prefix}.lora_B"]
            weight = getattr(module, pname)
            delta = torch.matmul(b.float().to(weight.device), a.float().to(weight.device)) * config.scale
            weight.add_(delta.to(weight.dtype))
    return config
