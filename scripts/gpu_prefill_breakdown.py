"""Where a 2048-token prefill's time goes on the GPU, and the prefill MoE paths compared in one process.

Builds the engine as ``mixtral bench gpu`` does (random weights, ``--layers`` of the preset), then:
1. times whole prefills (one prompt, max_tokens 1: one engine step plus the sampled token), alternating the
   prefill paths named by ``--paths`` (the model's KernelConfig is switched between them) so that clock and power drift
   hit every path alike; prints each run and each path's median in TFLOP/s and % of the bf16 datasheet peak;
2. profiles one prefill with the first path: GPU time per kernel (summed over layers), the sum of all kernels
   against the wall time (the difference is host time the GPU waited for).

    PYTHONPATH=src python3 scripts/gpu_prefill_breakdown.py --layers 16 --paths sorted,persistent --json out.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from typing import Any

import torch

from mixtral.bench import roofline
from mixtral.engine.llm_engine import LLMEngine
from mixtral.kernels import dispatch
from mixtral.kernels.config import KernelConfig
from mixtral.model.presets import PRESETS
from mixtral.sampling import SamplingParams


def prefill_engine(model: str, layers: int, length: int) -> LLMEngine:
    """The engine as ``mixtral bench gpu`` builds it (random weights, ``layers`` of the preset), one prompt of
    ``length`` tokens a chunk: its prefill graphs are captured for exactly that prompt."""
    name = f"{model}-{layers}l"
    PRESETS[name] = PRESETS[model].replace(n_layers=layers)
    return LLMEngine.from_config(name, device="cuda", dtype="bf16", max_model_len=length + 64, max_num_seqs=8,
                                 max_num_batched_tokens=length, enable_prefix_caching=False,
                                 gpu_memory_utilization=0.9)


def prefill_once(engine: LLMEngine, length: int, vocab: int, seed: int) -> float:
    """Seconds of one fresh prompt's prefill (prefix caching is off, every prompt differs)."""
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(100, vocab - 1, (length,), generator=gen).tolist()
    engine.add_request(f"p{seed}", prompt, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def greedy_tokens(engine: LLMEngine, prompt: list[int], n: int, request_id: str
                  ) -> tuple[list[int], dict[int, float]]:
    """The first n greedy tokens after ``prompt`` and the top-20 logprobs of the first (the prefill's output)."""
    engine.add_request(request_id, prompt, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True,
                                                          logprobs=20))
    out: list[int] = []
    first: dict[int, float] = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            out = list(o.outputs[0].token_ids)
            if o.outputs[0].logprobs:
                first = o.outputs[0].logprobs[0]
    return out, first


def select(engine: LLMEngine, graphs: tuple[object, object], variant: str) -> None:
    """``graph``: the prefill CUDA graphs as the engine picks them (a fresh prompt replays the dense-attention
    one); ``paged_graph``: only the paged-attention graph; any other name: eager steps on that
    ``KernelConfig.moe_prefill`` path."""
    runner = engine.model_runner
    paged, fresh = graphs
    runner.prefill_graph = paged if variant in ("graph", "paged_graph") else None  # type: ignore[assignment]
    runner.fresh_prefill_graph = fresh if variant == "graph" else None  # type: ignore[assignment]
    graphed = variant in ("graph", "paged_graph")
    runner.model.set_kernel_config(KernelConfig(moe_prefill="sorted" if graphed else variant))


def prefill_args(ap: argparse.ArgumentParser, layers: int, rounds_of: str) -> None:
    """The flags the prefill scripts share: model, layers, prompt length, rounds, JSON output."""
    ap.add_argument("--model", default="mixtral-8x7b", help="preset (random weights)")
    ap.add_argument("--layers", type=int, default=layers,
                    help="decoder layers kept (16 of 8x7B's 32 fit an H100, all 32 an H200)")
    ap.add_argument("--length", type=int, default=2048, help="prompt tokens (one chunk)")
    ap.add_argument("--rounds", type=int, default=5, help=f"timed prefills per {rounds_of}")
    ap.add_argument("--json", default=None, help="write the figures here")


