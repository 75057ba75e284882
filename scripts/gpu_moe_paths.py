"""Prefill-sized MoE: the large-M expert paths side by side (sorted-row Triton GEMMs with and without TMA, the
Triton decode kernel, CUTLASS grouped, cuBLAS per expert), TFLOP/s and agreement with the reference. Needs a
CUDA GPU.

    PYTHONPATH=src python3 scripts/gpu_moe_paths.py --tokens 512,1024,2048,4096
"""

from __future__ import annotations

import argparse
import json

import torch
import triton

from mixtral.kernels.expert_gemms_moe import expert_gemms_moe
from mixtral.kernels.grouped_mm_moe import grouped_mm_moe
from mixtral.kernels.reference import moe_reference, route_topk
from mixtral.kernels.triton.fused_moe import fused_moe
from mixtral.kernels.triton.sorted_moe import sorted_moe


def breakdown(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, w: torch.Tensor, ids: torch.Tensor,
              flops: int) -> dict[str, object]:
    """Microseconds of each step of sorted_moe alone (tuned tiles), and of the whole."""
    from mixtral.kernels.grouped_mm_moe import combine, sort_pairs
    from mixtral.kernels.triton import sorted_moe as sm
    from mixtral.kernels.triton.moe_configs import get_sorted_config

    e, two_f, d = w13.shape
    k = ids.shape[1]
    cfg = get_sorted_config(e, two_f // 2, d, x.shape[0], x.dtype, x.device)
    order, row_of_pair, offs = sort_pairs(ids, e)
    xs = x.index_select(0, order // k)
    act = torch.empty(xs.shape[0], two_f // 2, device=x.device, dtype=x.dtype)
    y = torch.empty(xs.shape[0], d, device=x.device, dtype=x.dtype)
    sm.invoke_w13(xs, w13, act, offs, cfg.block_m, cfg.w13, True)
    steps = {
        "sort_pairs": lambda: sort_pairs(ids, e),
        "gather_x": lambda: x.index_select(0, order // k),
        "w13": lambda: sm.invoke_w13(xs, w13, act, offs, cfg.block_m, cfg.w13, True),
        "w2": lambda: sm.invoke_w2(act, w2, y, offs, cfg.block_m, cfg.w2, True),
        "combine": lambda: combine(y, row_of_pair, w, offs[-1:]),
        "whole": lambda: sm.sorted_moe(x, w13, w2, w, ids),
    }
    row: dict[str, object] = {"tokens": x.shape[0], "breakdown": "sorted", "config": cfg.to_dict()}
    # Expert parallel: each half of the experts adds only its pairs; the halves sum to the whole.
    ref = moe_reference(x, w13, w2, w, ids).float()
    halves = sum(sm.sorted_moe(x, w13[s:s + e // 2], w2[s:s + e // 2], w, ids, s).float() for s in (0, e // 2))
    row["ep_halves_rel_err"] = ((halves - ref).norm() / ref.norm()).item()
    for name, fn in steps.items():
        row[name] = round(triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median") * 1e3, 1)
    row["TFLOPs_gemms"] = flops / (row["w13"] + row["w2"]) / 1e6  # type: ignore[operator]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="512,1024,2048,4096", help="comma-separated token counts to time")
    ap.add_argument("--dim", type=int, default=4096, help="model dimension D (8x7B: 4096)")
    ap.add_argument("--ffn", type=int, default=14336, help="expert hidden dimension F (8x7B: 14336)")
    ap.add_argument("--json", default=None, help="write the timings and errors here")
    ap.add_argument("--breakdown", action="store_true", help="also time each step of sorted_moe on its own")
    args = ap.parse_args()
    dev, dt, e, k = torch.device("cuda"), torch.bfloat16, 8, 2
    d, f = args.dim, args.ffn
    gen = torch.Generator(device=dev).manual_seed(0)
    w13 = torch.randn(e, 2 * f, d, device=dev, dtype=dt, generator=gen) * d**-0.5
    w2 = torch.randn(e, d, f, device=dev, dtype=dt, generator=gen) * f**-0.5
    paths = {"sorted": sorted_moe, "sorted_no_tma": lambda *a: sorted_moe(*a, use_tma=False), "triton": fused_moe,
             "grouped_mm": grouped_mm_moe, "expert_gemms": expert_gemms_moe}
    rows = []
    for m in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(m, d, device=dev, dtype=dt, generator=gen)
        w, ids = route_topk(torch.randn(m, e, device=dev, generator=gen), k)
        flops = m * k * 6 * d * f
        ref = moe_reference(x, w13, w2, w, ids).float()
        for name, fn in paths.items():
            try:
                out = fn(x, w13, w2, w, ids).float()
                err = ((out - ref).norm() / ref.norm()).item()
                ms = triton.testing.do_bench(lambda fn=fn, x=x, w=w, ids=ids: fn(x, w13, w2, w, ids),
                                             warmup=10, rep=100,
                                             return_mode="median")
                row = {"tokens": m, "path": name, "us": ms * 1e3, "TFLOPs": flops / ms / 1e9, "rel_err": err}
            except Exception as exc:  # one path failing must not hide the others
                row = {"tokens": m, "path": name, "error": f"{type(exc).__name__}: {exc}"}
            rows.append(row)
            print(row, flush=True)
        if args.breakdown:
            rows.append(breakdown(x, w13, w2, w, ids, flops))
            print(rows[-1], flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
