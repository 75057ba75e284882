"""The scheme loop of ``mixtral bench gpu``: for each ``--quantization`` scheme in turn, one engine built, measured
against that scheme's roofline and freed before the next, so bf16 and fp8 (or int4) come out of one run.

- :func:`run_scheme`: a scheme whose weights exceed the GPU is reported as not fitting, with its bytes, instead
  of ending the run; one that fits gets an engine, the decode ladder, the prefill, the offline runs, the
  per-GPU figures under tensor parallelism and (unquantized, one GPU) the peers; the engine is shut down and
  its memory given back even when a measurement fails, whose error is recorded beside the figures so far.
- :func:`compare_to_baseline`: each figure's ratio to the unquantized scheme's, when that one ran.

Not here: the flags (bench/gpu.py), what each scheme is held to before anything loads (bench/gpu_plan.py), the
timed loops (bench/gpu_measure.py), the table and plot (gpu_table.py).
"""

from __future__ import annotations

import argparse
import gc
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from mixtral.bench import roofline
from mixtral.bench.gpu_measure import bench_decode, bench_offline, bench_prefill
from mixtral.bench.gpu_plan import Machine, SchemePlan, kv_cache_kwargs, parse_schemes, plan_scheme
from mixtral.model.args import ModelArgs


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:500] if text else ''}"


def shutdown_engine(engine: Any) -> None:
    """Stop the engine (and its workers) and drop its KV cache and CUDA graphs; the caller drops the engine
    itself, then ``release_memory()`` gives everything back to the device."""
    engine.shutdown()
    runner = getattr(engine.model_runner, "local", engine.model_runner)
    runner.graphs = None
    runner.kv_caches = []


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def build_engine(args: argparse.Namespace, plan: SchemePlan, model_name: str, device: torch.device,
                 max_num_seqs: int) -> Any:
    from mixtral.cli.kernel_args import kernel_config_from_args
    from mixtral.cli.parallel_args import parallel_engine_kwargs
    from mixtral.engine.llm_engine import LLMEngine

    offline = [int(a) + int(b) + 8 for a, b in (x.split(":") for x in args.offline.split(",") if x)]
    max_len = max(args.context + args.decode_steps + 16, args.prefill_len + 8, *offline)
    return LLMEngine.from_config(
        model_name, device=str(device), dtype=args.dtype, max_model_len=max_len, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max(args.prefill_len, 2048), gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager, enable_prefix_caching=False, async_scheduling=not args.sync_scheduling,
        kernels=kernel_config_from_args(args), **kv_cache_kwargs(args), **parallel_engine_kwargs(args),
        **({"quantization": plan.flag} if plan.flag else {}),
    )


def run_scheme(args: argparse.Namespace, plan: SchemePlan, model_name: str, machine: Machine, console: Any,
               world_size: int = 1, res: dict[str, Any] | None = None,
               update: Callable[[], None] | None = None) -> dict[str, Any]:
    """Every figure of one scheme (module docstring), filled into ``res`` (status "running" until it ends;
    ``update()`` after each figure, to write what was measured as it goes). ``world_size``: GPUs the model is
    spread over."""
    from mixtral.engine.memory import InsufficientMemoryError

    res = {} if res is None else res
    res.update(plan.describe(), status="running")
    update = update or (lambda: None)
    per_gpu = plan.weight_bytes["total"] / world_size
    if per_gpu > machine.capacity:
        res.update(status="does not fit", error=(
            f"{plan.label} weights take {_gib(per_gpu)}{' per GPU' if world_size > 1 else ''}; the engine may use "
            f"{_gib(machine.capacity)} of {machine.name} (--gpu-memory-utilization {args.gpu_memory_utilization})"))
        console.print(f"[yellow]{plan.label}: does not fit: {res['error']}[/yellow]")
        return res
    batches = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    t0 = time.perf_counter()
    refused = None
    try:
        engine = build_engine(args, plan, model_name, machine.device, args.max_num_seqs or max(*batches, 256))
    except (InsufficientMemoryError, torch.OutOfMemoryError) as exc:
        refused = _first_line(exc)  # the traceback holds the half-built engine's frames until this block ends
    if refused is not None:
        release_memory()
        res.update(status="does not fit", error=refused)
        console.print(f"[yellow]{plan.label}: does not fit: {refused}[/yellow]")
        return res
    res["load_seconds"] = time.perf_counter() - t0
    console.print(f"[bold]{plan.label}[/bold]: {_gib(plan.weight_bytes['total'])} of weights, engine built in "
                  f"{res['load_seconds']:.1f} s")
    update()
    try:
        measure_engine(engine, args, plan, machine, batches, res, console, update)
        res["status"] = "ok"
    except Exception as exc:  # one scheme that breaks must not lose the others' figures
        traceback.print_exc()
        res.update(status="failed", error=_first_line(exc))
        console.print(f"[red]{plan.label}: failed: {res['error']}[/red]")
    finally:
        shutdown_engine(engine)
        del engine  # the last reference: the weights go with it
        release_memory()
        if machine.device.type == "cuda":
            res["allocated_after_free_bytes"] = torch.cuda.memory_allocated(machine.device)
    return res


