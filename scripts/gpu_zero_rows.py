"""What zero token rows cost the prefill MoE GEMMs under sustained load: the same tuned w13 and w2 launches on
inputs whose rows are random, or partly zero (every ``1/fraction``-th row), alternated over rounds in CUDA
graphs of back-to-back launches so clocks and power treat them alike.

A tile's padding rows are the next expert's token rows today; if zero rows draw much less power at the
700 W cap, zero-padded groups would buy time. The fraction of time saved per zero row says how much.

    PYTHONPATH=src python3 scripts/gpu_zero_rows.py --tokens 2048 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from mixtral.bench.cuda_timing import capture
from mixtral.kernels.triton import moe_configs
from mixtral.kernels.triton.sorted_moe import invoke_w2, invoke_w13
from mixtral.kernels.triton.tune_moe import random_experts
from mixtral.kernels.triton.tune_sorted_moe import sorted_inputs


def zero_every(t: torch.Tensor, fraction: float) -> torch.Tensor:
    """A copy of t [R, C] with a ``fraction`` of its rows (evenly spread) set to zero."""
    out = t.clone()
    if fraction > 0:
        step = max(1, round(1 / fraction))
        out[::step] = 0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2048, help="prefill tokens (pairs = 2x)")
    ap.add_argument("--fractions", default="0,0.0625,0.5", help="comma-separated fractions of zero rows")
    ap.add_argument("--rounds", type=int, default=9, help="alternated timing rounds")
    ap.add_argument("--per-graph", type=int, default=10, help="launches captured back to back")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()
    dev = torch.device("cuda")
    e, f, d, k = 8, 14336, 4096, 2
    gen = torch.Generator(device=dev).manual_seed(0)
    w13, w2 = random_experts(e, f, d, torch.bfloat16, gen)
    xs, offs = sorted_inputs(args.tokens, e, d, k, torch.bfloat16, gen)  # [P, D], [E]
    p = xs.shape[0]
    act_in = torch.randn(p, f, device=dev, generator=gen, dtype=torch.bfloat16) * 0.1  # [P, F]
    cfg = moe_configs.get_sorted_config(e, f, d, args.tokens, torch.bfloat16, dev)
    act = torch.empty(p, f, device=dev, dtype=torch.bfloat16)
    y = torch.empty(p, d, device=dev, dtype=torch.bfloat16)
    graphs = {}
    for frac in (float(x) for x in args.fractions.split(",")):
        a13, a2 = zero_every(xs, frac), zero_every(act_in, frac)
        graphs[f"w13 zero {frac:.4f}"], _ = capture(lambda a=a13: [invoke_w13(
            a, w13, act, offs, cfg.block_m, cfg.w13, True, cfg.small_m) for _ in range(args.per_graph)])
        graphs[f"w2 zero {frac:.4f}"], _ = capture(lambda a=a2: [invoke_w2(
            a, w2, y, offs, cfg.block_m, cfg.w2, True, cfg.small_m) for _ in range(args.per_graph)])
    times: dict[str, list[float]] = {label: [] for label in graphs}
    order = list(graphs)
    for g in graphs.values():
        g.replay()
    for r in range(args.rounds):
        for label in order if r % 2 == 0 else order[::-1]:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graphs[label].replay()
            end.record()
            end.synchronize()
            times[label].append(start.elapsed_time(end) / args.per_graph * 1e3)  # us a launch
    summary = {label: {"median_us": statistics.median(ts), "best_us": min(ts)} for label, ts in times.items()}
    for label, s in summary.items():
        print(f"{label:20s} median {s['median_us']:8.1f} us  best {s['best_us']:8.1f} us")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "tokens": args.tokens, "config": cfg.to_dict(),
                       "summary": summary, "runs_us": times}, fh, indent=1)


if __name__ == "__main__":
    main()
