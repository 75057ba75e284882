"""Tiny quantized Mixtral checkpoints in each published layout, and the float model they stand for.

``write_quantized(folder, fmt, seed)`` writes config.json (with its ``quantization_config``) and
model.safetensors: every linear the format quantizes is made by the format's own library or its documented
packing (the phase-1 test helpers), every other tensor float. It returns the fp32 weights each tensor holds,
by HF name, computed by the format's library or an independent reference dequantization: ``float_model``
builds the model those weights make, which the loaded quantized model is held to.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from int_testing import gptq_reference, pack_bits_int32
from safetensors.torch import save_file
from test_awq import _awq_module, awq_reference
from test_ct_packed import _compress as ct_int_compress
from test_fp8_formats import _compress as ct_fp8_compress
from test_fp8_formats import _lib
from test_gptq import _act_order_g_idx

from mixtral.checkpoint.hf import hf_specs
from mixtral.checkpoint.specs import TensorSpec
from mixtral.model.args import ModelArgs
from mixtral.model.config_formats import args_to_hf_config
from mixtral.model.mixtral import Transformer

# dim / hidden / q_size 128: every group size the formats use (32, 64, 128) divides every input width.
ARGS = ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=128, vocab_size=256,
                 num_experts=4, num_experts_per_tok=2, max_seq_len=256)
# (the module's tensors by suffix, its fp32 weight [out, in] as the library dequantizes it)
Made = tuple[dict[str, torch.Tensor], torch.Tensor]


def _module(spec: TensorSpec) -> str:
    return spec.name.removesuffix(".weight")


def _quantized(spec: TensorSpec) -> bool:
    """The block linears (attention and experts): what every format here quantizes."""
    return spec.name.endswith(("_proj.weight", ".w1.weight", ".w2.weight", ".w3.weight"))


def _float_weight(spec: TensorSpec, gen: torch.Generator) -> torch.Tensor:
    if spec.name.endswith("norm.weight"):
        return 1 + 0.1 * torch.randn(spec.shape, generator=gen)
    return torch.randn(spec.shape, generator=gen) * 0.08


def _group_key(spec: TensorSpec) -> str:
    """Pieces of one fused weight share GPTQ's g_idx: q/k/v of a layer; w1/w3 of an expert."""
    m = _module(spec)
    if ".self_attn." in m and not m.endswith("o_proj"):
        return m.rsplit(".", 1)[0] + ".qkv"
    if m.endswith((".w1", ".w3")):
        return m.rsplit(".", 1)[0] + ".w13"
    return m


# ----------------------------------------------------------------------------- the formats
def _ct_fp8(preset: str) -> tuple[dict, Callable[[TensorSpec, torch.Tensor, int], Made]]:
    scheme = _lib().preset_name_to_scheme(preset, ["Linear"])

    def make(spec: TensorSpec, w: torch.Tensor, i: int) -> Made:
        w = w.to(torch.bfloat16)
        t = ct_fp8_compress(w, scheme, 0.03 + 0.01 * (i % 5))  # static: a calibrated scale never saturates
        return t, _lib().COMPRESSOR.decompress(dict(t), scheme)["weight"]

    block = {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
             "config_groups": {"group_0": scheme.model_dump()}, "ignore": ["lm_head", "re:.*block_sparse_moe.gate"]}
    return json.loads(json.dumps(block, default=str)), make


def _autofp8() -> tuple[dict, Callable[[TensorSpec, torch.Tensor, int], Made]]:
    """AutoFP8's layout: per-tensor scale [] and static input scale [] (scales written from its docs)."""
    def make(spec: TensorSpec, w: torch.Tensor, i: int) -> Made:
        scale = w.abs().max() / 448
        codes = (w / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
        t = {"weight": codes, "weight_scale": scale.reshape(()), "input_scale": torch.tensor(0.03 + 0.01 * (i % 3))}
        return t, codes.float() * scale

    # AutoFP8 lists every layer it left in bf16 (the routers, as its Mixtral example does, and the lm_head)
    gates = [f"model.layers.{i}.block_sparse_moe.gate" for i in range(ARGS.n_layers)]
    return {"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head", *gates]}, make


def _ct_int(bits: int, group: int, symmetric: bool) -> tuple[dict, Callable[[TensorSpec, torch.Tensor, int], Made]]:
    from test_ct_packed import _ct

    compressor = _ct().Packed if bits == 4 else _ct().Int
    fmt = "pack-quantized" if bits == 4 else "int-quantized"
    holder: dict = {}

    def make(spec: TensorSpec, w: torch.Tensor, i: int) -> Made:
        t, scheme = ct_int_compress(w.to(torch.bfloat16), bits, group, symmetric, compressor)
        holder["scheme"] = scheme
        # the library's dequantization with its scales in fp32: (q - z) * s exactly (in bf16 it would round it)
        return t, compressor.decompress(dict(t, weight_scale=t["weight_scale"].float()), scheme)["weight"]

    strategy = {"num_bits": bits, "type": "int", "symmetric": symmetric,
                "strategy": "group" if group else "channel", "group_size": group or None}
    block = {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
             "config_groups": {"group_0": {"targets": ["Linear"], "weights": strategy}},
             "ignore": ["lm_head", "re:.*block_sparse_moe.gate"]}
    return block, make


