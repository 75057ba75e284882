"""``mixtral info MODEL``: config, parameter counts, memory per dtype and KV-cache size, without loading weights.

With ``--quantization`` (or a quantized checkpoint, detected from its files): the weight bytes per part as the
loader will allocate them (model/footprint.py), and what that leaves for the KV cache on one 80 GB GPU at
``--gpu-memory-utilization``: bytes, and the longest context (tokens of KV) that fits, with bf16 and FP8 KV; the
same on one 141 GB GPU (an H200).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from mixtral.cli.convert import report_errors
from mixtral.cli.kv_args import add_kv_cache_args
from mixtral.cli.parallel_args import add_parallel_args, parallel_config_from_args
from mixtral.cli.quant_args import add_quantization_arg

# What torch.cuda.mem_get_info reports as the total of an H100 80GB HBM3 (79.2 GiB).
GPU_80GB_BYTES = 85_032_370_176
# The same for an H200 (141 GB): nvidia-smi's 143,771 MiB less the 466 MiB the driver keeps on an H100 (whose
# nvidia-smi total is 81,559 MiB): 143,305 MiB, 139.9 GiB.
GPU_141GB_BYTES = 150_266_183_680

# Bytes per weight of each storage type (int4 ignores its small per-group scales).
WEIGHT_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp8": 1.0, "int4": 0.5}


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "info", help="show a model's config, parameter counts and memory needs",
        description="Print a model's configuration, total and active (per token) parameter counts, the memory "
                    "its weights take in fp32/bf16/fp8/int4, and the KV-cache bytes per token. Reads only the "
                    "config and file headers, never the weights.",
    )
    p.add_argument("model", metavar="MODEL",
                   help="a model folder (Hugging Face or Mistral format), a preset name, 'demo', or a Hugging Face "
                        "repo id (resolved through the local cache; only configs are fetched)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    add_quantization_arg(p)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                   help="the dtype of the weights that stay unquantized and of the activations, for the weight "
                        "bytes per part (default: bf16)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, metavar="F",
                   help="fraction of the 80 GB GPU (an H100's 79.2 GiB) the engine may use, for the KV room and "
                        "the longest context that fits beside the weights (default: 0.9)")
    add_parallel_args(p)  # --tensor-parallel-size N: also what each of the N GPUs holds
    add_kv_cache_args(p)  # --kv-cache-dtype: the KV bytes per token and the tokens that fit an 80 GB GPU
    return p


def count(n: int) -> str:
    return f"{n:,} ({n / 1e9:.2f}B)" if n >= 1e8 else f"{n:,} ({n / 1e6:.2f}M)"


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def memory_plan(source: Any, quantization: str | None, dtype: str, utilization: float) -> dict[str, Any]:
    """Weight bytes per part as a load of ``source`` with ``quantization`` allocates them, and the KV room they
    leave on one 80 GB GPU at ``utilization`` (activations not counted: the engine measures them at start)."""
    from mixtral.checkpoint.loader import parse_dtype
    from mixtral.checkpoint.quant_load import planned_methods, quant_spec_for
    from mixtral.model.footprint import weight_bytes

    if not 0 < utilization <= 1:
        raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {utilization}")
    methods = planned_methods(source, quant_spec_for(source, quantization))
    parts = weight_bytes(source.args, parse_dtype(dtype), methods)
    per_token = {"bf16": source.args.kv_bytes_per_token(2), "fp8": source.args.kv_bytes_per_token(1)}

    def on(gpu_bytes: int) -> dict[str, Any]:
        room = int(gpu_bytes * utilization) - parts["total"]
        return {"gpu_bytes": gpu_bytes, "kv_room_bytes": room,
                "max_context_tokens": {k: max(room, 0) // v for k, v in per_token.items()}}

    return {
        "scheme": "+".join(sorted({m.name for m in methods.values()})) or dtype,
        "weight_bytes": parts, "gpu_memory_utilization": utilization,
        **on(GPU_80GB_BYTES),  # one H100 80GB
        "h200": on(GPU_141GB_BYTES),
    }


def model_info(name: str, quantization: str | None = None, dtype: str = "bf16",
               gpu_memory_utilization: float = 0.9, kv_cache_dtype: str = "auto") -> dict[str, Any]:
    """Everything `info` prints, as a dict."""
    from mixtral.checkpoint.consolidated import consolidated_weight_files
    from mixtral.checkpoint.hf import hf_weight_files
    from mixtral.checkpoint.loader import resolve
    from mixtral.checkpoint.safetensors_io import read_header

    source = resolve(name)
    args = source.args
    counts = args.num_parameters()
    info: dict[str, Any] = {
        "name": source.name,
        "format": source.format,
        "folder": str(source.folder) if source.folder else None,
        "tokenizer": args.tokenizer,
        "tokenizer_file": str(source.tokenizer_file) if source.tokenizer_file else None,
        "config": {k: v for k, v in vars(args).items()},
        "parameters": counts,
        "weight_bytes": {k: int(counts["total"] * b) for k, b in WEIGHT_BYTES.items()},
        "kv_bytes_per_token": {"bf16": args.kv_bytes_per_token(2), "fp8": args.kv_bytes_per_token(1)},
    }
    info["kv_bytes_max_seq_len_bf16"] = args.kv_bytes_per_token(2) * args.max_seq_len
    info["memory_plan"] = plan = memory_plan(source, quantization, dtype, gpu_memory_utilization)
    kv = "bf16" if kv_cache_dtype == "auto" else "fp8"  # the --kv-cache-dtype asked about, from the plan
    info["kv_cache"] = {"dtype": kv, "bytes_per_token": info["kv_bytes_per_token"][kv],
                        "max_context_tokens": plan["max_context_tokens"][kv]}
    if source.format == "gguf" and source.file is not None:
        info["checkpoint_files"] = 1
        info["checkpoint_bytes"] = source.file.stat().st_size
        info["checkpoint_dtypes"] = ["gguf"]
    elif source.folder is not None and source.repo_id is None:
        folder = source.folder
        files = hf_weight_files(folder)[0] if source.format == "hf" else consolidated_weight_files(folder)
        info["checkpoint_files"] = len(files)
        info["checkpoint_bytes"] = sum(p.stat().st_size for p in files)
        # Only headers are read; pickle files are not opened.
        dtypes = {str(t.dtype).removeprefix("torch.") for p in files if p.suffix == ".safetensors"
                  for t in read_header(p).values()}
        info["checkpoint_dtypes"] = sorted(dtypes)
    return info


def context_line(tokens: dict[str, int], max_seq_len: int) -> str:
    """The longest context the KV room holds with a bf16 and an FP8 cache, capped at the model's own."""
    if tokens["bf16"] >= max_seq_len:
        return (f", longest context the model's full {max_seq_len:,} tokens (room for {tokens['bf16']:,} tokens "
                f"of bf16 KV, {tokens['fp8']:,} of fp8)")
    if tokens["fp8"] >= max_seq_len:
        return f", longest context {tokens['bf16']:,} tokens (bf16 KV), the full {max_seq_len:,} with fp8 KV"
    return f", longest context {tokens['bf16']:,} tokens (bf16 KV), {tokens['fp8']:,} (fp8 KV) of {max_seq_len:,}"


