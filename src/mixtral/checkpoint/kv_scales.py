"""FP8 KV-cache scales a checkpoint carries: one ``k_scale`` and one ``v_scale`` per layer.

Checkpoints made for ``--kv-cache-dtype fp8`` announce them in config.json's ``quantization_config``:
compressed-tensors ``kv_cache_scheme`` (static per-tensor FP8: ``model.layers.{i}.self_attn.k_scale`` /
``v_scale``) or AutoFP8 ``kv_cache_scheme: "static"`` (``...self_attn.k_proj.output_scale`` /
``v_proj.output_scale``); the names are checkpoint/fp8_formats.kv_scale_names. A scale means what the engine's
FP8 cache means by it: a stored code c stands for c * scale.

Only those 2 x n_layers scalars are read (mmap), so this runs before or after the weights are loaded. A
config that announces scales whose tensors are missing, not one element, or not finite and positive raises
CheckpointError naming the tensor. Not here: loading the weights (loader.py) or using the scales
(engine/model_runner.py).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from mixtral.checkpoint.errors import CheckpointError
from mixtral.checkpoint.fp8_formats import kv_scale_names
from mixtral.checkpoint.hf import hf_weight_files
from mixtral.checkpoint.loader import ModelSource, resolve
from mixtral.checkpoint.quant_config import parse_quantization_config, read_quant_config
from mixtral.checkpoint.safetensors_io import SafetensorsReader, read_header
from mixtral.quant.base import QuantSpec

KVScales = tuple[tuple[float, float], ...]


def _kv_spec(source: ModelSource) -> QuantSpec | None:
    """The checkpoint's QuantSpec when it says it carries KV-cache scales, else None."""
    if source.folder is None or source.format != "hf":
        return None
    found = read_quant_config(source.folder)
    if found is None:
        return None
    spec = parse_quantization_config(*found)
    return spec if spec.kv_cache_scales else None


def read_kv_scales(source: ModelSource) -> KVScales | None:
    """Per layer (k_scale, v_scale) from the checkpoint, or None when its config announces none."""
    spec = _kv_spec(source)
    if spec is None or source.folder is None:
        return None
    files, weight_map, _ = hf_weight_files(source.folder)
    safetensors = [f for f in files if f.suffix == ".safetensors"]
    if weight_map is not None:
        located = {name: source.folder / shard for name, shard in weight_map.items()}
    else:
        located = {name: f for f in safetensors for name in read_header(f)}
    reader = SafetensorsReader()
    try:
        scales = []
        for layer in range(source.args.n_layers):
            k_name, v_name = kv_scale_names(layer, spec)
            scales.append((_scalar(reader, located, k_name), _scalar(reader, located, v_name)))
    finally:
        reader.close()
    return tuple(scales)


def checkpoint_kv_scales(model: str | None) -> KVScales | None:
    """``read_kv_scales`` of a model name or folder (None for presets, "demo" and unquantized checkpoints)."""
    from mixtral.defaults import DEFAULT_MODEL

    return read_kv_scales(resolve(model or DEFAULT_MODEL))


def _scalar(reader: SafetensorsReader, located: dict[str, Path], name: str) -> float:
    path = located.get(name)
    if path is None or path.suffix != ".safetensors":
        raise CheckpointError(f"the quantization config announces FP8 KV-cache scales, but tensor {name!r} is "
                              "not in the checkpoint's safetensors files")
    t = reader.get(path, name, torch.device("cpu"))
    if t.numel() != 1 or not t.dtype.is_floating_point:
        raise CheckpointError(f"KV-cache scale {name!r} in {path} must be one float, got {t.dtype} "
                              f"{list(t.shape)}")
    value = float(t.float().item())
    if not math.isfinite(value) or value <= 0:
        raise CheckpointError(f"KV-cache scale {name!r} in {path} is {value}; it must be finite and positive")
    return value
