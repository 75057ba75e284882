"""``mixtral bench gpu``: our engine on real shapes with random weights, beside the roofline and a peer.

One run measures, on one GPU: the copy bandwidth and bf16 matmul rate; batch-1 decode and decode at a
ladder of batch sizes with fixed-length contexts; a long prefill, back to back and from an idle GPU
(``--prefill-rest``: the board's power budget makes the two differ); offline throughput at given input/output
lengths; and peers decoding the same shapes on our weights (no extra memory): ``--peer hf``, transformers'
``MixtralForCausalLM`` (what a user would pick instead), and ``--peer compiled``, a gpt-fast style decode step
compiled whole by ``torch.compile`` (``compiled_peer.py``). Every figure is printed with its roofline and the
fraction reached; ``--json`` and ``--plot`` write the numbers and a tok/s-against-batch picture.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mixtral.bench import roofline
from mixtral.bench.args import (
    PEERS,
    fraction,
    length_pairs,
    non_negative_float,
    peer_list,
    positive_int,
    positive_int_list,
)
from mixtral.cli.kernel_args import add_kernel_args, kernel_config_from_args
from mixtral.cli.kv_args import add_kv_cache_args, kv_cache_kwargs
from mixtral.cli.quant_args import add_quantization_arg, quantization_kwargs
from mixtral.model.args import ModelArgs
from mixtral.model.config_formats import args_to_hf_config
from mixtral.model.presets import PRESETS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="mixtral-8x7b", help="preset name (random weights) or model folder")
    p.add_argument("--dtype", default="bf16", help="weight and activation dtype: bf16 or fp16")
    p.add_argument("--layers", type=positive_int, default=None,
                   help="keep only this many decoder layers (to fit a smaller GPU); figures say so")
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
    p.add_argument("--peer", type=peer_list, default="none",
                   help="also decode the same prompts on the same weights with these (comma-separated): 'hf', "
                        "transformers' MixtralForCausalLM; 'compiled', a gpt-fast style torch.compile decode step "
                        "(compiles once per batch size, minutes for the full model)")
    p.add_argument("--peer-batch-sizes", type=positive_int_list, default=None,
                   help="decode batch sizes for the peers (default: --batch-sizes); each must be one of those")
    p.add_argument("--enforce-eager", action="store_true", help="disable CUDA graphs in the engine")
    p.add_argument("--sync-scheduling", action="store_true",
                   help="disable async scheduling (each step waits for the previous step's tokens on the host)")
    p.add_argument("--gpu-memory-utilization", type=fraction, default=0.92,
                   help="fraction of GPU memory the engine may use (weights + KV cache)")
    add_kv_cache_args(p)
    p.add_argument("--json", type=Path, default=None, help="write all figures to this JSON file")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG of tok/s against batch size")
    add_quantization_arg(p)
    add_kernel_args(p)


def arg_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with a combination of flags that argparse's types accepted one by one; None if nothing."""
    if args.peer_batch_sizes is not None:
        ours = {int(b) for b in args.batch_sizes.split(",") if b.strip()}
        extra = [b for b in (int(b) for b in args.peer_batch_sizes.split(",") if b.strip()) if b not in ours]
        if extra:
            return f"--peer-batch-sizes {extra} are not among --batch-sizes {sorted(ours)} (the ratio needs both)"
    if args.layers is None:
        return None
    if args.model not in PRESETS:
        return f"--layers needs a preset --model ({', '.join(sorted(PRESETS))}), got {args.model!r}"
    if args.layers > PRESETS[args.model].n_layers:
        return f"--layers {args.layers}: {args.model} has only {PRESETS[args.model].n_layers} layers"
    return None


def _model_name(args: argparse.Namespace) -> str:
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


def _sync() -> None:
    torch.cuda.synchronize()


def _prompts(vocab: int, n: int, length: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    # Avoid ids 0-999: control tokens of the v3 vocabulary live at the bottom.
    return torch.randint(1000, vocab, (n, length), generator=gen).tolist()


def _run_until_prefilled(engine: Any, ids: list[str]) -> None:
    """Step until every request in ``ids`` has produced its first token."""
    pending = set(ids)
    while pending:
        for out in engine.step():
            if out.outputs and out.outputs[0].token_ids:
                pending.discard(out.request_id)


def bench_decode(engine: Any, margs: ModelArgs, batch: int, context: int, steps: int) -> float:
    """Decode tok/s of ``batch`` sequences with ``context``-token prompts, timed over ``steps`` steps."""
    from mixtral.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True)
    ids = [f"d{batch}-{i}" for i in range(batch)]
    for rid, prompt in zip(ids, _prompts(margs.vocab_size, batch, context, seed=batch), strict=True):
        engine.add_request(rid, prompt, params)
    _run_until_prefilled(engine, ids)
    for _ in range(3):  # warm-up decode steps (graph replay paths, allocator)
        engine.step()
    _sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    _sync()
    elapsed = time.perf_counter() - t0
    for rid in ids:
        engine.abort_request(rid)
    while engine.has_unfinished_requests():
        engine.step()
    return batch * steps / elapsed


