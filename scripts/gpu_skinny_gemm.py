"""Tile sweep of the decode-size GEMM (kernels/triton/skinny_gemm.py) against cuBLAS on Mixtral's attention
projections, in GB/s of weight read. Needs a CUDA GPU; prints the best tile per (N, K) for ``CONFIGS``.

    PYTHONPATH=src python3 scripts/gpu_skinny_gemm.py --json skinny.json
"""

from __future__ import annotations

import argparse
import json

import torch
import triton

from mixtral.kernels.triton.skinny_gemm import skinny_gemm

SHAPES = {"8x7b wqkv": (6144, 4096), "8x7b wo": (4096, 4096), "8x22b wqkv": (8192, 6144), "8x22b wo": (6144, 6144)}
TILES = [(16, 256, 4, 4), (32, 256, 4, 4), (32, 128, 4, 5), (64, 128, 4, 4), (64, 256, 4, 3), (32, 512, 4, 3),
         (16, 512, 4, 3), (64, 128, 8, 4), (128, 64, 4, 4), (128, 128, 8, 3),
         # narrow tiles: more programs than SMs on the 4096- and 6144-row projections (H200 batch 1)
         (16, 256, 4, 6), (16, 512, 4, 4), (16, 1024, 4, 2), (16, 128, 4, 8), (32, 512, 4, 2), (16, 512, 8, 3)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="1,4,8,16")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
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
