"""Tile sweep of the decode-size GEMM (kernels/triton/skinny_gemm.py) against cuBLAS on Mixtral's attention
projections, in GB/s of weight read. Needs a CUDA GPU; prints the best tile per (N, K) for ``CONFIGS``.

    PYTHONPATH=src python3 scripts/gpu_skinny_gemm.py --json skinny.json
    PYTHONPATH=src python3 scripts/gpu_skinny_gemm.py --graph --json skinny_graph.json

``--graph`` times what the decode step sees instead of one launch at a time: a CUDA graph of 32 layers of
(norm, wqkv, norm, wo) at batch 1, each layer its own weights (no L2 reuse), with PDL as the engine runs it;
one projection's tile varies while the other keeps its default.
"""

from __future__ import annotations

import argparse
import functools
import json

import torch
import triton

from mixtral.bench.cuda_timing import graph_ms
from mixtral.kernels.triton.skinny_gemm import skinny_gemm

SHAPES = {"8x7b wqkv": (6144, 4096), "8x7b wo": (4096, 4096), "8x22b wqkv": (8192, 6144), "8x22b wo": (6144, 6144)}
TILES = [(16, 256, 4, 4), (32, 256, 4, 4), (32, 128, 4, 5), (64, 128, 4, 4), (64, 256, 4, 3), (32, 512, 4, 3),
         (16, 512, 4, 3), (64, 128, 8, 4), (128, 64, 4, 4), (128, 128, 8, 3),
         # narrow tiles: more programs than SMs on the 4096- and 6144-row projections (H200 batch 1)
         (16, 256, 4, 6), (16, 512, 4, 4), (16, 1024, 4, 2), (16, 128, 4, 8), (32, 512, 4, 2), (16, 512, 8, 3)]


def _chain(x: torch.Tensor, w_qkv: list[torch.Tensor], w_o: list[torch.Tensor], norm_d: torch.Tensor,
           norm_q: torch.Tensor, t_qkv: tuple[int, int, int, int], t_o: tuple[int, int, int, int]) -> None:
    from mixtral.kernels.triton.rmsnorm import rms_norm

    h, d = x, x.shape[1]
    for lq, lo in zip(w_qkv, w_o, strict=True):
        y = skinny_gemm(rms_norm(h, norm_d, 1e-5), lq, t_qkv)  # [M, qkv rows]
        h = skinny_gemm(rms_norm(y, norm_q, 1e-5)[:, :d], lo, t_o)  # [M, D]


def graph_sweep(rows: int, layers: int) -> dict[str, object]:
    """us per layer of the (norm, wqkv, norm, wo) chain per tile of each projection, in a CUDA graph."""
    from mixtral.kernels.triton.skinny_gemm import CONFIGS, DEFAULT

    dev = torch.device("cuda")
    out: dict[str, object] = {}
    for model, (qkv, wo) in {"8x7b": ((6144, 4096), (4096, 4096)), "8x22b": ((8192, 6144), (6144, 6144))}.items():
        d = qkv[1]
        w_qkv = [torch.randn(qkv, device=dev, dtype=torch.bfloat16) * d**-0.5 for _ in range(layers)]
        w_o = [torch.randn(wo, device=dev, dtype=torch.bfloat16) * d**-0.5 for _ in range(layers)]
        norm_d = torch.ones(d, device=dev, dtype=torch.bfloat16)
        norm_q = torch.ones(qkv[0], device=dev, dtype=torch.bfloat16)
        x = torch.randn(rows, d, device=dev, dtype=torch.bfloat16)
        bytes_layer = (qkv[0] * qkv[1] + wo[0] * wo[1]) * 2
        base = {"qkv": CONFIGS.get(qkv, DEFAULT), "o": CONFIGS.get(wo, DEFAULT)}

        for which in ("qkv", "o"):
            for t in TILES:
                tiles = dict(base, **{which: t})
                try:
                    ms = graph_ms(functools.partial(_chain, x, w_qkv, w_o, norm_d, norm_q, tiles["qkv"], tiles["o"]))
                except Exception as exc:  # a tile that does not fit
                    print(f"{model} {which} {t}: {type(exc).__name__}: {str(exc)[:80]}")
                    continue
                us = ms * 1e3 / layers
                key = f"{model} {which} {t}"
                out[key] = us
                print(f"graph {key:32s} {us:7.2f} us a layer ({bytes_layer / us / 1e3:6.0f} GB/s)", flush=True)
        for which in ("qkv", "o"):
            mine = {k: v for k, v in out.items() if k.startswith(f"{model} {which} ")}
            pick = min(mine, key=mine.get)  # type: ignore[arg-type]
            print(f"== graph {model} {which}: best {pick} {mine[pick]:.2f} us a layer")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="1,4,8,16", help="batch sizes of the one-launch sweep")
    ap.add_argument("--graph", action="store_true", help="time 32-layer CUDA-graph chains at batch 1 instead")
    ap.add_argument("--layers", type=int, default=32, help="layers in each --graph chain")
    ap.add_argument("--json", default=None, help="write every timing here")
    args = ap.parse_args()
    if args.graph:
        res = graph_sweep(1, args.layers)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"device": torch.cuda.get_device_name(), "graph_us_per_layer": res}, fh, indent=1)
        return
    dev = torch.device("cuda")
    rows_list = [int(r) for r in args.rows.split(",")]
    results = []
    best: dict[str, object] = {}
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * k**-0.5
        totals: dict[str, float] = {}
        for m in rows_list:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            ref = (x.float() @ w.float().T)
            variants = {"cublas": lambda x=x, w=w: torch.nn.functional.linear(x, w)}
            for t in TILES:
                variants[str(t)] = lambda x=x, t=t, w=w: skinny_gemm(x, w, t)
            for label, fn in variants.items():
                try:
                    err = ((fn().float() - ref).norm() / ref.norm()).item()
                    ms = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
                except Exception as exc:  # a tile that does not fit: skip it
                    print(f"{name} M={m} {label}: {type(exc).__name__}: {str(exc)[:80]}")
                    continue
                gbs = n * k * 2 / ms / 1e6
                results.append({"shape": name, "N": n, "K": k, "M": m, "variant": label, "us": ms * 1e3,
                                "GBs": gbs, "rel_err": err})
                totals[label] = totals.get(label, 0.0) + ms * 1e3
                print(f"{name:11s} M={m:2d} {label:22s} {ms * 1e3:7.1f} us {gbs:7.0f} GB/s err {err:.1e}", flush=True)
        tiles = {lab: t for lab, t in totals.items() if lab != "cublas"}
        pick = min(tiles, key=tiles.get)  # type: ignore[arg-type]
        best[name] = {"N": n, "K": k, "tile": pick, "sum_us": round(tiles[pick], 1),
                      "cublas_sum_us": round(totals.get("cublas", float("nan")), 1)}
        print(f"== {name}: best {pick} sum {tiles[pick]:.1f} us over M={rows_list}; cuBLAS {totals.get('cublas'):.1f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": results, "best": best}, fh, indent=1)


if __name__ == "__main__":
    main()