def bench_prefill(engine: Any, margs: ModelArgs, length: int, repeats: int = 3, rest_s: float = 0.0) -> float:
    """Seconds to prefill one ``length``-token prompt (best of ``repeats``; prefix caching defeated).

    With ``rest_s`` 0 the runs follow each other (and the warm-up run) back to back. With ``rest_s`` > 0 the
    GPU idles that long before each timed run, as before a lone prompt on a quiet server: on an H200 such a
    prefill ran ~7% faster than the next one (docs/KERNELS.md), which finds the board's power
    budget already spent by the run before it."""
    from mixtral.sampling import SamplingParams

    best = float("inf")
    for r in range(repeats + 1):
        prompt = _prompts(margs.vocab_size, 1, length, seed=10_000 + r)[0]
        engine.add_request(f"p{r}", prompt, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
        _sync()
        if r and rest_s > 0:
            time.sleep(rest_s)
        t0 = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        _sync()
        if r:  # the first run warms up the prefill shapes
            best = min(best, time.perf_counter() - t0)
    return best


def bench_offline(engine: Any, margs: ModelArgs, n: int, in_len: int, out_len: int, warmup: bool = True
                  ) -> dict[str, float]:
    """Output and total tok/s of ``n`` requests of ``in_len`` prompt and ``out_len`` generated tokens, all
    submitted at once. ``warmup`` first runs the same requests for two tokens each (other prompts): their
    prefill steps pack several prompts into one batch, whose kernels compile on first use, which took
    seconds of a 4-second 128/128 run on a fresh machine."""
    from mixtral.sampling import SamplingParams

    if warmup:
        short = SamplingParams(temperature=0.0, max_tokens=min(out_len, 2), ignore_eos=True)
        for i, prompt in enumerate(_prompts(margs.vocab_size, n, in_len, seed=in_len * 7 + out_len + 1)):
            engine.add_request(f"w{in_len}-{out_len}-{i}", prompt, short)
        while engine.has_unfinished_requests():
            engine.step()
    params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
    for i, prompt in enumerate(_prompts(margs.vocab_size, n, in_len, seed=in_len * 7 + out_len)):
        engine.add_request(f"o{in_len}-{out_len}-{i}", prompt, params)
    _sync()
    t0 = time.perf_counter()
    generated = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                generated += len(out.outputs[0].token_ids)
    _sync()
    elapsed = time.perf_counter() - t0
    return {"requests": n, "input_len": in_len, "output_len": out_len, "seconds": elapsed,
            "output_tok_s": generated / elapsed, "total_tok_s": (generated + n * in_len) / elapsed}


def build_hf_peer(model: torch.nn.Module, margs: ModelArgs) -> torch.nn.Module:
    """transformers' MixtralForCausalLM whose parameters are views of ours: no second copy of the weights."""
    from transformers import MixtralConfig, MixtralForCausalLM

    skip = ("architectures", "model_type", "torch_dtype")
    cfg_dict = {k: v for k, v in args_to_hf_config(margs).items() if k not in skip}
    # grouped_mm is transformers' fastest experts implementation on Hopper (its default gathers each token's
    # expert weights, which runs out of memory at a 512-token batch-128 prefill).
    cfg = MixtralConfig(**cfg_dict, experts_implementation="grouped_mm", attn_implementation="sdpa")
    cfg._experts_implementation = "grouped_mm"  # older transformers 5.x ignore the keyword
    with torch.device("meta"):
        hf = MixtralForCausalLM(cfg)
    sd: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": model.tok_embeddings.weight,
        "model.norm.weight": model.norm.weight,
        "lm_head.weight": model.output.weight,
    }
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        q, k, v = layer.attention.wqkv.weight.split([margs.q_size, margs.kv_size, margs.kv_size])
        sd.update({
            p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
            p + "self_attn.o_proj.weight": layer.attention.wo.weight,
            p + "input_layernorm.weight": layer.attention_norm.weight,
            p + "post_attention_layernorm.weight": layer.ffn_norm.weight,
            p + "mlp.gate.weight": layer.feed_forward.gate.weight,
            p + "mlp.experts.gate_up_proj": layer.feed_forward.w13,
            p + "mlp.experts.down_proj": layer.feed_forward.w2,
        })
    hf.load_state_dict(sd, strict=True, assign=True)
    # Rotary inverse frequencies are a non-persistent buffer: rebuild them on the real device.
    hf.model.rotary_emb = type(hf.model.rotary_emb)(cfg, device=model.device)
    return hf.eval()


