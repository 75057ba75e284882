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

from mixtral.bench.cuda_timing import alternated_replays, capture
from mixtral.bench.tune_sorted_moe import prefill_problem_8x7b
from mixtral.kernels.triton.sorted_moe import invoke_w2, invoke_w13


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
    gen, w13, w2, xs, offs, cfg = prefill_problem_8x7b(args.tokens, dev)  # xs [P, D], offs [E]
    p, f, d = xs.shape[0], w2.shape[2], w2.shape[1]
    act_in = torch.randn(p, f, device=dev, generator=gen, dtype=torch.bfloat16) * 0.1  # [P, F]
    act = torch.empty(p, f, device=dev, dtype=torch.bfloat16)
    y = torch.empty(p, d, device=dev, dtype=torch.bfloat16)
    graphs = {}
    for frac in (float(x) for x in args.fractions.split(",")):
        a13, a2 = zero_every(xs, frac), zero_every(act_in, frac)
        graphs[f"w13 zero {frac:.4f}"], _ = capture(lambda a=a13: [invoke_w13(
            a, w13, act, offs, cfg.block_m, cfg.w13, True, cfg.small_m) for _ in range(args.per_graph)])
        graphs[f"w2 zero {frac:.4f}"], _ = capture(lambda a=a2: [invoke_w2(
            a, w2, y, offs, cfg.block_m, cfg.w2, True, cfg.small_m) for _ in range(args.per_graph)])
    times = {label: [ms / args.per_graph * 1e3 for ms in ts]  # us a launch
             for label, ts in alternated_replays(graphs, args.rounds).items()}
    summary = {label: {"median_us": statistics.median(ts), "best_us": min(ts)} for label, ts in times.items()}
    for label, s in summary.items():
        print(f"{label:20s} median {s['median_us']:8.1f} us  best {s['best_us']:8.1f} us")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "tokens": args.tokens, "config": cfg.to_dict(),
                       "summary": summary, "runs_us": times}, fh, indent=1)


if __name__ == "__main__":
    main()