def measure_engine(engine: Any, args: argparse.Namespace, plan: SchemePlan, machine: Machine, batches: list[int],
                   res: dict[str, Any], console: Any, update: Callable[[], None] = lambda: None) -> None:
    """Fill ``res`` figure by figure, calling ``update()`` after each (what was measured stays if a later figure
    fails or the run is cut short)."""
    from mixtral.bench import parallel as bench_parallel

    executor = getattr(engine.model_runner, "executor", None)  # tensor parallel: rank 0's view of the group
    margs: ModelArgs = executor.source.args if executor is not None else engine.model_args  # the full model
    ranks = executor.parallel.world_size if executor is not None else 1
    bw = machine.bandwidth

    def roof(b: int) -> tuple[float, roofline.StepBytes]:
        if executor is not None:
            step = bench_parallel.rank_decode_bytes(margs, executor.parallel, b, args.context, plan.dtype_bytes,
                                                    plan.fmt, plan.kv_bytes)
        else:
            step = roofline.decode_step_bytes(margs, b, args.context, plan.dtype_bytes, plan.fmt, plan.kv_bytes)
        return b / (step.total / bw), step

    res["decode"] = rows = []
    for b in batches:
        tok_s = bench_decode(engine, engine.model_args, b, args.context, args.decode_steps)
        bound, step = roof(b)
        rows.append({"batch": b, "tok_s": tok_s, "roofline_tok_s": bound, "fraction": tok_s / bound,
                     "step_weight_bytes": step.weights, "step_kv_bytes": step.kv})
        console.print(f"{plan.label} decode batch {b:4d}: {tok_s:9.1f} tok/s  roofline {bound:9.1f}  "
                      f"({tok_s / bound:.0%})")
        update()

    flops = roofline.prefill_flops(margs, args.prefill_len) / ranks  # per GPU
    peak = machine.peaks[plan.compute]
    runs = [("prefill", 0.0)] + ([("prefill_rested", args.prefill_rest)] if args.prefill_rest > 0 else [])
    for key, rest in runs:
        t = bench_prefill(engine, engine.model_args, args.prefill_len, rest_s=rest)
        res[key] = {"tokens": args.prefill_len, "seconds": t, "tok_s": args.prefill_len / t,
                    "TFLOPs": flops / t / 1e12, "peak_TFLOPs": peak / 1e12, "fraction_of_peak": flops / t / peak,
                    "rest_s": rest}
        how = f"after {rest:g} s idle each" if rest else "back to back"
        console.print(f"{plan.label} prefill {args.prefill_len} ({how}): {args.prefill_len / t:.0f} tok/s, "
                      f"{flops / t / 1e12:.0f} TFLOP/s ({flops / t / peak:.1%} of the {plan.compute} peak)")
        update()

    res["offline"] = []
    for spec in (x for x in args.offline.split(",") if x):
        in_len, out_len = (int(v) for v in spec.split(":"))
        r = bench_offline(engine, engine.model_args, args.offline_requests, in_len, out_len)
        res["offline"].append(r)
        console.print(f"{plan.label} offline {in_len}/{out_len} x{args.offline_requests}: "
                      f"{r['output_tok_s']:.0f} output tok/s, {r['total_tok_s']:.0f} total tok/s; up to "
                      f"{r['max_running']} running; host {r['host']['host_share']:.0%} of "
                      f"{r['host']['wall_ms_per_step']:.2f} ms/step")
        update()

    if executor is not None:
        res["parallel"] = bench_parallel.gpu_report(engine, batches, args.context, args.prefill_len, bw,
                                                    {r["batch"]: r["tok_s"] for r in rows}, fmt=plan.fmt,
                                                    kv_dtype_bytes=plan.kv_bytes)
    peers = [p.strip() for p in args.peer.split(",") if p.strip() not in ("", "none")]
    if peers and (plan.quantized or executor is not None):
        res["peers_skipped"] = "peers run on an unquantized model on one GPU"
    elif peers:
        run_peers(engine, args, peers, batches, rows, res, console)


