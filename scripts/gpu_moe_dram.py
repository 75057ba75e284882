"""The prefill MoE GEMMs' and cuBLAS's HBM traffic, for ``ncu``: one launch of each at a prefill's shapes.

    ncu --clock-control none --metrics dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum \\
        python3 scripts/gpu_moe_dram.py --tokens 2048

Each expert's weights must come from HBM at least once (w13 1.88 GB, w2 0.94 GB for 8x7B): DRAM bytes read
well above that mean weight tiles fell out of L2 between the row tiles that share them. The dense cuBLAS
GEMMs (x [P, D] . w1^T of one expert, [P, F] . w2^T) are the yardstick.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from mixtral.bench.tune_sorted_moe import prefill_problem_8x7b
from mixtral.kernels.triton.sorted_moe import invoke_w2, invoke_w13


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2048, help="prefill tokens (pairs = 2x)")
    ap.add_argument("--w2-variants", action="store_true",
                    help="also launch w2 with paired short tiles, without short tiles, persistent, with 128-wide "
                         "and with 64-row tiles (after the others, in that order)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    _, w13, w2, xs, offs, cfg = prefill_problem_8x7b(args.tokens, dev)  # xs [P, D], offs [E]
    p, e, f, d = xs.shape[0], w13.shape[0], w2.shape[2], w2.shape[1]
    act = torch.empty(p, f, device=dev, dtype=torch.bfloat16)  # [P, F]
    y = torch.empty(p, d, device=dev, dtype=torch.bfloat16)  # [P, D]
    persistent = replace(cfg.w13, persistent=True)  # the same tiles in the persistent kernel
    for _ in range(2):  # compile first; ncu then sees the second launch of each too
        invoke_w13(xs, w13, act, offs, cfg.block_m, cfg.w13, True, cfg.small_m)
        invoke_w2(act, w2, y, offs, cfg.block_m, cfg.w2, True, cfg.small_m)
        invoke_w13(xs, w13, act, offs, cfg.block_m, persistent, True, 0)  # the persistent kernel, same tiles
        torch.matmul(xs, w13.view(e * 2 * f, d)[: 2 * f].T)  # dense [P, 2F]: one expert's w1 and w3 for all rows
        torch.matmul(act, w2[0].T)  # dense [P, D]
    if args.w2_variants:
        variants = [(cfg.block_m, cfg.small_m, replace(cfg.w2, pair_small=True)),
                    (cfg.block_m, 0, cfg.w2), (cfg.block_m, 0, replace(cfg.w2, persistent=True)),
                    (cfg.block_m, cfg.small_m, replace(cfg.w2, block_n=128)), (64, 0, cfg.w2)]
        for _ in range(2):
            for block_m, small_m, tile in variants:
                invoke_w2(act, w2, y, offs, block_m, tile, True, small_m)
        print("w2 variants, in launch order: " + "; ".join(f"block_m {bm} small_m {sm} {t}" for bm, sm, t in variants))
    torch.cuda.synchronize()
    print(f"tokens {args.tokens}, rows {p}, config {cfg}; minimum weight bytes: w13 {w13.numel() * 2 / 1e9:.2f} "
          f"GB, w2 {w2.numel() * 2 / 1e9:.2f} GB; dense w13 {2 * f * d * 2 / 1e9:.3f} GB, "
          f"dense w2 {d * f * 2 / 1e9:.3f} GB")


if __name__ == "__main__":
    main()
