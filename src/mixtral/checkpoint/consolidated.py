"""Mistral consolidated checkpoints: tensor names <-> internal pieces, and which files hold them.

On disk: ``params.json`` plus ``consolidated.safetensors`` (or several ``consolidated*.safetensors``;
old releases: pickle ``consolidated.0X.pth``, read only on opt-in). wq/wk rows interleave each head's RoPE
pairs (2i, 2i+1), while the internal layout is HF's rotate_half (i, i + hd/2): the specs of wq/wk carry the
head count so the loader permutes their rows (specs.py). All other tensors are stored as the model holds them.
"""

from __future__ import annotations

from pathlib import Path

from mixtral.checkpoint.specs import TensorSpec, moe_specs
from mixtral.model.args import ModelArgs

PARAMS = "params.json"
SAFETENSORS = "consolidated.safetensors"


def consolidated_specs(args: ModelArgs) -> list[TensorSpec]:
    """Every tensor of a consolidated Mixtral checkpoint, in internal parameter order."""
    d, q, kv, f = args.dim, args.q_size, args.kv_size, args.hidden_dim
    specs = [TensorSpec("tok_embeddings.weight", (args.vocab_size, d), "tok_embeddings.weight")]
    for i in range(args.n_layers):
        me = f"layers.{i}"
        wqkv = f"{me}.attention.wqkv.weight"  # [q + 2kv, D]: q rows, then k, then v
        specs += [
            TensorSpec(f"{me}.attention_norm.weight", (d,), f"{me}.attention_norm.weight"),
            TensorSpec(f"{me}.attention.wq.weight", (q, d), wqkv, ((0, q),), rope_heads=args.n_heads),
            TensorSpec(f"{me}.attention.wk.weight", (kv, d), wqkv, ((q, q + kv),), rope_heads=args.n_kv_heads),
            TensorSpec(f"{me}.attention.wv.weight", (kv, d), wqkv, ((q + kv, q + 2 * kv),)),
            TensorSpec(f"{me}.attention.wo.weight", (d, q), f"{me}.attention.wo.weight"),
            TensorSpec(f"{me}.ffn_norm.weight", (d,), f"{me}.ffn_norm.weight"),
        ]
        specs += moe_specs(f"{me}.feed_forward.experts", f"{me}.feed_forward.gate.weight", i, args.num_experts, d, f)
    specs.append(TensorSpec("norm.weight", (d,), "norm.weight"))
    specs.append(TensorSpec("output.weight", (args.vocab_size, d), "output.weight"))
    return specs


def consolidated_weight_files(folder: Path) -> list[Path]:
    """``consolidated*.safetensors`` in name order, else the pickle ``consolidated*.pth``/``.pt`` files."""
    files = sorted(folder.glob("consolidated*.safetensors"))
    if files:
        return files
    return sorted([*folder.glob("consolidated*.pth"), *folder.glob("consolidated*.pt")])
