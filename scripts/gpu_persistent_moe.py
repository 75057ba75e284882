"""Persistent prefill-MoE GEMMs (``persistent_moe.py``) against the tuned non-persistent tiles, under sustained
load: each candidate is a CUDA graph of ``--per-graph`` back-to-back launches, candidates alternate over
rounds (order reversed every other round), so clocks and power treat them alike. Checks every candidate's
output against the tuned kernel's first (rows unwritten would stay NaN).

    PYTHONPATH=src python3 scripts/gpu_persistent_moe.py --tokens 2048 --json out.json --emit cands.json

``--emit`` writes the best w13 and w2 candidates combined as ``gpu_prefill_tiles.py --candidates`` input.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from mixtral.bench.cuda_timing import capture
from mixtral.kernels.grouped_mm_moe import sort_pairs
from mixtral.kernels.reference import route_topk
from mixtral.kernels.triton import moe_configs
from mixtral.kernels.triton.moe_configs import GemmConfig, MoEConfig
from mixtral.kernels.triton.sorted_moe import invoke_w2, invoke_w13
from mixtral.kernels.triton.tune_moe import random_experts


def _p(bn: int, bk: int, warps: int, stages: int, flatten: bool = True, ws: bool = False) -> GemmConfig:
    return GemmConfig(bn, bk, warps, stages, 1, ws, persistent=True, flatten=flatten)


Candidates = dict[str, tuple[int, int, GemmConfig]]


def candidates(tuned: MoEConfig) -> tuple[Candidates, Candidates]:
    """(w13, w2) candidates as label -> (block_m, small_m, tile)."""
    w13 = {
        "tuned": (tuned.block_m, tuned.small_m, tuned.w13),
        "tuned, no small": (tuned.block_m, 0, tuned.w13),
        "P bm128 128x64 s4 flat": (128, 0, _p(128, 64, 8, 4)),
        "P bm128 128x64 s3 flat": (128, 0, _p(128, 64, 8, 3)),
        "P bm128 128x64 s4": (128, 0, _p(128, 64, 8, 4, flatten=False)),
        "P bm128 128x64 s4 ws": (128, 0, _p(128, 64, 8, 4, flatten=False, ws=True)),
        "P bm64 256x64 s3 flat": (64, 0, _p(256, 64, 8, 3)),
        "P bm64 128x64 s4 w4 flat": (64, 0, _p(128, 64, 4, 4)),
        "P bm64 128x64 s5 w8 flat": (64, 0, _p(128, 64, 8, 5)),
    }
    w2 = {
        "tuned": (tuned.block_m, tuned.small_m, tuned.w2),
        "tuned, no small": (tuned.block_m, 0, tuned.w2),
        "P bm128 256x64 s4 flat": (128, 0, _p(256, 64, 8, 4)),
        "P bm128 256x64 s3 flat": (128, 0, _p(256, 64, 8, 3)),
        "P bm128 256x64 s4": (128, 0, _p(256, 64, 8, 4, flatten=False)),
        "P bm128 256x64 s4 ws": (128, 0, _p(256, 64, 8, 4, flatten=False, ws=True)),
        "P bm128 128x64 s4 flat": (128, 0, _p(128, 64, 8, 4)),
        "P bm64 256x64 s4 flat": (64, 0, _p(256, 64, 8, 4)),
    }
    return w13, w2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2048, help="tokens of the prefill (pairs = 2x)")
    ap.add_argument("--rounds", type=int, default=7, help="alternated timing rounds")
    ap.add_argument("--per-graph", type=int, default=10, help="launches captured back to back per candidate")
    ap.add_argument("--json", default=None, help="write the figures here")
    ap.add_argument("--emit", default=None, help="write the best combinations for gpu_prefill_tiles here")
    args = ap.parse_args()
    dev = torch.device("cuda")
    e, f, d, k = 8, 14336, 4096, 2
    gen = torch.Generator(device=dev).manual_seed(0)
    w13, w2 = random_experts(e, f, d, torch.bfloat16, gen)
    x = torch.randn(args.tokens, d, device=dev, generator=gen, dtype=torch.bfloat16)
    _, ids = route_topk(torch.randn(args.tokens, e, device=dev, generator=gen), k)
    order, _, offs = sort_pairs(ids, e)
    xs = x.index_select(0, order // k)  # [P, D]
    p = xs.shape[0]
    act_in = torch.randn(p, f, device=dev, generator=gen, dtype=torch.bfloat16) * 0.1  # w2's input [P, F]
    tuned = moe_configs.get_sorted_config(e, f, d, args.tokens, torch.bfloat16, dev)
    c13, c2 = candidates(tuned)
    useful = {"w13": 4 * p * d * f, "w2": 2 * p * d * f}
    report: dict[str, dict[str, object]] = {}
    for gemm, cands in (("w13", c13), ("w2", c2)):
        outs: dict[str, torch.Tensor] = {}
        graphs = {}
        for label, (bm, small, cfg) in cands.items():
            out = torch.full((p, f if gemm == "w13" else d), float("nan"), device=dev, dtype=torch.bfloat16)

            def run(bm: int = bm, small: int = small, cfg: GemmConfig = cfg, out: torch.Tensor = out,
                    gemm: str = gemm) -> None:
                if gemm == "w13":
                    invoke_w13(xs, w13, out, offs, bm, cfg, True, small)
                else:
                    invoke_w2(act_in, w2, out, offs, bm, cfg, True, small)

            try:
                run()
                torch.cuda.synchronize()
            except Exception as exc:  # a tile this chip or compiler rejects
                print(f"{gemm} {label}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)
                continue
            outs[label] = out.clone()
            graphs[label], _ = capture(lambda run=run: [run() for _ in range(args.per_graph)])
        ref = outs["tuned"].float()
        errors = {label: ((o.float() - ref).norm() / ref.norm()).item() if not o.isnan().any() else float("nan")
                  for label, o in outs.items()}
        times: dict[str, list[float]] = {label: [] for label in graphs}
        for g in graphs.values():
            g.replay()
        order_l = list(graphs)
        for r in range(args.rounds):
            for label in order_l if r % 2 == 0 else order_l[::-1]:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                graphs[label].replay()
                end.record()
                end.synchronize()
                times[label].append(start.elapsed_time(end) / args.per_graph)
        for label, ts in times.items():
            med = statistics.median(ts)
            bm, small, cfg = cands[label]
            report[f"{gemm} {label}"] = {"gemm": gemm, "label": label, "block_m": bm, "small_m": small,
                                         "config": cfg.__dict__, "median_ms": med, "best_ms": min(ts),
                                         "TFLOPs": useful[gemm] / med / 1e9, "rel_err_vs_tuned": errors[label]}
            print(f"{gemm} {label:28s} {med * 1e3:8.1f} us {useful[gemm] / med / 1e9:6.0f} TFLOP/s "
                  f"(best {min(ts) * 1e3:7.1f}) err {errors[label]:.1e}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "tokens": args.tokens, "results": report}, fh,
                      indent=1)
    if args.emit:
        def best(gemm: str, block_m: int) -> tuple[str, dict[str, object]] | None:
            ok = [r for r in report.values() if r["gemm"] == gemm and r["block_m"] == block_m
                  and r["rel_err_vs_tuned"] == r["rel_err_vs_tuned"] and r["rel_err_vs_tuned"] < 1e-2]
            return min(((str(r["label"]), r) for r in ok), key=lambda t: t[1]["median_ms"], default=None)

        combos: dict[str, dict[str, object]] = {}
        for bm in (64, 128):
            b13, b2 = best("w13", bm), best("w2", bm)
            if b13 and b2 and (b13[0].startswith("P") or b2[0].startswith("P")):
                small = max(int(b13[1]["small_m"]), int(b2[1]["small_m"]))  # type: ignore[call-overload]
                combos[f"bm{bm}: {b13[0]} + {b2[0]}"] = MoEConfig(
                    bm, GemmConfig(**b13[1]["config"]), GemmConfig(**b2[1]["config"]), small).to_dict()  # type: ignore[arg-type]
        with open(args.emit, "w") as fh:
            json.dump(combos, fh, indent=1)
        print(f"candidates for gpu_prefill_tiles: {list(combos)}")


if __name__ == "__main__":
    main()