def bench_hf_decode(hf: torch.nn.Module, margs: ModelArgs, batch: int, context: int, steps: int) -> float:
    """Decode tok/s of transformers' generate: time(steps + 1 new tokens) - time(1 new token)."""
    prompts = torch.tensor(_prompts(margs.vocab_size, batch, context, seed=batch), device=hf.device)

    def gen(new: int) -> float:
        _sync()
        t0 = time.perf_counter()
        hf.generate(prompts, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        _sync()
        return time.perf_counter() - t0

    gen(2)  # warm-up
    return batch * steps / max(gen(steps + 1) - gen(1), 1e-9)


def run_peer(peer: str, model: torch.nn.Module, margs: ModelArgs, batches: list[int], args: argparse.Namespace,
             ours: list[dict[str, Any]], console: Any) -> list[dict[str, Any]]:
    """Decode tok/s of one peer at each batch size, with our figure's ratio to it; a batch that runs out of
    GPU memory is reported as such (transformers' default experts gather per-token weight copies)."""
    from mixtral.bench.compiled_peer import bench_compiled_decode

    hf = build_hf_peer(model, margs) if peer == "hf" else None
    steps = min(args.decode_steps, 32)
    out = []
    for b in batches:
        try:
            if hf is not None:
                tok_s = bench_hf_decode(hf, margs, b, args.context, steps)
            else:
                prompts = torch.tensor(_prompts(margs.vocab_size, b, args.context, seed=b), device=model.device)
                tok_s = bench_compiled_decode(model, margs, prompts, steps)
        except torch.OutOfMemoryError:
            gc.collect()
            torch.cuda.empty_cache()
            console.print(f"peer {peer} decode batch {b:4d}: out of GPU memory")
            out.append({"batch": b, "tok_s": None, "ours_over_peer": None, "error": "out of memory"})
            continue
        except Exception as exc:  # a peer that breaks (a compiler error, say) must not lose our figures
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            console.print(f"peer {peer} decode batch {b:4d}: failed, {why}")
            out.append({"batch": b, "tok_s": None, "ours_over_peer": None, "error": why})
            continue
        mine = next(r["tok_s"] for r in ours if r["batch"] == b)
        out.append({"batch": b, "tok_s": tok_s, "ours_over_peer": mine / tok_s})
        console.print(f"peer {peer} decode batch {b:4d}: {tok_s:9.1f} tok/s  (ours {mine / tok_s:.1f}x)")
    del hf
    gc.collect()
    torch.cuda.empty_cache()
    return out


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from mixtral.engine.llm_engine import LLMEngine

    problem = arg_problem(args)
    if problem is not None:
        print(f"mixtral bench gpu: {problem}", file=sys.stderr)
        return 2
    console = Console()
    if not torch.cuda.is_available():
        console.print("[red]mixtral bench gpu needs a CUDA GPU; use `mixtral bench throughput` on CPU.[/red]")
        return 2
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    batches = [int(b) for b in args.batch_sizes.split(",") if b]
    model_name = _model_name(args)
    results: dict[str, Any] = {
        "device": name, "date": time.strftime("%Y-%m-%d"), "commit": _git_commit(), "model": model_name,
        "dtype": args.dtype, "torch": torch.__version__, "python": platform.python_version(),
        "kernels": dataclasses.asdict(kernel_config_from_args(args)), **kv_cache_kwargs(args),
    }
    console.print(f"[bold]{name}[/bold]  model={model_name} dtype={args.dtype} commit={results['commit']}")
    bw = roofline.measure_copy_bandwidth(dev)
    mm = roofline.measure_matmul_flops(dev)
    peak = roofline.datasheet_peak(name) or mm
    results.update(copy_bandwidth_GBs=bw / 1e9, matmul_TFLOPs=mm / 1e12, peak_TFLOPs=peak / 1e12)
    console.print(f"copy bandwidth {bw / 1e9:.0f} GB/s, bf16 matmul {mm / 1e12:.0f} TFLOP/s (peak {peak / 1e12:.0f})")

    max_len = max(args.context + args.decode_steps + 16, args.prefill_len + 8,
                  *[int(a) + int(b) + 8 for a, b in (x.split(":") for x in args.offline.split(",") if x)])
    engine = LLMEngine.from_config(
        model_name, device="cuda", dtype=args.dtype, max_model_len=max_len, max_num_seqs=max(*batches, 256),
        max_num_batched_tokens=max(args.prefill_len, 2048), gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager, enable_prefix_caching=False, async_scheduling=not args.sync_scheduling,
        kernels=kernel_config_from_args(args), **quantization_kwargs(args), **kv_cache_kwargs(args),
    )
    margs: ModelArgs = engine.model_args
    model = engine.model_runner.model

    rows: list[dict[str, Any]] = []
    for b in batches:
        tok_s = bench_decode(engine, margs, b, args.context, args.decode_steps)
        roof = roofline.decode_roofline_tok_s(margs, b, args.context, bw)
        rows.append({"batch": b, "tok_s": tok_s, "roofline_tok_s": roof, "fraction": tok_s / roof})
        console.print(f"decode batch {b:4d}: {tok_s:9.1f} tok/s  roofline {roof:9.1f}  ({tok_s / roof:.0%})")
    results["decode"] = rows

    flops = roofline.prefill_flops(margs, args.prefill_len)
    runs = [("prefill", 0.0)] + ([("prefill_rested", args.prefill_rest)] if args.prefill_rest > 0 else [])
    for key, rest in runs:
        t = bench_prefill(engine, margs, args.prefill_len, rest_s=rest)
        results[key] = {"tokens": args.prefill_len, "seconds": t, "tok_s": args.prefill_len / t,
                        "TFLOPs": flops / t / 1e12, "fraction_of_peak": flops / t / peak, "rest_s": rest}
        how = f"after {rest:g} s idle each" if rest else "back to back"
        console.print(f"prefill {args.prefill_len} ({how}): {args.prefill_len / t:.0f} tok/s, "
                      f"{flops / t / 1e12:.0f} TFLOP/s ({flops / t / peak:.1%} of peak)")

    results["offline"] = []
    for spec in (x for x in args.offline.split(",") if x):
        in_len, out_len = (int(v) for v in spec.split(":"))
        r = bench_offline(engine, margs, args.offline_requests, in_len, out_len)
        results["offline"].append(r)
        console.print(f"offline {in_len}/{out_len} x{args.offline_requests}: {r['output_tok_s']:.0f} output tok/s, "
                      f"{r['total_tok_s']:.0f} total tok/s")

    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    peers = [p.strip() for p in args.peer.split(",") if p.strip() not in ("", "none")]
    if peers:
        # The peers keep their own KV caches: give back the engine's cache and graphs (the weights stay, shared).
        engine.model_runner.graphs = None
        engine.model_runner.kv_caches = []
        del engine
        gc.collect()
        torch.cuda.empty_cache()
        peer_batches = [int(b) for b in (args.peer_batch_sizes or args.batch_sizes).split(",") if b.strip()]
        for peer in peers:
            results[f"peer_{peer}"] = run_peer(peer, model, margs, peer_batches, args, rows, console)

    table = Table(title=f"mixtral bench gpu — {name} — {model_name} {args.dtype}")
    for col in ("batch", "ours tok/s", "roofline tok/s", "% roofline"):
        table.add_column(col, justify="right")
    for peer in peers:
        table.add_column(f"{peer} tok/s", justify="right")
        table.add_column(f"ours / {peer}", justify="right")
    by_batch = {peer: {r["batch"]: r for r in results[f"peer_{peer}"] if r["tok_s"] is not None} for peer in peers}
    for r in rows:
        cells = [str(r["batch"]), f"{r['tok_s']:.1f}", f"{r['roofline_tok_s']:.1f}", f"{r['fraction']:.0%}"]
        for peer in peers:
            p = by_batch[peer].get(r["batch"])
            cells += [f"{p['tok_s']:.1f}", f"{p['ours_over_peer']:.1f}x"] if p else ["-", "-"]
        table.add_row(*cells)
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.plot:
        plot_decode(results, args.plot)
    return 0


def plot_decode(results: dict[str, Any], path: Path) -> None:
    """tok/s against batch size for us, the peer and the roofline (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["decode"]
    b = [r["batch"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(b, [r["roofline_tok_s"] for r in rows], "k--", label="memory roofline (measured bandwidth)")
    ax.plot(b, [r["tok_s"] for r in rows], "o-", label="mixtral (this project)")
    for (key, label), marker in zip(PEERS.items(), "s^", strict=True):
        peer = [r for r in results.get(f"peer_{key}", []) if r["tok_s"] is not None]
        if peer:
            ax.plot([r["batch"] for r in peer], [r["tok_s"] for r in peer], marker + "-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("decode batch size")
    ax.set_ylabel("output tokens / s")
    ax.set_title(f"{results['model']} {results['dtype']} decode, {results['device']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
