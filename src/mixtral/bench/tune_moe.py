"""Tune the fused MoE tiles on this GPU and write ``kernels/triton/configs/E{E}_F{F}_D{D}_{device}.json`` per
model shape.

    python -m mixtral.bench.tune_moe --model mixtral-8x7b --model mixtral-8x22b

For each batch size M and each candidate ``block_m`` it aligns one random routing, times every candidate
tile of the w13 GEMM and of the w2 GEMM on their own (``triton.testing.do_bench``, median, L2 flushed
between runs so weights stream from HBM as in a real layer), and keeps the ``block_m`` whose two best
GEMMs sum lowest. Candidates are a short list per M range: small batches stream weights (16-row blocks,
wide reduction tiles, deep pipelines), large ones are matrix-bound (64-128-row blocks). A tile that does
not fit the chip (shared memory, registers) is skipped. Not a CI tool: it needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from mixtral.kernels.reference import route_topk
from mixtral.kernels.triton.fused_moe import invoke_w2, invoke_w13, layout_pairs, w2_partials
from mixtral.kernels.triton.moe_configs import (
    CONFIG_DIR,
    GemmConfig,
    MoEConfig,
    clear_config_cache,
    config_path,
    load_configs,
)
from mixtral.model.presets import PRESETS

DEFAULT_BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]

# (block_n, block_k, num_warps, num_stages[, split_k]); split-K only applies to w2 (w13's SiLU needs whole sums)
# The H200's faster memory needs more bytes in flight per SM: deeper pipelines and 512-wide K tiles.
_SMALL = [(32, 128, 4, 4), (64, 64, 4, 5), (64, 128, 4, 3), (64, 128, 4, 4), (64, 256, 4, 3), (128, 128, 4, 3),
          (32, 256, 4, 3), (32, 256, 4, 4), (32, 256, 4, 5), (32, 512, 4, 3), (16, 512, 4, 4), (32, 128, 4, 6)]
_SMALL_SPLIT = [(32, 256, 4, 3, 2), (64, 256, 4, 3, 2), (64, 128, 4, 4, 2), (32, 128, 4, 4, 4), (64, 128, 4, 3, 4),
                (16, 256, 4, 3, 1), (16, 128, 4, 4, 2), (32, 256, 4, 4, 2), (32, 256, 4, 3, 4), (64, 256, 4, 3, 4),
                (64, 128, 4, 4, 8), (32, 512, 4, 3, 4)]
_MID = [(64, 64, 4, 4), (64, 128, 4, 3), (128, 64, 4, 3), (128, 64, 8, 4), (128, 128, 8, 3)]
_LARGE = [(128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 4), (128, 128, 8, 3), (256, 64, 8, 3)]


def candidates(num_tokens: int) -> list[tuple[int, list[GemmConfig], list[GemmConfig]]]:
    """(block_m, w13 tiles, w2 tiles) to try at this batch size."""
    if num_tokens <= 32:
        small = [GemmConfig(*c) for c in _SMALL]
        return [(16, small, small + [GemmConfig(*c) for c in _SMALL_SPLIT])]
    if num_tokens <= 256:
        mid = [GemmConfig(*c) for c in _MID]
        return [(bm, mid, mid) for bm in (32, 64)]
    large = [GemmConfig(*c) for c in _LARGE]
    return [(bm, large, large) for bm in (64, 128)]


def _bench(fn: Callable[[], None]) -> float:
    """Median milliseconds of fn, or inf when the tile cannot launch on this chip."""
    import triton

    try:
        fn()
        torch.cuda.synchronize()
        return float(triton.testing.do_bench(fn, warmup=5, rep=15, return_mode="median"))
    except Exception as exc:  # out of shared memory / registers, or a tile the compiler rejects: skip it
        print(f"    skip: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
        return float("inf")


def random_experts(num_experts: int, ffn_dim: int, dim: int, dtype: torch.dtype, gen: torch.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """w13 [E, 2F, D] and w2 [E, D, F] with unit-variance outputs, on ``gen``'s device (the tuners' weights)."""
    w13 = torch.randn(num_experts, 2 * ffn_dim, dim, device=gen.device, generator=gen, dtype=dtype) * dim**-0.5
    w2 = torch.randn(num_experts, dim, ffn_dim, device=gen.device, generator=gen, dtype=dtype) * ffn_dim**-0.5
    return w13, w2


def tuning_inputs(num_experts: int, dim: int, top_k: int, batches: list[int], dtype: torch.dtype,
                  gen: torch.Generator, deadline: float
                  ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per token count M: (M, x [M, D], routing weights [M, k], ids [M, k]) from uniform random routing, until
    ``deadline`` (time.monotonic) passes."""
    for m in batches:
        if time.monotonic() > deadline:
            print(f"  time budget spent: stopping before M={m}")
            return
        yield m, *random_routing(m, num_experts, dim, top_k, dtype, gen)