def prefill_setup(args: argparse.Namespace) -> tuple[LLMEngine, float, float]:
    """(the engine of ``prefill_engine``, FLOPs of one prefill of ``args.length`` tokens, the device's bf16
    peak FLOP/s: the datasheet's, else measured)."""
    engine = prefill_engine(args.model, args.layers, args.length)
    flops = roofline.prefill_flops(engine.model_args, args.length)
    peak = roofline.datasheet_peak(torch.cuda.get_device_name()) or roofline.measure_matmul_flops(torch.device("cuda"))
    return engine, flops, peak


def host_split(engine: LLMEngine, length: int, vocab: int, runs: int, seed: int) -> None:
    """Where a lone prefill's wall time goes, from CUDA events recorded at the start of the model runner's
    launch, around the graph replay and at its end (no profiler, whose per-call cost would swamp the host
    side): GPU time before the graph (it waits for the host's input preparation and copies), the graph, the
    logits and sampling after it, and the rest of the wall time (scheduling, the token's trip to the host,
    output processing)."""
    runner = engine.model_runner
    marks: list[torch.cuda.Event] = []

    def mark() -> None:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        marks.append(ev)

    graph = runner.fresh_prefill_graph or runner.prefill_graph
    assert graph is not None, "needs a prefill graph"
    launch, replay = runner.launch, graph.graph.replay

    def timed_launch(*a: Any, **k: Any) -> Any:
        mark()
        out = launch(*a, **k)
        mark()
        return out

    def timed_replay() -> None:
        mark()
        replay()
        mark()

    rows = []
    runner.launch, graph.graph.replay = timed_launch, timed_replay  # type: ignore[method-assign]
    try:
        for i in range(runs):
            marks.clear()
            wall = prefill_once(engine, length, vocab, seed + i)
            if len(marks) != 4:
                print(f"host split: {len(marks)} marks (expected 4: one launch, one replay); skipped")
                continue
            start, g0, g1, end = marks
            rows.append((wall * 1e3, start.elapsed_time(g0), g0.elapsed_time(g1), g1.elapsed_time(end),
                         wall * 1e3 - start.elapsed_time(end)))
    finally:
        runner.launch, graph.graph.replay = launch, replay  # type: ignore[method-assign]
    for r in rows:
        print(f"host split: wall {r[0]:7.2f} ms = before graph {r[1]:.3f} + graph {r[2]:7.2f} + after {r[3]:.3f} "
              f"+ outside the launch {r[4]:.3f}")
    if rows:
        med = [statistics.median(c) for c in zip(*rows, strict=True)]
        print(f"host split median: wall {med[0]:.2f} ms, before graph {med[1]:.3f}, graph {med[2]:.2f}, after "
              f"{med[3]:.3f}, outside the launch {med[4]:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    prefill_args(ap, layers=16, rounds_of="path")
    ap.add_argument("--paths", default="graph,paged_graph,sorted",
                    help="variants to alternate: 'graph' (the prefill CUDA graphs as the engine picks them), "
                         "'paged_graph' (without the fresh-prompt one) or --moe-prefill values (eager steps)")
    ap.add_argument("--trace", default=None, help="write a Chrome trace (host and GPU) of one prefill here")
    ap.add_argument("--host-split", type=int, default=0,
                    help="time this many more prefills with CUDA events around the step's parts (no profiler)")
    args = ap.parse_args()
    engine, flops, peak = prefill_setup(args)
    margs = engine.model_args
    paths = [p for p in args.paths.split(",") if p]
    runner = engine.model_runner
    graphs = (runner.prefill_graph, runner.fresh_prefill_graph)
    print(f"prefill graphs captured: paged {graphs[0] is not None}, fresh (dense attention) {graphs[1] is not None}")
    times: dict[str, list[float]] = {p: [] for p in paths}
    seed = 0
    for p in paths:  # warm-up: compiles every path's kernels
        select(engine, graphs, p)
        prefill_once(engine, args.length, margs.vocab_size, seed := seed + 1)
    if graphs[0] is not None:
        # The paged graph must give the eager sorted path's tokens bit for bit, and the fresh graph those of an
        # eager step that also takes the dense attention (the threshold lowered to the graph's). Dense and
        # paged attention are different kernels: their first-token logprobs are compared, not their tokens.
        gen = torch.Generator().manual_seed(123)
        agree = {"paged_graph": 0, "graph": 0}
        worst = 0.0
        for i in range(3):
            prompt = torch.randint(100, margs.vocab_size - 1, (args.length,), generator=gen).tolist()
            got, lps = {}, {}
            for v in ("paged_graph", "graph", "sorted", "eager_dense"):
                select(engine, graphs, "sorted" if v == "eager_dense" else v)
                saved = dispatch.DENSE_PREFILL_MIN_TOKENS
                if v == "eager_dense":
                    dispatch.DENSE_PREFILL_MIN_TOKENS = dispatch.GRAPH_DENSE_PREFILL_MIN_TOKENS
                try:
                    got[v], lps[v] = greedy_tokens(engine, prompt, 6, f"g{i}-{v}")
                finally:
                    dispatch.DENSE_PREFILL_MIN_TOKENS = saved
            agree["paged_graph"] += got["paged_graph"] == got["sorted"]
            agree["graph"] += got["graph"] == got["eager_dense"]
            common = set(lps["graph"]) & set(lps["sorted"])
            diff = max((abs(lps["graph"][t] - lps["sorted"][t]) for t in common), default=float("nan"))
            worst = max(worst, diff)
            print(f"prompt {i}: paged graph {got['paged_graph']} eager {got['sorted']}; fresh graph {got['graph']} "
                  f"eager dense {got['eager_dense']}; first-token top-20 logprobs, dense vs paged: {len(common)} "
                  f"tokens in common, max |diff| {diff:.4f}")
        print(f"paged prefill graph == eager on {agree['paged_graph']}/3 prompts; fresh (dense) graph == eager "
              f"dense on {agree['graph']}/3; dense vs paged logprobs max |diff| {worst:.4f}")
    for r in range(args.rounds):
        for p in paths if r % 2 == 0 else paths[::-1]:
            select(engine, graphs, p)
            t = prefill_once(engine, args.length, margs.vocab_size, seed := seed + 1)
            times[p].append(t)
            print(f"round {r} {p:12s} {t * 1e3:7.2f} ms  {flops / t / 1e12:5.0f} TFLOP/s  {flops / t / peak:5.1%}",
                  flush=True)
    summary = {}
    for p, ts in times.items():
        med = statistics.median(ts)
        summary[p] = {"median_ms": med * 1e3, "best_ms": min(ts) * 1e3, "TFLOPs_median": flops / med / 1e12,
                      "fraction_of_peak_median": flops / med / peak, "fraction_of_peak_best": flops / min(ts) / peak}
        print(f"{p:12s} median {med * 1e3:7.2f} ms = {flops / med / 1e12:5.0f} TFLOP/s ({flops / med / peak:.1%}), "
              f"best {flops / min(ts) / peak:.1%}")

    if args.host_split:
        host_split(engine, args.length, margs.vocab_size, args.host_split, seed + 100)

    from torch.profiler import ProfilerActivity, profile

    select(engine, graphs, paths[0])
    if args.trace:  # host calls beside the kernels: where the GPU waits for Python at a step's start and end
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as traced:
            prefill_once(engine, args.length, margs.vocab_size, seed + 5)
        traced.export_chrome_trace(args.trace)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        wall = prefill_once(engine, args.length, margs.vocab_size, seed + 1)
    kernels: dict[str, list[float]] = {}
    spans: list[tuple[float, float, str]] = []  # (start us, end us, name) of every GPU activity
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            kernels.setdefault(ev.name, []).append(ev.device_time)  # us
            spans.append((ev.time_range.start, ev.time_range.end, ev.name))
    total = sum(sum(v) for v in kernels.values())
    rows = sorted(((sum(v), len(v), k) for k, v in kernels.items()), reverse=True)
    print(f"\nprofiled prefill ({paths[0]}): wall {wall * 1e3:.2f} ms, kernels {total / 1e3:.2f} ms "
          f"({total / 1e3 / (wall * 1e3):.1%} of wall; with PDL a kernel's time includes its wait for the one "
          f"before, so the times overlap: KernelConfig(pdl=False) gives additive ones)")
    for us, count, k in rows[:25]:
        print(f"{us / 1e3:8.3f} ms {us / total:6.1%} x{count:4d}  {k[:110]}")
    # Idle stretches of the GPU between its first and last kernel: where it waited for the host.
    spans.sort()
    gaps = [(b[0] - a[1], a[2], b[2]) for a, b in itertools.pairwise(spans) if b[0] > a[1]]
    idle = sum(g for g, _, _ in gaps)
    print(f"GPU busy span {(spans[-1][1] - spans[0][0]) / 1e3:.2f} ms, idle inside it {idle / 1e3:.2f} ms; "
          f"largest gaps:")
    for g, before, after in sorted(gaps, reverse=True)[:12]:
        print(f"  {g:8.1f} us after {before[:50]} before {after[:50]}")
    # Where in the step the GPU waited: idle time per tenth of the busy span (the first tenth holds layer 0).
    t0, span = spans[0][0], spans[-1][1] - spans[0][0]
    tenths = [0.0] * 10
    for a, b in itertools.pairwise(spans):
        if b[0] > a[1]:
            tenths[min(9, int((a[1] - t0) / span * 10))] += b[0] - a[1]
    print("idle us per tenth of the span: " + " ".join(f"{t:.0f}" for t in tenths))

    # Host time to launch the forward pass (no sync inside it) against the step's wall time: when the
    # launches take nearly as long as the kernels, the GPU waits for the host.
    runner = engine.model_runner
    host: dict[str, float] = {}

    def clocked(name: str, fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                host[name] = host.get(name, 0.0) + time.perf_counter() - t
        return wrapper

    saved = runner._prepare, runner.model.forward_tokens
    runner._prepare = clocked("prepare", runner._prepare)
    runner.model.forward_tokens = clocked("forward launch", runner.model.forward_tokens)
    wall2 = prefill_once(engine, args.length, margs.vocab_size, seed + 4)
    runner._prepare, runner.model.forward_tokens = saved
    print(f"host: prepare {host.get('prepare', 0) * 1e3:.2f} ms, "
          f"forward launch {host.get('forward launch', 0) * 1e3:.2f} ms (0 when the graph ran), "
          f"wall {wall2 * 1e3:.2f} ms")

    # Host syncs inside a prefill: PyTorch warns at each synchronizing call while the debug mode is on.
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            prefill_once(engine, args.length, margs.vocab_size, seed + 3)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs: dict[str, int] = {}
    for w in caught:
        if "synchroniz" in str(w.message):
            where = f"{w.filename}:{w.lineno}"
            syncs[where] = syncs.get(where, 0) + 1
    print(f"synchronizing calls in one prefill: {sum(syncs.values())}")
    for where, count in sorted(syncs.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  x{count:4d} {where}")

    import cProfile
    import io
    import pstats

    pr = cProfile.Profile()
    pr.enable()
    prefill_once(engine, args.length, margs.vocab_size, seed + 2)
    pr.disable()
    out = io.StringIO()
    pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(18)
    print(out.getvalue()[-6000:])
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "model": f"{args.model}-{args.layers}l",
                       "length": args.length,
                       "flops": flops, "peak_TFLOPs": peak / 1e12, "summary": summary,
                       "runs_ms": {p: [t * 1e3 for t in ts] for p, ts in times.items()},
                       "profile_wall_ms": wall * 1e3, "profile_kernels_ms": total / 1e3,
                       "kernels": [{"name": k, "ms": us / 1e3, "count": c} for us, c, k in rows[:40]]}, fh, indent=1)


if __name__ == "__main__":
    main()