def resolve_args(name: str) -> Any:
    from mixtral.checkpoint.loader import resolve

    return resolve(name).args


@report_errors
def run(args: argparse.Namespace) -> int:
    info = model_info(args.model, getattr(args, "quantization", None), getattr(args, "dtype", "bf16"),
                      getattr(args, "gpu_memory_utilization", 0.9), getattr(args, "kv_cache_dtype", "auto"))
    parallel = parallel_config_from_args(args)
    if parallel.is_distributed:
        from mixtral.distributed.memory import rank_memory

        info["per_rank"] = rank_memory(resolve_args(args.model), parallel)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    p = info["parameters"]
    print(f"model      {info['name']}  ({info['format']}{', ' + info['folder'] if info['folder'] else ''})")
    print(f"tokenizer  {info['tokenizer']}  {info['tokenizer_file'] or ''}")
    print("config")
    for k, v in info["config"].items():
        print(f"  {k:22s} {v}")
    print("parameters")
    print(f"  total                  {count(p['total'])}")
    print(f"  active per token       {count(p['active'])}")
    for part in ("embeddings", "attention", "experts", "router"):
        print(f"  {part:22s} {p[part]:,}")
    print("weight memory")
    for k, v in info["weight_bytes"].items():
        print(f"  {k:22s} {gib(v)}")
    kv = info["kv_bytes_per_token"]
    print("KV cache")
    print(f"  per token              {kv['bf16']:,} B (bf16), {kv['fp8']:,} B (fp8)")
    print(f"  max_seq_len, bf16      {gib(info['kv_bytes_max_seq_len_bf16'])} per sequence")
    if "per_rank" in info:
        r = info["per_rank"]
        print(f"per rank   {r['layout']} over {r['ranks']} GPUs: {count(r['parameters'])} parameters "
              f"({r['replicated_parameters']:,} replicated), KV {r['kv_bytes_per_token']['bf16']:,} B/token (bf16)")
        print("  weights  " + ", ".join(f"{k} {gib(v)}" for k, v in r["weight_bytes"].items()))
    plan = info["memory_plan"]
    print(f"weights as loaded ({plan['scheme']})")
    for part, n in plan["weight_bytes"].items():
        print(f"  {part:22s} {gib(n)}")
    for gpu, fit in (("80 GB GPU (H100)", plan), ("141 GB GPU (H200)", plan["h200"])):
        print(f"on one {gpu} at {plan['gpu_memory_utilization']:g}: KV room {gib(max(fit['kv_room_bytes'], 0))}"
              + (context_line(fit["max_context_tokens"], info["config"]["max_seq_len"]) if fit["kv_room_bytes"] > 0
                 else f": the weights do not fit ({gib(-fit['kv_room_bytes'])} over)"))
    c = info["kv_cache"]
    print(f"KV cache as asked ({c['dtype']}): {c['bytes_per_token']:,} B/token, {c['max_context_tokens']:,} tokens fit")
    if "checkpoint_bytes" in info:
        print(f"checkpoint {info['checkpoint_files']} file(s), {gib(info['checkpoint_bytes'])} on disk, "
              f"dtype {'/'.join(info['checkpoint_dtypes']) or 'unknown'}")
    return 0
