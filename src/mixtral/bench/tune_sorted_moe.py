"""Tune the prefill MoE's tiles (``kernels/triton/sorted_moe.py``) on this GPU; writes
``kernels/triton/configs/sorted_E{E}_F{F}_D{D}_{device}.json``.

    python -m mixtral.bench.tune_sorted_moe --model mixtral-8x7b

For each token count M it sorts one uniform random routing, then for each ``block_m`` times every candidate
tile of the w13 GEMM (SiLU·mul fused) and of the w2 GEMM on their own (``triton.testing.do_bench``, median),
and keeps the ``block_m`` whose two best GEMMs sum lowest; then tries giving each expert's short last
block a tile of its own (``small_m`` 32 or 64 rows; for w2 also paired across two column tiles). Tiles that
need more shared memory than a Hopper block has are not tried; one the compiler rejects is skipped. Prints
each GEMM's TFLOP/s (6 * D * F FLOPs per (token, expert) pair for both) and, for the winner, the same tiles
without TMA. Needs a CUDA GPU.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import torch

from mixtral.bench.tune_moe import _bench, random_experts, random_routing, run_tuner, tuning_inputs
from mixtral.kernels.triton.moe_configs import GemmConfig, MoEConfig, get_sorted_config
from mixtral.kernels.triton.moe_glue import sort_pairs
from mixtral.kernels.triton.sorted_moe import SMEM_BYTES, invoke_w2, invoke_w13, stage_bytes

DEFAULT_BATCHES = [512, 1024, 2048, 4096, 8192]
BLOCK_MS = (64, 128)
# (block_n, block_k, num_warps, num_stages[, split_k, warp_specialize, persistent, pair_small, joint]); split-K is
# never used here; joint w13 tiles multiply w1's and w3's tiles in one MMA of twice the width.
# Persistent tiles (persistent_moe.py) won 1-7% inside 32-layer prefills on an H200 at 1024, 4096 and 8192
# tokens; short bursts like these overrate them at 2048, where the engine saw no difference: confirm a
# persistent pick with scripts/gpu_prefill_tiles.py.
W13_TILES = [(128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 4), (64, 128, 4, 3), (128, 128, 8, 2),
             (256, 64, 8, 3), (64, 64, 8, 5), (128, 64, 8, 3, 1, True), (128, 64, 8, 4, 1, True),
             (256, 64, 8, 3, 1, True), (128, 64, 8, 4, 1, False, True), (256, 64, 8, 3, 1, True, True),
             (128, 64, 8, 3, 1, True, False, False, True), (128, 64, 8, 4, 1, True, False, False, True),
             (128, 64, 8, 3, 1, False, False, False, True), (128, 64, 8, 4, 1, False, True, False, True)]
W2_TILES = [(128, 64, 8, 3), (128, 64, 8, 4), (256, 64, 8, 3), (256, 64, 8, 4), (128, 128, 8, 3),
            (64, 64, 4, 4), (128, 64, 4, 4), (256, 64, 8, 3, 1, True), (256, 64, 8, 4, 1, True),
            (128, 64, 8, 4, 1, True), (256, 64, 8, 4, 1, False, True)]


def sorted_inputs(tokens: int, num_experts: int, dim: int, top_k: int, dtype: torch.dtype, gen: torch.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """A prefill's MoE input in expert order from uniform random routing, on ``gen``'s device: xs [P, D] (P =
    tokens * top_k rows, row r the token of sorted pair r) and the group ends offs [E] (the GPU scripts' input)."""
    x, _, ids = random_routing(tokens, num_experts, dim, top_k, dtype, gen)
    return sorted_rows(x, ids, num_experts)


def prefill_problem_8x7b(tokens: int, device: torch.device
                         ) -> tuple[torch.Generator, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, MoEConfig]:
    """The GPU scripts' prefill MoE at Mixtral-8x7B's shapes in bf16: (the seeded generator, w13, w2, xs [P, D],
    offs [E], the table's config for ``tokens`` on ``device``)."""
    e, f, d, k = 8, 14336, 4096, 2
    gen = torch.Generator(device=device).manual_seed(0)
    w13, w2 = random_experts(e, f, d, torch.bfloat16, gen)
    xs, offs = sorted_inputs(tokens, e, d, k, torch.bfloat16, gen)
    return gen, w13, w2, xs, offs, get_sorted_config(e, f, d, tokens, torch.bfloat16, device)


def sorted_rows(x: torch.Tensor, ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, D] gathered into expert order for routing ``ids`` [N, k]: xs [N * k, D] and the group ends [E]."""
    order, _, offs = sort_pairs(ids, num_experts)
    return x.index_select(0, order // ids.shape[1]), offs


def fits(block_m: int, tile: GemmConfig, weight_tiles: int, elem: int = 2) -> bool:
    """Whether the pipelined A tile and weight tiles (w13 loads two) fit one block's shared memory."""
    return tile.num_stages * stage_bytes(block_m, tile, weight_tiles, elem) <= SMEM_BYTES


def tune_shape(num_experts: int, ffn_dim: int, dim: int, top_k: int, batches: list[int], dtype: torch.dtype,
               device: torch.device, deadline: float) -> tuple[dict[int, MoEConfig], dict[int, float]]:
    """Best config and its time (us, both GEMMs) per token count; stops early past ``deadline``."""
    gen = torch.Generator(device=device).manual_seed(0)
    w13, w2 = random_experts(num_experts, ffn_dim, dim, dtype, gen)
    best: dict[int, MoEConfig] = {}
    times: dict[int, float] = {}
    for m, x, _, ids in tuning_inputs(num_experts, dim, top_k, batches, dtype, gen, deadline):
        xs, offs = sorted_rows(x, ids, num_experts)  # [P, D], [E]
        act = torch.randn(xs.shape[0], ffn_dim, device=device, generator=gen, dtype=dtype)  # [P, F]
        y = torch.empty(xs.shape[0], dim, device=device, dtype=dtype)  # [P, D]
        flops13, flops2 = 4 * xs.shape[0] * dim * ffn_dim, 2 * xs.shape[0] * dim * ffn_dim
        options: list[tuple[float, MoEConfig]] = []
        for block_m in BLOCK_MS:
            run13 = functools.partial(invoke_w13, xs, w13, act, offs, block_m)
            run2 = functools.partial(invoke_w2, act, w2, y, offs, block_m)
            t13 = [(_bench(functools.partial(run13, c, True)), c) for c in map(lambda t: GemmConfig(*t), W13_TILES)
                   if fits(block_m, c, 2)]
            t2 = [(_bench(functools.partial(run2, c, True)), c) for c in map(lambda t: GemmConfig(*t), W2_TILES)
                  if fits(block_m, c, 1)]
            a, c13 = min(t13, key=lambda t: t[0])
            b, c2 = min(t2, key=lambda t: t[0])
            print(f"  M={m:5d} block_m={block_m:3d}: w13 {a * 1e3:8.1f} us {flops13 / a / 1e9:5.0f} TFLOP/s {c13}"
                  f"  w2 {b * 1e3:8.1f} us {flops2 / b / 1e9:5.0f} TFLOP/s {c2}")
            options.append((a + b, MoEConfig(block_m, c13, c2)))
        total, cfg = min(options, key=lambda o: o[0])
        if total == float("inf"):
            continue
        # Each group's short last tile on its own; for w2 also paired across two column tiles (pair_small), which
        # keeps pace with the full tiles sharing its weights (fewer HBM bytes; on an H200 neutral to -1% inside
        # the engine, so confirm with scripts/gpu_prefill_tiles.py).
        base = cfg
        for small_m, pair in ((s, p) for s in (32, 64) if s < base.block_m for p in (False, True)):
            w2_tile = replace(base.w2, pair_small=pair)
            if pair and (base.w2.persistent or (dim // base.w2.block_n) % 2):
                continue
            alt = MoEConfig(base.block_m, base.w13, w2_tile, small_m)
            t = (_bench(functools.partial(invoke_w13, xs, w13, act, offs, alt.block_m, alt.w13, True, small_m))
                 + _bench(functools.partial(invoke_w2, act, w2, y, offs, alt.block_m, alt.w2, True, small_m)))
            print(f"  M={m:5d} small_m={small_m}{' paired' if pair else ''}: {t * 1e3:8.1f} us "
                  f"(against {total * 1e3:8.1f})")
            if t < total:
                total, cfg = t, alt
        best[m], times[m] = cfg, total * 1e3
        no_tma = (_bench(functools.partial(invoke_w13, xs, w13, act, offs, cfg.block_m, cfg.w13, False, cfg.small_m))
                  + _bench(functools.partial(invoke_w2, act, w2, y, offs, cfg.block_m, cfg.w2, False, cfg.small_m)))
        print(f"  M={m:5d} best {total * 1e3:8.1f} us = {(flops13 + flops2) / total / 1e9:5.0f} TFLOP/s for the two "
              f"GEMMs; same tiles without TMA {no_tma * 1e3:8.1f} us")
    return best, times


def main(argv: list[str] | None = None) -> int:
    return run_tuner(argv, __doc__ or "", DEFAULT_BATCHES, tune_shape, prefix="sorted_", what="the prefill MoE of ")


if __name__ == "__main__":
    raise SystemExit(main())