def _awq(group: int) -> tuple[dict, Callable[[TensorSpec, torch.Tensor, int], Made]]:
    def make(spec: TensorSpec, w: torch.Tensor, i: int) -> Made:
        out_f, in_f = spec.shape
        t = _awq_module(out_f, in_f, group, i)
        return t, awq_reference(t["qweight"], t["qzeros"], t["scales"].float(), group)  # fp32: exact products

    return {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"}, make


def _gptq(bits: int, group: int, act_order: bool, sym: bool, v1: bool
          ) -> tuple[dict, Callable[[TensorSpec, torch.Tensor, int], Made]]:
    shared: dict[str, torch.Tensor] = {}

    def make(spec: TensorSpec, w: torch.Tensor, i: int) -> Made:
        out_f, in_f = spec.shape
        gen = torch.Generator().manual_seed(i)
        groups = in_f // group if group else 1
        g_idx = None
        if act_order:
            key = _group_key(spec)
            if key not in shared:
                shared[key] = _act_order_g_idx(in_f, group, len(shared))
            g_idx = shared[key]
        elif group:
            g_idx = (torch.arange(in_f) // group).to(torch.int32)
        else:
            g_idx = torch.zeros(in_f, dtype=torch.int32)
        q = torch.randint(0, 1 << bits, (in_f, out_f), generator=gen)
        mid = 1 << (bits - 1)
        z = torch.full((groups, out_f), mid) if sym else torch.randint(0, 1 << bits, (groups, out_f), generator=gen)
        stored_z = (z - 1) & ((1 << bits) - 1) if v1 else z
        t = {"qweight": pack_bits_int32(q, bits, 0), "qzeros": pack_bits_int32(stored_z, bits, 1),
             "scales": (torch.rand(groups, out_f, generator=gen) * 0.01 + 1e-3).half(), "g_idx": g_idx}
        return t, gptq_reference(t["qweight"], t["qzeros"], t["scales"].float(), t["g_idx"], bits, v1)  # exact

    block = {"quant_method": "gptq", "bits": bits, "group_size": group or -1, "desc_act": act_order, "sym": sym,
             "checkpoint_format": "gptq" if v1 else "gptq_v2"}
    return block, make


FORMATS: dict[str, Callable[[], tuple[dict, Callable[[TensorSpec, torch.Tensor, int], Made]]]] = {
    "ct-fp8-tensor-static": lambda: _ct_fp8("FP8"),
    "ct-fp8-channel-dynamic": lambda: _ct_fp8("FP8_DYNAMIC"),
    "autofp8-static": _autofp8,
    "ct-w4a16-pack-g128": lambda: _ct_int(4, 128, True),
    "ct-w4a16-pack-asym-g32": lambda: _ct_int(4, 32, False),
    "ct-w8a16-int-channel": lambda: _ct_int(8, 0, True),
    "awq-g64": lambda: _awq(64),
    "gptq-4bit-act-order-g32": lambda: _gptq(4, 32, True, False, True),
    "gptq-8bit-g64-sym": lambda: _gptq(8, 64, False, True, False),
}


def write_quantized(folder: Path, fmt: str, seed: int = 0, args: ModelArgs = ARGS) -> dict[str, torch.Tensor]:
    """A tiny checkpoint of format ``fmt`` (FORMATS' keys) in ``folder``; returns the fp32 weight of every tensor
    (HF names) as the format's reference dequantization gives it with its scales in fp32, where every product
    (q - z) * s is exact (in the scales' own bf16 / fp16 the library would round each weight once more)."""
    block, make = FORMATS[fmt]()
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    expected: dict[str, torch.Tensor] = {}
    for i, spec in enumerate(hf_specs(args)):
        w = _float_weight(spec, gen)
        if _quantized(spec):
            t, deq = make(spec, w, i)
            tensors.update({f"{_module(spec)}.{k}": v.contiguous().clone() for k, v in t.items()})
            expected[spec.name] = deq
        else:
            tensors[spec.name] = w.to(torch.bfloat16)
            expected[spec.name] = w.to(torch.bfloat16).float()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    config = args_to_hf_config(args)
    config["quantization_config"] = block
    (folder / "config.json").write_text(json.dumps(config))
    return expected


def float_model(args: ModelArgs, expected: dict[str, torch.Tensor], specs: list[TensorSpec] | None = None,
                internal: bool = False) -> Transformer:
    """The fp32 model whose every weight is ``expected`` (by checkpoint name; ``internal``: already in the
    internal layout, as gguf_testing returns it)."""
    model = Transformer(args)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for spec in specs if specs is not None else hf_specs(args):
            w = expected[spec.name].float()
            spec.select(params[spec.param]).copy_(w if internal else spec.to_internal(w))
    return model.eval()
