"""``mixtral bench gpu``: our engine on real shapes with random weights, beside the roofline and a peer.

One run measures, on one GPU (or N with ``--tensor-parallel-size``): the copy bandwidth and bf16 matmul rate;
then for each ``--quantization`` scheme in turn (``none,fp8``: bf16 and FP8 side by side, one engine alive at
a time): batch-1 decode and decode at a ladder of batch sizes with fixed-length contexts, against that
scheme's memory roofline (the bytes its weights and KV cache take per step); a long prefill, back to back and
from an idle GPU (``--prefill-rest``: the board's power budget makes the two differ), against the peak of the
precision its matmuls run in; offline throughput at given input/output lengths with the share of each step
the GPU waited for the host; and, on the unquantized model, peers decoding the same shapes on our weights (no
extra memory): ``--peer hf``, transformers' ``MixtralForCausalLM``, and ``--peer compiled``, a gpt-fast style
decode step compiled whole by ``torch.compile``. A scheme whose weights do not fit the GPU is reported with
its bytes. One table has a column group per scheme; ``--json`` and ``--plot`` write every figure and a
tok/s-against-batch picture with a line per scheme.

Here: the flags and the run's frame. The scheme loop is bench/gpu_runner.py (its plans gpu_plan.py), the timed loops
bench/gpu_measure.py, the table and plot bench/gpu_table.py, the peers bench/gpu_peers.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mixtral.bench.args import (
    fraction,
    length_pairs,
    non_negative_float,
    peer_list,
    positive_int,
    positive_int_list,
    scheme_list,
)
from mixtral.cli.kernel_args import add_kernel_args, kernel_config_from_args
from mixtral.cli.kv_args import add_kv_cache_args
from mixtral.cli.parallel_args import add_parallel_args, parallel_config_from_args
from mixtral.model.args import ModelArgs
from mixtral.model.presets import PRESETS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="mixtral-8x7b", help="preset name (random weights) or model folder")
    p.add_argument("--dtype", default="bf16", help="weight and activation dtype: bf16 or fp16")
    p.add_argument("--layers", type=positive_int, default=None,
                   help="keep only this many decoder layers (to fit a smaller GPU), in every scheme; figures say so")
    p.add_argument("--quantization", "-q", type=scheme_list, default="none", metavar="SCHEMES",
                   help="comma-separated schemes measured one after the other in this run, each with its own "
                        "engine (the previous one's memory given back first) and roofline, side by side in one "
                        "table: 'none' (the checkpoint's weights as they are: bf16 for a preset); 'fp8' (e4m3 "
                        "weights with a scale per output channel, activations quantized per token), 'int8' "
                        "(W8A16, a scale per channel), 'int4' (W4A16, a scale per group of 128), quantized while "
                        "loading; or a quantized checkpoint's format (awq, gptq, compressed-tensors, gguf). A "
                        "scheme that does not fit the GPU is reported with its bytes ('none,fp8' on an 80 GB GPU "
                        "with the full 8x7B gives FP8's figures and bf16's size) (default: none)")
    p.add_argument("--batch-sizes", type=positive_int_list, default="1,8,32,64,128",
                   help="comma-separated decode batch sizes")
    p.add_argument("--context", type=positive_int, default=512, help="prompt length of each decode-benchmark sequence")
    p.add_argument("--decode-steps", type=positive_int, default=64, help="decode steps timed per batch size")
    p.add_argument("--prefill-len", type=positive_int, default=2048, help="prompt length of the prefill benchmark")
    p.add_argument("--prefill-rest", type=non_negative_float, default=2.0,
                   help="also time the prefill with the GPU idle this many seconds before each run, as before a "
                        "lone prompt on a quiet server (the main figure runs back to back); 0 skips it")
    p.add_argument("--offline", type=length_pairs, default="128:128,1000:1000",
                   help="comma-separated INPUT:OUTPUT lengths for the offline throughput runs ('' skips)")
    p.add_argument("--offline-requests", type=positive_int, default=256, help="requests per offline throughput run")
    p.add_argument("--max-num-seqs", type=positive_int, default=None,
                   help="sequences the engine runs at once (its CUDA graphs are captured up to it); offline runs "
                        "keep this many running (default: the largest of --batch-sizes and 256)")
    p.add_argument("--peer", type=peer_list, default="none",
                   help="also decode the same prompts on the same weights with these (comma-separated), on the "
                        "unquantized scheme on one GPU: 'hf', transformers' MixtralForCausalLM; 'compiled', a "
                        "gpt-fast style torch.compile decode step (compiles once per batch size, minutes for the "
                        "full model)")
    p.add_argument("--peer-batch-sizes", type=positive_int_list, default=None,
                   help="decode batch sizes for the peers (default: --batch-sizes); each must be one of those")
    p.add_argument("--enforce-eager", action="store_true", help="disable CUDA graphs in the engine")
    p.add_argument("--sync-scheduling", action="store_true",
                   help="disable async scheduling (each step waits for the previous step's tokens on the host)")
    p.add_argument("--gpu-memory-utilization", type=fraction, default=0.92,
                   help="fraction of GPU memory the engine may use (weights + KV cache)")
    add_kv_cache_args(p)  # the runner reads args.kv_cache_dtype
    p.add_argument("--json", type=Path, default=None,
                   help="write all figures to this JSON file (rewritten after each scheme, so a run cut short "
                        "keeps what it measured)")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG of tok/s against batch size, a line per scheme")
    add_parallel_args(p)
    add_kernel_args(p)


def arg_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with a combination of flags that argparse's types accepted one by one; None if nothing."""
    ours = sorted({int(b) for b in args.batch_sizes.split(",") if b.strip()})
    if args.peer_batch_sizes is not None:
        extra = [b for b in (int(b) for b in args.peer_batch_sizes.split(",") if b.strip()) if b not in ours]
        if extra:
            return f"--peer-batch-sizes {extra} are not among --batch-sizes {ours} (the ratio needs both)"
    if args.max_num_seqs is not None and args.max_num_seqs < ours[-1]:
        return f"--max-num-seqs {args.max_num_seqs} is below the largest of --batch-sizes ({ours[-1]})"
    try:
        parallel_config_from_args(args)
    except ValueError as exc:
        return str(exc)
    if args.layers is None:
        return None
    if args.model not in PRESETS:
        return f"--layers needs a preset --model ({', '.join(sorted(PRESETS))}), got {args.model!r}"
    if args.layers > PRESETS[args.model].n_layers:
        return f"--layers {args.layers}: {args.model} has only {PRESETS[args.model].n_layers} layers"
    return None