def run_peers(engine: Any, args: argparse.Namespace, peers: list[str], batches: list[int],
              rows: list[dict[str, Any]], res: dict[str, Any], console: Any) -> None:
    """The peers on the engine's weights, after its KV cache and graphs are given back (they keep their own)."""
    from mixtral.bench.gpu_peers import run_peer

    engine.model_runner.graphs = None
    engine.model_runner.kv_caches = []
    release_memory()
    peer_batches = [int(b) for b in (args.peer_batch_sizes or args.batch_sizes).split(",") if b.strip()]
    for peer in peers:
        res[f"peer_{peer}"] = run_peer(peer, engine.model_runner.model, engine.model_args, peer_batches,
                                       args.context, args.decode_steps, rows, console)


def compare_to_baseline(schemes: dict[str, dict[str, Any]], baseline: str) -> None:
    """Add ``over_baseline`` (this figure / the baseline scheme's) to every figure both measured."""
    base = schemes.get(baseline)
    if base is None or base.get("status") != "ok":
        return
    base_decode = {r["batch"]: r["tok_s"] for r in base.get("decode", [])}
    base_offline = {(r["input_len"], r["output_len"]): r["output_tok_s"] for r in base.get("offline", [])}
    for res in schemes.values():
        for r in res.get("decode", []):
            if r["batch"] in base_decode:
                r["over_baseline"] = r["tok_s"] / base_decode[r["batch"]]
        for key in ("prefill", "prefill_rested"):
            if key in res and key in base:
                res[key]["over_baseline"] = res[key]["tok_s"] / base[key]["tok_s"]
        for r in res.get("offline", []):
            if (r["input_len"], r["output_len"]) in base_offline:
                r["over_baseline"] = r["output_tok_s"] / base_offline[(r["input_len"], r["output_len"])]


def run_schemes(args: argparse.Namespace, model_name: str, machine: Machine, console: Any,
                on_scheme: Callable[[dict[str, dict[str, Any]]], None] | None = None) -> dict[str, dict[str, Any]]:
    """Every ``--quantization`` scheme in turn (one engine alive at a time); ``on_scheme`` gets the results so far
    after each figure (to write the JSON as the run goes: a run cut short keeps what it measured). Returns
    {label: figures}, in the order given."""
    tp = getattr(args, "tensor_parallel_size", 1)
    schemes: dict[str, dict[str, Any]] = {}
    plans = []
    for flag in parse_schemes(args.quantization):  # every plan first: a bad flag fails before any load
        plans.append(plan_scheme(model_name, flag, args.dtype, getattr(args, "kv_cache_dtype", "auto"), tp,
                                 tuple(p.label for p in plans)))
    baseline = next((p.label for p in plans if not p.quantized), None)

    def update() -> None:
        if baseline is not None:
            compare_to_baseline(schemes, baseline)
        if on_scheme is not None:
            on_scheme(schemes)

    for plan in plans:
        schemes[plan.label] = {}
        run_scheme(args, plan, model_name, machine, console, world_size=tp, res=schemes[plan.label], update=update)
        update()
    return schemes