def random_routing(tokens: int, num_experts: int, dim: int, top_k: int, dtype: torch.dtype, gen: torch.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [tokens, D] and a uniform random routing of it: weights [tokens, k] fp32, ids [tokens, k], on
    ``gen``'s device."""
    x = torch.randn(tokens, dim, device=gen.device, generator=gen, dtype=dtype)
    weights, ids = route_topk(torch.randn(tokens, num_experts, device=gen.device, generator=gen), top_k)
    return x, weights, ids


def tune_shape(num_experts: int, ffn_dim: int, dim: int, top_k: int, batches: list[int], dtype: torch.dtype,
               device: torch.device, deadline: float) -> tuple[dict[int, MoEConfig], dict[int, float]]:
    """Best config and its time (us) per batch size; stops early (keeping what it has) past ``deadline``."""
    gen = torch.Generator(device=device).manual_seed(0)
    w13, w2 = random_experts(num_experts, ffn_dim, dim, dtype, gen)
    best: dict[int, MoEConfig] = {}
    times: dict[int, float] = {}
    for m, x, weights, ids in tuning_inputs(num_experts, dim, top_k, batches, dtype, gen, deadline):
        flat_w = weights.reshape(-1).contiguous()
        act = torch.empty(m * top_k, ffn_dim, device=device, dtype=dtype)
        options: list[tuple[float, MoEConfig]] = []
        for block_m, tiles13, tiles2 in candidates(m):
            layout = layout_pairs(ids, num_experts, block_m)  # the engine's layout for this batch
            run13 = functools.partial(invoke_w13, x, w13, act, layout, top_k, block_m)
            a, c13 = min(((_bench(functools.partial(run13, cfg=c)), c) for c in tiles13), key=lambda t: t[0])
            timed2 = []
            for c in tiles2:
                out = w2_partials(m * top_k, dim, c, dtype, device)  # [split_k, N*k, D]
                run2 = functools.partial(invoke_w2, act, w2, out, flat_w, layout, block_m, c)
                timed2.append((_bench(run2), c))
            b, c2 = min(timed2, key=lambda t: t[0])
            print(f"  M={m:5d} block_m={block_m:3d}: w13 {a * 1e3:9.1f} us {c13}  w2 {b * 1e3:9.1f} us {c2}")
            options.append((a + b, MoEConfig(block_m, c13, c2)))
        total, cfg = min(options, key=lambda o: o[0])
        if total != float("inf"):
            best[m], times[m] = cfg, total * 1e3
    return best, times


def write_configs(path: Path, best: dict[int, MoEConfig], times: dict[int, float], meta: dict[str, Any],
                  merge: bool = False) -> None:
    """Write the table; with ``merge`` the file's entries for other batch sizes, and its other keys (notes
    such as which entries were borrowed), are kept."""
    old: dict[str, Any] = {}
    if merge and path.is_file():
        old = json.loads(path.read_text())
        best = {**{int(m): c for m, c in (load_configs(path) or {}).items()}, **best}
        times = {**{int(m): t for m, t in old.get("time_us", {}).items()}, **times}
    data = {**old, **meta, "configs": {str(m): c.to_dict() for m, c in sorted(best.items())},
            "time_us": {str(m): round(t, 1) for m, t in sorted(times.items())}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    clear_config_cache()  # the next lookup reads the new file


TuneShape = Callable[[int, int, int, int, list[int], torch.dtype, torch.device, float],
                     tuple[dict[int, MoEConfig], dict[int, float]]]


def run_tuner(argv: list[str] | None, doc: str, default_batches: list[int], tune: TuneShape, prefix: str = "",
              what: str = "") -> int:
    """The command line shared by this tuner and ``tune_sorted_moe``: per preset shape, ``tune`` the token
    counts within the time budget and write ``configs/{prefix}E{E}_F{F}_D{D}_{device}.json``."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=None,
                   help="preset whose MoE shape to tune (repeatable; default mixtral-8x7b and mixtral-8x22b)")
    p.add_argument("--batch-sizes", default=",".join(map(str, default_batches)),
                   help="comma-separated token counts M to tune")
    p.add_argument("--out-dir", type=Path, default=CONFIG_DIR, help="folder for the JSON files")
    p.add_argument("--merge", action="store_true",
                   help="keep the existing file's entries for token counts not tuned in this run")
    p.add_argument("--time-budget", type=float, default=400.0,
                   help="seconds for all shapes; past it the remaining token counts are left to the nearest M")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("tuning needs a CUDA GPU")
    import triton

    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    batches = [int(b) for b in args.batch_sizes.split(",") if b]
    models = args.model or ["mixtral-8x7b", "mixtral-8x22b"]
    start = time.monotonic()
    for i, model in enumerate(models):
        margs = PRESETS[model]
        deadline = start + args.time_budget * (i + 1) / len(models)  # share the budget among the shapes
        print(f"{name}: tuning {what}{model} (E={margs.num_experts} F={margs.hidden_dim} D={margs.dim})")
        best, times = tune(margs.num_experts, margs.hidden_dim, margs.dim, margs.num_experts_per_tok, batches,
                           torch.bfloat16, device, deadline)
        if not best:
            print(f"  nothing tuned for {model}")
            continue
        out = args.out_dir / config_path(margs.num_experts, margs.hidden_dim, margs.dim, name, prefix).name
        write_configs(out, best, times, {
            "device": name, "model": model, "E": margs.num_experts, "F": margs.hidden_dim, "D": margs.dim,
            "dtype": "bf16", "path": "sorted_moe" if prefix else "fused_moe", "torch": torch.__version__,
            "triton": triton.__version__, "date": time.strftime("%Y-%m-%d"),
        }, merge=args.merge)
        print(f"  wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_tuner(argv, __doc__ or "", DEFAULT_BATCHES, tune_shape)


if __name__ == "__main__":
    raise SystemExit(main())