def model_name(args: argparse.Namespace) -> str:
    """A preset cut to --layers gets its own preset name so the loader builds it like any preset."""
    if args.layers is None:
        return args.model
    base: ModelArgs = PRESETS[args.model]
    name = f"{args.model}-{args.layers}l"
    PRESETS[name] = base.replace(n_layers=args.layers)
    return name


def _git_commit() -> str:
    """The commit benchmarked: $MIXTRAL_COMMIT when set (a tree copied without .git), else git's HEAD."""
    if os.environ.get("MIXTRAL_COMMIT"):
        return os.environ["MIXTRAL_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_header(args: argparse.Namespace, name: str, machine: Any) -> dict[str, Any]:
    """The run's identity and the machine figures every scheme is held to."""
    parallel = parallel_config_from_args(args)
    return {
        "device": machine.name, "date": time.strftime("%Y-%m-%d"), "commit": _git_commit(), "model": name,
        "dtype": args.dtype, "torch": torch.__version__, "python": platform.python_version(),
        "kernels": dataclasses.asdict(kernel_config_from_args(args)),
        "kv_cache_dtype": getattr(args, "kv_cache_dtype", "auto"),
        "parallel_layout": parallel.describe() if parallel.is_distributed else None,
        "ranks": parallel.world_size,
        "command": "mixtral bench gpu " + " ".join(sys.argv[3:] if sys.argv[1:3] == ["bench", "gpu"] else
                                                    sys.argv[1:]),
        "copy_bandwidth_GBs": machine.bandwidth / 1e9, "matmul_TFLOPs": machine.matmul / 1e12,
        "peak_TFLOPs": {k: v / 1e12 for k, v in machine.peaks.items()}, "engine_memory_bytes": machine.capacity,
        "schemes": {},
    }


def finish(results: dict[str, Any], schemes: dict[str, dict[str, Any]], json_path: Path | None) -> None:
    """Put the schemes so far into ``results`` (with the unquantized one as the baseline) and write the JSON."""
    from mixtral.bench.gpu_table import build_table, to_markdown

    results["schemes"] = schemes
    results["baseline"] = next((label for label, res in schemes.items() if not res["quantized"]), None)
    results["table_markdown"] = to_markdown(*build_table(results))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=2) + "\n")


def run(args: argparse.Namespace) -> int:
    """0 when every scheme was measured or reported as not fitting; 1 if one failed; 2 for bad flags or no GPU;
    130 when interrupted (the figures so far are printed and written)."""
    from rich.console import Console

    from mixtral.bench.gpu_plan import Machine
    from mixtral.bench.gpu_runner import run_schemes
    from mixtral.bench.gpu_table import plot_decode, print_table

    problem = arg_problem(args)
    if problem is not None:
        print(f"mixtral bench gpu: {problem}", file=sys.stderr)
        return 2
    console = Console()
    if not torch.cuda.is_available():
        console.print("[red]mixtral bench gpu needs a CUDA GPU; use `mixtral bench throughput` on CPU.[/red]")
        return 2
    name = model_name(args)
    machine = Machine.measure(torch.device("cuda"), args.gpu_memory_utilization)
    results = run_header(args, name, machine)
    console.print(f"[bold]{machine.name}[/bold]  model={name} dtype={args.dtype} schemes={args.quantization} "
                  f"commit={results['commit']}")
    console.print(f"copy bandwidth {machine.bandwidth / 1e9:.0f} GB/s, bf16 matmul {machine.matmul / 1e12:.0f} "
                  f"TFLOP/s (peaks: bf16 {machine.peaks['bf16'] / 1e12:.0f}, fp8 {machine.peaks['fp8'] / 1e12:.0f})")
    status = 0
    try:
        run_schemes(args, name, machine, console, on_scheme=lambda s: finish(results, s, args.json))
    except ValueError as exc:  # a scheme the model cannot take (QuantConfigError, CheckpointError): before loading
        print(f"mixtral bench gpu: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C or a time limit's SIGINT: keep and show what was measured
        for res in results["schemes"].values():
            if res.get("status") == "running":
                res["status"], res["error"] = "interrupted", "the run was interrupted (SIGINT)"
        finish(results, results["schemes"], args.json)
        status = 130
    print_table(results)
    if args.plot:
        plot_decode(results, args.plot)
    return status or (1 if any(res["status"] == "failed" for res in results["schemes"].values()) else 0)
