"""FP8 checkpoints (compressed-tensors ``float-quantized``, AutoFP8) <-> the ``fp8`` method's canonical tensors.

On disk, per quantized linear ``{module}`` (HF names, e.g. ``model.layers.0.self_attn.q_proj``):
``{module}.weight`` F8_E4M3 [out, in]; ``{module}.weight_scale`` fp32/bf16, one per tensor ([1], or [] in
AutoFP8 files) or one per output channel ([out, 1]); with static activations ``{module}.input_scale`` ([1] or
[]). KV-cache scales, where the config announces them: ``{layer}.self_attn.k_scale`` / ``v_scale``
(compressed-tensors) or ``{layer}.self_attn.k_proj.output_scale`` / ``v_proj.output_scale`` (AutoFP8).

Canonical (quant/fp8.py), per model parameter: ``weight`` fp8 [*lead, out, in], ``weight_scale`` fp32
[*lead, out], ``input_scale`` fp32 [*lead]. A checkpoint piece (checkpoint/specs.py: q/k/v rows of wqkv,
w1/w3 rows of an expert's w13, an expert's w2) fills its rows: a per-tensor scale is broadcast to each of
its rows exactly (dequantization is unchanged: every row's codes were made with that one scale), so w1 and w3
of one expert, and q, k and v, keep their own scales. Input scales of pieces that share a parameter
(q/k/v; w1/w3) are merged by maximum (vLLM's rule; see quant/fp8.py).

Writing (``mixtral convert --quantization fp8``): compressed-tensors ``float-quantized`` with the channel
strategy and dynamic per-token activations (the FP8_DYNAMIC scheme), ``ignore`` = lm_head and the router gates
as RedHatAI's Mixtral FP8 checkpoints have it; ``quantization_config_block`` is the config.json entry.

Not here: which modules a config quantizes (quant_config.py), the streaming reader and writer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from mixtral.checkpoint.errors import CheckpointError
from mixtral.checkpoint.specs import TensorSpec
from mixtral.quant.base import QuantSpec, QuantTensors
from mixtral.quant.fp8 import FP8

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# What convert writes: RedHatAI/Mixtral-8x7B-Instruct-v0.1-FP8's ignore list (the bf16 lm_head and routers).
WRITE_IGNORE = ("lm_head", "re:.*block_sparse_moe.gate")


@dataclass(frozen=True)
class Fp8Entry:
    """One on-disk tensor of a quantized piece: its name, the canonical tensor it fills, and the shapes
    accepted for it."""

    name: str
    stored: str  # "weight", "weight_scale" or "input_scale"
    shapes: tuple[tuple[int, ...], ...]

    def dtype_ok(self, dtype: torch.dtype) -> bool:
        return dtype == FP8 if self.stored == "weight" else dtype in FLOAT_DTYPES


def module_name(spec: TensorSpec) -> str:
    """``model.layers.0.self_attn.q_proj.weight`` -> ``model.layers.0.self_attn.q_proj``."""
    if not spec.name.endswith(".weight"):
        raise ValueError(f"{spec.name!r} is not a linear weight")
    return spec.name.removesuffix(".weight")


def fp8_entries(spec: TensorSpec, qspec: QuantSpec) -> list[Fp8Entry]:
    """The on-disk tensors of quantized piece ``spec`` (an HF linear weight spec) under ``qspec``."""
    module = module_name(spec)
    out = spec.shape[0]
    scale_shapes = ((1,), ()) if qspec.weight_per_tensor else ((out, 1), (out,))
    entries = [Fp8Entry(spec.name, "weight", (spec.shape,)), Fp8Entry(f"{module}.weight_scale", "weight_scale",
                                                                        scale_shapes)]
    if qspec.static_input_scale:
        entries.append(Fp8Entry(f"{module}.input_scale", "input_scale", ((1,), ())))
    return entries


def check_entries(spec: TensorSpec, qspec: QuantSpec, info: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]
                  ) -> list[str]:
    """Problems (missing, mis-shaped, wrong dtype) of one quantized piece's tensors, from the headers alone
    (``info``: name -> (dtype, shape)), so a bad checkpoint fails before anything is allocated."""
    problems = []
    for entry in fp8_entries(spec, qspec):
        if entry.name not in info:
            problems.append(f"tensor {entry.name!r} is missing (the quantization config says {module_name(spec)} "
                            f"is {qspec.source} FP8)")
            continue
        dtype, shape = info[entry.name]
        if not entry.dtype_ok(dtype):
            want = "float8_e4m3fn (F8_E4M3)" if entry.stored == "weight" else "a float type"
            problems.append(f"tensor {entry.name!r} has dtype {dtype}, expected {want}")
        elif tuple(shape) not in entry.shapes:
            problems.append(f"tensor {entry.name!r} has shape {list(shape)}, expected "
                            f"{' or '.join(str(list(s)) for s in entry.shapes)}")
    return problems


def _select(spec: TensorSpec, t: torch.Tensor, lead_only: bool) -> torch.Tensor:
    """The view of canonical tensor ``t`` that piece ``spec`` fills; ``lead_only`` keeps only its expert
    index (for ``input_scale`` [*lead], which has no row axis)."""
    if not lead_only:
        return spec.select(t)
    idx = tuple(i for i in spec.index if isinstance(i, int))
    return t[idx] if idx else t


def load_piece(spec: TensorSpec, qspec: QuantSpec, read: Callable[[str], torch.Tensor], dest: QuantTensors) -> None:
    """Read quantized piece ``spec`` through ``read(name)`` into its rows of the canonical tensors ``dest``
    (``weight`` [*lead, out, in] fp8, ``weight_scale`` [*lead, out] fp32, ``input_scale`` [*lead] fp32,
    which must start at 0 before the first piece so that the maximum merge works)."""
    for entry in fp8_entries(spec, qspec):
        t = read(entry.name)
        if entry.stored == "weight":
            _select(spec, dest["weight"], False).copy_(t)
        elif entry.stored == "weight_scale":
            rows = _select(spec, dest["weight_scale"], False)  # [out]
            rows.copy_(t.float().reshape(-1).expand(rows.shape[0]) if t.numel() == 1 else t.float().reshape(-1))
        else:
            target = _select(spec, dest["input_scale"], True)
            target.copy_(torch.maximum(target, t.float().reshape(target.shape)))


def dequantize_piece(spec: TensorSpec, qspec: QuantSpec, read: Callable[[str], torch.Tensor],
                     dtype: torch.dtype) -> torch.Tensor:
    """A quantized piece the model keeps unquantized (a quantized router gate or lm_head) -> [out, in] in
    ``dtype``: codes times their scale."""
    weight, scale = read(spec.name), read(f"{module_name(spec)}.weight_scale").float()
    scale = scale.reshape(-1, 1) if scale.numel() > 1 else scale.reshape(1, 1)
    return (weight.float() * scale).to(dtype)


def empty_canonical(lead: tuple[int, ...], out: int, inp: int, static: bool,
                    device: torch.device | str = "cpu") -> QuantTensors:
    """Canonical tensors for one parameter, ready for ``load_piece`` (input scales zeroed for the max merge)."""
    t = {"weight": torch.empty(*lead, out, inp, dtype=FP8, device=device),
         "weight_scale": torch.empty(*lead, out, dtype=torch.float32, device=device)}
    if static:
        t["input_scale"] = torch.zeros(lead, dtype=torch.float32, device=device)
    return t


def kv_scale_names(layer: int, qspec: QuantSpec) -> tuple[str, str]:
    """The (k, v) KV-cache scale tensors of HF layer ``layer`` in a checkpoint whose config announces them."""
    attn = f"model.layers.{layer}.self_attn"
    if qspec.source == "autofp8":
        return f"{attn}.k_proj.output_scale", f"{attn}.v_proj.output_scale"
    if qspec.source == "compressed-tensors":
        return f"{attn}.k_scale", f"{attn}.v_scale"
    raise CheckpointError(f"{qspec.source} checkpoints carry no KV-cache scales")


# --------------------------------------------------------------------------- writing
def write_entries(spec: TensorSpec) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """What ``mixtral convert --quantization fp8`` writes for linear piece ``spec``: (name, shape, dtype) of
    the codes and the per-channel scale ([out, 1] fp32, compressed-tensors' channel strategy)."""
    module = module_name(spec)
    return [(spec.name, spec.shape, FP8), (f"{module}.weight_scale", (spec.shape[0], 1), torch.float32)]


def piece_tensors(spec: TensorSpec, canonical: QuantTensors) -> dict[str, torch.Tensor]:
    """The on-disk tensors of piece ``spec`` from its parameter's canonical tensors (``write_entries`` order)."""
    module = module_name(spec)
    return {spec.name: spec.select(canonical["weight"]).contiguous(),
            f"{module}.weight_scale": spec.select(canonical["weight_scale"]).float().reshape(-1, 1).contiguous()}


def quantization_config_block(ignore: tuple[str, ...] = WRITE_IGNORE) -> dict[str, object]:
    """config.json's ``quantization_config`` for what ``piece_tensors`` writes: compressed-tensors
    float-quantized, FP8 weights per channel, FP8 activations per token (dynamic)."""
    fp8 = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "block_structure": None,
           "actorder": None, "observer": None, "observer_kwargs": {}}
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "kv_cache_scheme": None,
        "ignore": list(ignore),
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {**fp8, "strategy": "channel", "dynamic": False, "observer": "minmax"},
            "input_activations": {**fp8, "strategy": "token", "dynamic": True},
            "output_activations": None,
            "format": "float-quantized",
        }},
    }
