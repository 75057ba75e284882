"""Hugging Face Mixtral checkpoints: tensor names <-> internal pieces, and which files hold them.

On disk (what the Hub's Mixtral repos and transformers' ``save_pretrained`` write): ``config.json`` plus
``model.safetensors``, or shards listed by ``model.safetensors.index.json`` (``weight_map``: name -> file).
Experts are stored one tensor per expert and matrix under the legacy ``block_sparse_moe`` names; transformers
5 fuses them into ``mlp.experts.gate_up_proj`` only in memory. Pickle ``pytorch_model*.bin`` files are listed
here but only read when the caller opts in (see files.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from mixtral.checkpoint.errors import CheckpointError
from mixtral.checkpoint.specs import TensorSpec, moe_specs
from mixtral.model.args import ModelArgs

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"


def hf_specs(args: ModelArgs) -> list[TensorSpec]:
    """Every tensor of an HF Mixtral checkpoint, in internal parameter order (see model/mixtral.py)."""
    d, q, kv, f = args.dim, args.q_size, args.kv_size, args.hidden_dim
    specs = [TensorSpec("model.embed_tokens.weight", (args.vocab_size, d), "tok_embeddings.weight")]
    for i in range(args.n_layers):
        hf, me = f"model.layers.{i}", f"layers.{i}"
        wqkv = f"{me}.attention.wqkv.weight"  # [q + 2kv, D]: q rows, then k, then v
        specs += [
            TensorSpec(f"{hf}.input_layernorm.weight", (d,), f"{me}.attention_norm.weight"),
            TensorSpec(f"{hf}.self_attn.q_proj.weight", (q, d), wqkv, ((0, q),)),
            TensorSpec(f"{hf}.self_attn.k_proj.weight", (kv, d), wqkv, ((q, q + kv),)),
            TensorSpec(f"{hf}.self_attn.v_proj.weight", (kv, d), wqkv, ((q + kv, q + 2 * kv),)),
            TensorSpec(f"{hf}.self_attn.o_proj.weight", (d, q), f"{me}.attention.wo.weight"),
            TensorSpec(f"{hf}.post_attention_layernorm.weight", (d,), f"{me}.ffn_norm.weight"),
        ]
        specs += moe_specs(f"{hf}.block_sparse_moe.experts", f"{hf}.block_sparse_moe.gate.weight", i,
                           args.num_experts, d, f)
    specs.append(TensorSpec("model.norm.weight", (d,), "norm.weight"))
    specs.append(TensorSpec("lm_head.weight", (args.vocab_size, d), "output.weight"))
    return specs


def has_hf_weights(folder: Path) -> bool:
    """Whether ``folder`` holds or names HF weights, without checking them: an index counts even while its
    shards are still missing (a Hub snapshot holds the index before the weights are downloaded)."""
    if any((folder / name).is_file() for name in (SAFETENSORS_INDEX, SAFETENSORS, PICKLE_INDEX, PICKLE)):
        return True
    return any(True for pattern in ("model-*.safetensors", "pytorch_model-*.bin") for _ in folder.glob(pattern))


def hf_weight_files(folder: Path) -> tuple[list[Path], dict[str, str] | None, Path | None]:
    """The weight files of an HF folder: (files, weight_map or None, index file or None).

    Prefers safetensors; falls back to pickle ``.bin`` files (the caller decides whether to read them).
    A shard the index names but the folder lacks is an error naming the shard, a tensor it holds and the index.
    """
    for index_name, single in ((SAFETENSORS_INDEX, SAFETENSORS), (PICKLE_INDEX, PICKLE)):
        index = folder / index_name
        if index.is_file():
            weight_map = read_weight_map(index)
            files = []
            for shard in dict.fromkeys(weight_map.values()):
                path = folder / shard
                if not path.is_file():
                    tensor = next(n for n, s in weight_map.items() if s == shard)
                    raise CheckpointError(
                        f"{index} maps tensor {tensor!r} (and others) to shard {shard!r}, which is missing "
                        f"from {folder}; re-download the checkpoint"
                    )
                files.append(path)
            return files, weight_map, index
        if (folder / single).is_file():
            return [folder / single], None, None
    shards = sorted(folder.glob("model-*.safetensors")) or sorted(folder.glob("pytorch_model-*.bin"))
    return shards, None, None


def read_weight_map(index: Path) -> dict[str, str]:
    """``weight_map`` of a ``*.index.json``, checked to be a name -> file-name mapping."""
    try:
        data = json.loads(index.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read the shard index {index}: {exc}") from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(f"{index} has no 'weight_map' object mapping tensor names to shard files")
    for name, shard in weight_map.items():
        if "/" in shard or "\\" in shard or shard.startswith("."):
            raise CheckpointError(f"{index} maps tensor {name!r} to {shard!r}, which is not a file in the folder")
    return weight_map
