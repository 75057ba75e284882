#!/usr/bin/env python3
"""Prefill-sized MoE on the GPU: the Triton fused kernel (tuned and a sweep of larger tiles) against the
CUTLASS grouped GEMMs of kernels/grouped_mm_moe.py and the per-expert cuBLAS path, in TFLOP/s and % of the
bf16 peak (issue #5).

For Mixtral-8x7B (D 4096, F 14336) and 8x22B (D 6144, F 16384) expert shapes, 8 experts, top-2, bf16, and M
tokens in {256 .. 8192} with uniform random routing (route_topk of random logits), it times:
  triton-tuned       ``fused_moe`` with the tuned config for the nearest M (configs/*.json);
  triton-sweep-i     ``fused_moe(config=MoEConfig(...))`` for a dozen larger tiles that fit shared memory;
  grouped_mm         ``grouped_mm_moe`` (sort, two ``torch._grouped_mm``, SiLU·mul, weighted top-k sum);
  expert_gemms       ``expert_gemms_moe`` (same glue, one cuBLAS GEMM per expert after one host sync);
  grouped_gemms_only just the two grouped GEMMs on pre-sorted inputs (the rest is glue: the difference);
  dense_ceiling      two dense cuBLAS matmuls of the same FLOPs (one expert's weights; not MoE, no check).
FLOPs per (token, expert) pair: 2*D*2F (w13) + 2*F*D (w2) = 6*D*F; time is the median of
``triton.testing.do_bench`` (the weights, GBs, dwarf the L2 anyway). Every MoE variant's output is compared
with ``moe_reference`` on the same inputs (norm-relative and max-relative error), so a wrong-but-fast kernel
shows as BAD. A variant that fails to compile or run prints its error and the run goes on.
Before the timings, per model: expert-parallel halves of grouped_mm_moe against the reference, a CUDA-graph
capture + replay of it, the ``ops.fused_moe`` threshold, and each step of grouped_mm_moe timed alone at
``--breakdown-m`` tokens (with cuBLAS-per-expert GEMMs beside the grouped ones).
Last it prints a summary per model and the smallest M from which grouped_mm (compare ``ops.SORTED_MIN_TOKENS``)
and expert_gemms beat tuned Triton. About 70 s on an H100 (``--quick``:
4 sweep tiles; timings vary by +-7% between runs and machines, so compare within one run).

    PYTHONPATH=src python3 scripts/gpu_moe_prefill.py --json moe_prefill.json --commit $(git rev-parse --short HEAD)
    python scripts/gpu_moe_prefill.py --device cpu --tiny       # CPU smoke check of the plumbing only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

MODELS = {"8x7b": (4096, 14336), "8x22b": (6144, 16384)}  # name -> (D, F)
TINY_MODELS = {"tiny": (32, 64)}
TOKENS = [256, 512, 1024, 2048, 4096, 8192]
TINY_TOKENS = [8, 40]
NUM_EXPERTS, TOP_K = 8, 2
SMEM_LIMIT = 227 * 1024  # bytes of shared memory a Hopper block may use

# (block_m, w13 (block_n, block_k, warps, stages), w2 (block_n, block_k, warps, stages)); kept under SMEM_LIMIT
SWEEP = [
    (64, (128, 64, 4, 4), (128, 64, 4, 4)),
    (128, (128, 64, 8, 3), (128, 64, 8, 3)),
    (128, (128, 64, 8, 4), (256, 64, 8, 3)),
    (128, (128, 64, 8, 3), (256, 64, 8, 4)),
    (64, (128, 64, 8, 5), (256, 64, 8, 4)),
    (64, (256, 64, 8, 3), (256, 64, 8, 3)),
    (64, (64, 128, 4, 4), (128, 128, 8, 4)),
    (128, (64, 128, 8, 3), (128, 128, 8, 3)),
    (128, (128, 64, 4, 4), (128, 64, 4, 4)),
    (128, (64, 64, 4, 5), (128, 64, 8, 5)),
    (64, (128, 64, 8, 4), (128, 128, 8, 3)),
    (64, (256, 64, 8, 3), (128, 64, 4, 5)),
]
QUICK_SWEEP = [SWEEP[1], SWEEP[2], SWEEP[3], SWEEP[6]]
TINY_SWEEP = [(16, (32, 32, 4, 2), (32, 32, 4, 2)), (32, (64, 32, 4, 3), (32, 64, 4, 3))]


def log(msg: str) -> None:
    print(msg, flush=True)


def smem_bytes(block_m: int, tile: tuple[int, int, int, int], weight_tiles: int, elem: int = 2) -> int:
    """Shared memory of one pipelined GEMM: stages x (A tile + weight tiles); w13 loads two weight tiles."""
    block_n, block_k, _, stages = tile
    return stages * elem * (block_m * block_k + weight_tiles * block_k * block_n)


class Bench:
    """Times and checks the variants for one model shape; appends one row per variant to ``rows``."""

    def __init__(self, args: argparse.Namespace, rows: list[dict[str, Any]], deadline: float) -> None:
        import torch

        self.torch = torch
        self.args = args
        self.rows = rows
        self.deadline = deadline
        self.dev = torch.device(args.device)
        self.dtype = torch.float32 if args.device == "cpu" else torch.bfloat16  # interpreter: bf16 dot is wrong

    def time_ms(self, fn: Callable[[], object]) -> float:
        """Median milliseconds of fn: do_bench on CUDA, a perf_counter median on CPU."""
        if self.dev.type == "cuda":
            import triton

            fn()
            self.torch.cuda.synchronize()
            return float(triton.testing.do_bench(fn, warmup=20, rep=self.args.rep_ms, return_mode="median"))
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def run_model(self, name: str, d: int, f: int, tokens: list[int], sweep: list[Any]) -> None:
        torch = self.torch
        from mixtral.kernels.reference import moe_reference, route_topk

        gen = torch.Generator(device=self.dev).manual_seed(0)
        w13 = torch.randn(NUM_EXPERTS, 2 * f, d, device=self.dev, generator=gen, dtype=self.dtype) * d**-0.5
        w2 = torch.randn(NUM_EXPERTS, d, f, device=self.dev, generator=gen, dtype=self.dtype) * f**-0.5
        self.check_expert_parallel(name, x_dim=d, w13=w13, w2=w2, m=tokens[min(2, len(tokens) - 1)])
        if self.dev.type == "cuda":
            self.check_graph_and_dispatch(name, d, w13, w2)
        for m in self.args.breakdown_m:
            self.breakdown(name, d, f, w13, w2, m)
        for m in tokens:
            if time.monotonic() > self.deadline:
                log(f"  time budget spent: skipping {name} M={m} and after")
                return
            x = torch.randn(m, d, device=self.dev, generator=gen, dtype=self.dtype)  # [M, D]
            logits = torch.randn(m, NUM_EXPERTS, device=self.dev, generator=gen)
            weights, ids = route_topk(logits, TOP_K)  # [M, k] fp32, [M, k]
            ref = moe_reference(x, w13, w2, weights, ids)  # [M, D] ground truth on the same inputs
            flops = 6.0 * d * f * m * TOP_K
            log(f"-- {name} D={d} F={f} M={m}: {flops / 1e12:.3f} TFLOP per call")
            for variant, config, fn, check in self.variants(x, w13, w2, weights, ids, sweep):
                if time.monotonic() > self.deadline:
                    log("  time budget spent: skipping the remaining variants")
                    break
                self.measure(name, d, f, m, flops, variant, config, fn, ref if check else None)
            del x, ref

    def check_expert_parallel(self, name: str, x_dim: int, w13: Any, w2: Any, m: int) -> None:
        """grouped_mm_moe on two expert-parallel halves (half of each rank's pairs sit in the never-multiplied
        trailing rows) must sum to the reference of all experts, and each half to its own reference."""
        torch = self.torch
        from mixtral.kernels.grouped_mm_moe import grouped_mm_moe
        from mixtral.kernels.reference import moe_reference, route_topk

        row: dict[str, Any] = {"model": name, "M": m, "variant": "grouped_mm-ep2-check"}
        try:
            gen = torch.Generator(device=self.dev).manual_seed(1)
            x = torch.randn(m, x_dim, device=self.dev, generator=gen, dtype=self.dtype)
            weights, ids = route_topk(torch.randn(m, NUM_EXPERTS, device=self.dev, generator=gen), TOP_K)
            half = NUM_EXPERTS // 2
            parts = [grouped_mm_moe(x, w13[r * half:(r + 1) * half], w2[r * half:(r + 1) * half], weights, ids,
                                    r * half) for r in range(2)]
            refs = [moe_reference(x, w13[r * half:(r + 1) * half], w2[r * half:(r + 1) * half], weights, ids,
                                  r * half) for r in range(2)]
            full = moe_reference(x, w13, w2, weights, ids).float()
            total = parts[0].float() + parts[1].float()
            errs = [float((p.float() - r.float()).norm() / r.float().norm()) for p, r in zip(parts, refs, strict=True)]
            row["norm_rel"] = float((total - full).norm() / full.norm())
            row["rank_norm_rel"] = errs
            finite = all(bool(torch.isfinite(p).all()) for p in parts)
            row["ok"] = finite and max([*errs, row["norm_rel"]]) < self.args.tol
            log(f"-- {name} M={m} expert parallel (2 ranks): sum vs full {row['norm_rel']:.1e}, ranks "
                f"{errs[0]:.1e} {errs[1]:.1e} " + ("ok" if row["ok"] else "BAD"))
        except Exception as exc:  # report and go on to the timings
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            row["traceback"] = traceback.format_exc()[-1500:]
            log(f"-- {name} expert-parallel check ERROR {row['error']}")
        self.rows.append(row)

    def check_graph_and_dispatch(self, name: str, x_dim: int, w13: Any, w2: Any) -> None:
        """grouped_mm_moe captured in a CUDA graph replays to the eager result on new routing (no host sync
        inside), and ops.fused_moe's prefill path (sorted_moe) takes over from SORTED_MIN_TOKENS tokens on (and not
        below)."""
        torch = self.torch
        from mixtral.kernels import ops
        from mixtral.kernels.grouped_mm_moe import grouped_mm_moe
        from mixtral.kernels.reference import route_topk

        row: dict[str, Any] = {"model": name, "variant": "grouped_mm-graph-dispatch-check"}
        try:
            m = 64
            gen = torch.Generator(device=self.dev).manual_seed(3)
            x = torch.randn(m, x_dim, device=self.dev, generator=gen, dtype=self.dtype)
            logits = torch.randn(m, NUM_EXPERTS, device=self.dev, generator=gen)
            weights, ids = route_topk(logits, TOP_K)
            grouped_mm_moe(x, w13, w2, weights, ids)  # warm up (Triton compiles) outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = grouped_mm_moe(x, w13, w2, weights, ids)
            new_w, new_ids = route_topk(torch.randn(m, NUM_EXPERTS, device=self.dev, generator=gen), TOP_K)
            weights.copy_(new_w)
            ids.copy_(new_ids)
            graph.replay()
            eager = grouped_mm_moe(x, w13, w2, weights, ids)
            row["graph_max_abs_diff"] = float((out.float() - eager.float()).abs().max())
            thr = ops.SORTED_MIN_TOKENS
            xs = torch.zeros(thr, x_dim, device=self.dev, dtype=self.dtype)
            row["dispatch_at_threshold"] = ops.sorted_config(xs, w13, w2) is not None
            row["dispatch_below"] = ops.sorted_config(xs[:thr - 1], w13, w2) is not None
            row["ok"] = (row["graph_max_abs_diff"] == 0.0 and row["dispatch_at_threshold"]
                         and not row["dispatch_below"])
            log(f"-- {name} CUDA graph replay vs eager max diff {row['graph_max_abs_diff']:.1e}; fused_moe takes "
                f"sorted_moe at {thr} tokens: {row['dispatch_at_threshold']}, at {thr - 1}: {row['dispatch_below']} "
                + ("ok" if row["ok"] else "BAD"))
        except Exception as exc:  # report and go on to the timings
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            row["traceback"] = traceback.format_exc()[-1500:]
            log(f"-- {name} graph/dispatch check ERROR {row['error']}")
        self.rows.append(row)

    def breakdown(self, name: str, d: int, f: int, w13: Any, w2: Any, m: int) -> None:
        """Each step of grouped_mm_moe timed alone at M tokens: where the time goes besides the GEMMs."""
        torch = self.torch
        from mixtral.kernels import grouped_mm_moe as gm
        from mixtral.kernels.reference import route_topk

        gen = torch.Generator(device=self.dev).manual_seed(2)
        x = torch.randn(m, d, device=self.dev, generator=gen, dtype=self.dtype)
        weights, ids = route_topk(torch.randn(m, NUM_EXPERTS, device=self.dev, generator=gen), TOP_K)
        order, row_of_pair, offs = gm.sort_pairs(ids, NUM_EXPERTS)
        xs = x.index_select(0, order // TOP_K)
        h = torch._grouped_mm(xs, w13.transpose(-2, -1), offs=offs)
        act = gm.silu_mul(h, offs[-1:])
        y = torch._grouped_mm(act, w2.transpose(-2, -1), offs=offs)
        w13t, w2t = w13.transpose(-2, -1), w2.transpose(-2, -1)
        steps: list[tuple[str, Callable[[], Any], float]] = [  # (step, fn, FLOPs)
            ("sort_pairs", lambda: gm.sort_pairs(ids, NUM_EXPERTS), 0.0),
            ("gather x", lambda: x.index_select(0, order // TOP_K), 0.0),
            ("grouped_mm w13", lambda: torch._grouped_mm(xs, w13t, offs=offs), 4.0 * d * f * m * TOP_K),
            ("silu_mul", lambda: gm.silu_mul(h, offs[-1:]), 0.0),
            ("grouped_mm w2", lambda: torch._grouped_mm(act, w2t, offs=offs), 2.0 * d * f * m * TOP_K),
            ("combine", lambda: gm.combine(y, row_of_pair, weights, offs[-1:]), 0.0),
            ("whole grouped_mm_moe", lambda: gm.grouped_mm_moe(x, w13, w2, weights, ids), 6.0 * d * f * m * TOP_K),
        ]
        # A diagnostic for the design, not used by the path: cuBLAS per expert with offsets copied to the host.
        # (The transposed product W.x^T, ragged in N, is no option: _grouped_mm asserts on the device unless
        # every group's row count is a multiple of 8, and a device assert ends the whole process.)
        ends = [0, *offs.tolist()]  # host copy, outside the timing
        h_loop = torch.empty_like(h)
        y_loop = torch.empty_like(y)

        def cublas_loop(a: Any, w: Any, out: Any) -> None:
            for e in range(NUM_EXPERTS):
                if ends[e + 1] > ends[e]:
                    torch.mm(a[ends[e]:ends[e + 1]], w[e].t(), out=out[ends[e]:ends[e + 1]])

        def torch_sort_pairs() -> Any:  # the obvious version, for comparison with the counting sort
            key = ids.reshape(-1)
            sorted_key, order_ = torch.sort(key, stable=True)
            inverse = torch.empty_like(order_).scatter_(0, order_, torch.arange(key.numel(), device=key.device))
            return order_, inverse, torch.searchsorted(sorted_key, torch.arange(NUM_EXPERTS, device=key.device),
                                                       right=True, out_int32=True)

        steps += [
            ("sort via torch.sort", torch_sort_pairs, 0.0),
            ("cublas loop w13", lambda: cublas_loop(xs, w13, h_loop), 4.0 * d * f * m * TOP_K),
            ("cublas loop w2", lambda: cublas_loop(act, w2, y_loop), 2.0 * d * f * m * TOP_K),
        ]
        log(f"-- {name} M={m} grouped_mm_moe step by step")
        for step, fn, flops in steps:
            row: dict[str, Any] = {"model": name, "M": m, "variant": f"breakdown: {step}"}
            try:
                ms = self.time_ms(fn)
                row["us"] = ms * 1e3
                rate = f"{flops / (ms * 1e-3) / 1e12:7.1f} TFLOP/s" if flops else ""
                log(f"  {step:22s} {row['us']:10.1f} us {rate}")
            except Exception as exc:  # report and go on
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                log(f"  {step:22s} ERROR {row['error']}")
            self.rows.append(row)

    def variants(self, x: Any, w13: Any, w2: Any, weights: Any, ids: Any, sweep: list[Any]
                 ) -> list[tuple[str, str, Callable[[], Any], bool]]:
        """(name, config text, callable returning [M, D], compare with the reference?) for every variant."""
        torch = self.torch
        from mixtral.kernels import grouped_mm_moe as gm
        from mixtral.kernels.triton import fused_moe as fm
        from mixtral.kernels.triton.moe_configs import GemmConfig, MoEConfig, get_config

        m, d = x.shape
        f = w2.shape[2]
        tuned = get_config(NUM_EXPERTS, f, d, m, x.dtype, x.device)
        out: list[tuple[str, str, Callable[[], Any], bool]] = [
            ("triton-tuned", json.dumps(tuned.to_dict()), lambda: fm.fused_moe(x, w13, w2, weights, ids), True),
        ]
        for i, (bm, t13, t2) in enumerate(sweep):
            cfg = MoEConfig(bm, GemmConfig(*t13), GemmConfig(*t2))
            text = f"bm{bm} w13{t13} w2{t2}"
            need = max(smem_bytes(bm, t13, 2), smem_bytes(bm, t2, 1))
            if self.dev.type == "cuda" and need > SMEM_LIMIT:
                log(f"  triton-sweep-{i}: {text} needs {need // 1024} KiB of shared memory > 227: not run")
                continue
            out.append((f"triton-sweep-{i}", text,
                        lambda cfg=cfg: fm.fused_moe(x, w13, w2, weights, ids, config=cfg), True))
        out.append(("grouped_mm", "torch._grouped_mm x2 + Triton glue",
                    lambda: gm.grouped_mm_moe(x, w13, w2, weights, ids), True))
        try:  # the eager prefill path: one cuBLAS GEMM per expert, the same glue, one host sync
            from mixtral.kernels.expert_gemms_moe import expert_gemms_moe

            out.append(("expert_gemms", "cuBLAS per expert + Triton glue (host sync)",
                        lambda: expert_gemms_moe(x, w13, w2, weights, ids), True))
        except ImportError as exc:
            log(f"  expert_gemms: not available ({exc})")
        # The two GEMMs alone, on inputs sorted once outside the timing: what the glue costs is the difference.
        order, _, offs = gm.sort_pairs(ids, NUM_EXPERTS)  # [P], [P], [E]
        xs = x[order // TOP_K]  # [P, D]
        act = torch.randn(xs.shape[0], f, device=x.device, dtype=x.dtype)  # [P, F]
        w13t, w2t = w13.transpose(-2, -1), w2.transpose(-2, -1)
        out.append(("grouped_gemms_only", "w13 + w2 _grouped_mm, no glue",
                    lambda: (torch._grouped_mm(xs, w13t, offs=offs), torch._grouped_mm(act, w2t, offs=offs)), False))
        out.append(("dense_ceiling", "cuBLAS [P,D]x[D,2F] + [P,F]x[F,D], one expert (same FLOPs)",
                    lambda: (xs @ w13[0].T, act @ w2[0].T), False))
        return out

    def measure(self, name: str, d: int, f: int, m: int, flops: float, variant: str, config: str,
                fn: Callable[[], Any], ref: Any) -> None:
        """Time one variant, check its output, print and record the row; an error is recorded, not raised."""
        row: dict[str, Any] = {"model": name, "D": d, "F": f, "M": m, "variant": variant, "config": config}
        try:
            if ref is not None:
                got = fn()
                diff = (got.float() - ref.float())
                row["max_rel"] = float(diff.abs().max() / ref.float().abs().max().clamp_min(1e-30))
                row["norm_rel"] = float(diff.norm() / ref.float().norm().clamp_min(1e-30))
                row["ok"] = bool(self.torch.isfinite(got).all()) and row["norm_rel"] < self.args.tol
                del got, diff
            ms = self.time_ms(fn)
            row.update(us=ms * 1e3, tflops=flops / (ms * 1e-3) / 1e12)
            row["pct_peak"] = 100.0 * row["tflops"] / self.args.peak_tflops
            check = "" if ref is None else (f" err {row['norm_rel']:.1e}/{row['max_rel']:.1e} "
                                            + ("ok" if row["ok"] else "BAD"))
            log(f"  {variant:20s} {row['us']:10.1f} us {row['tflops']:7.1f} TFLOP/s {row['pct_peak']:5.1f}%"
                f"{check}  {config}")
        except Exception as exc:  # a tile that cannot compile or a path that breaks must not end the run
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            row["traceback"] = traceback.format_exc()[-1500:]
            log(f"  {variant:20s} ERROR {row['error']}  {config}")
        self.rows.append(row)
        if self.dev.type == "cuda":
            self.torch.cuda.empty_cache()


def crossover(table: list[dict[str, Any]], path: str) -> int | None:
    """Smallest M from which ``path`` beats tuned Triton at that M and every larger one measured."""
    threshold = None
    for entry in reversed(table):
        if entry.get(path) is None or entry["triton_tuned"] is None or entry[path] <= entry["triton_tuned"]:
            break
        threshold = entry["M"]
    return threshold


def summarize(rows: list[dict[str, Any]], peak: float) -> dict[str, Any]:
    """Per model and M: tuned Triton, best sweep tile, grouped_mm, GEMMs-only, ceiling; and the threshold."""
    summary: dict[str, Any] = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model and "tflops" in r]
        table = []
        for m in sorted({r["M"] for r in mine}):
            at = {r["variant"]: r for r in mine if r["M"] == m}
            sweep = [r for v, r in at.items() if v.startswith("triton-sweep") and r.get("ok")]
            best = max(sweep, key=lambda r: r["tflops"], default=None)
            get = lambda v, at=at: at[v]["tflops"] if v in at and at[v].get("ok", True) else None  # noqa: E731
            table.append({"M": m, "triton_tuned": get("triton-tuned"), "triton_best_sweep": best and best["tflops"],
                          "best_sweep_config": best and best["config"], "grouped_mm": get("grouped_mm"),
                          "expert_gemms": get("expert_gemms"),
                          "grouped_gemms_only": get("grouped_gemms_only"), "dense_ceiling": get("dense_ceiling")})
        thresholds = {path: crossover(table, path) for path in ("grouped_mm", "expert_gemms")}
        summary[model] = {"table": table, "min_tokens": thresholds}
        log(f"\n== {model}: TFLOP/s (% of {peak:.0f})")
        log(f"{'M':>6} {'triton-tuned':>14} {'best sweep':>14} {'grouped_mm':>14} {'expert_gemms':>14} "
            f"{'gemms only':>14} {'dense ceil':>14}  best sweep tile")

        def cell(v: float | None) -> str:
            return f"{v:7.1f} ({100 * v / peak:3.0f}%)" if v is not None else f"{'-':>14}"

        for e in table:
            log(f"{e['M']:>6} {cell(e['triton_tuned'])} {cell(e['triton_best_sweep'])} {cell(e['grouped_mm'])} "
                f"{cell(e['expert_gemms'])} {cell(e['grouped_gemms_only'])} {cell(e['dense_ceiling'])}  "
                f"{e['best_sweep_config'] or ''}")
        for path, threshold in thresholds.items():
            log(f"{path} beats tuned Triton from M = {threshold} on" if threshold
                else f"{path} does not beat tuned Triton at the largest M measured")
    return summary


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cuda (the measurement) or cpu (plumbing smoke check through Triton's interpreter)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (D 32, F 64, M 8 and 40): a smoke check only")
    p.add_argument("--quick", action="store_true", help="4 sweep tiles instead of 12 (about half the time)")
    p.add_argument("--models", default="8x7b,8x22b", help="comma-separated: 8x7b, 8x22b (ignored with --tiny)")
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma-separated token counts M")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak for the %% column "
                   "(989 for H100/H200 SXM)")
    p.add_argument("--rep-ms", type=int, default=100, help="do_bench's timing window per variant, milliseconds")
    p.add_argument("--tol", type=float, default=1e-2, help="norm-relative error above which a variant is BAD")
    p.add_argument("--budget-s", type=float, default=230.0, help="stop starting new measurements after this")
    p.add_argument("--breakdown-m", default="2048",
                   help="comma-separated token counts at which each step of grouped_mm_moe is timed alone "
                   "(empty: none)")
    p.add_argument("--sweep-count", type=int, default=None,
                   help="run only the first N Triton sweep tiles (0: none; default all 12, or 4 with --quick)")
    p.add_argument("--json", default=None, help="write every row, the summary and the setup to this JSON file")
    p.add_argument("--commit", default="", help="commit id to record (the device copy may have no git history)")
    args = p.parse_args()
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the kernels run interpreted on CPU
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    import torch
    import triton

    if args.device == "cuda" and not torch.cuda.is_available():
        log("no CUDA device: run with --device cpu --tiny for a smoke check")
        return 2
    dev = torch.device(args.device)
    meta = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (Triton interpreter)",
            "torch": torch.__version__, "triton": triton.__version__, "commit": args.commit,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "peak_tflops": args.peak_tflops,
            "experts": NUM_EXPERTS, "top_k": TOP_K, "has_grouped_mm": hasattr(torch, "_grouped_mm")}
    log("  ".join(f"{k} {v}" for k, v in meta.items()))
    if args.tiny or dev.type == "cpu":
        models, tokens, sweep = TINY_MODELS, TINY_TOKENS, TINY_SWEEP
        args.breakdown_m = str(TINY_TOKENS[-1]) if args.breakdown_m else ""
    else:
        models = {k: MODELS[k] for k in args.models.split(",")}
        tokens = [int(t) for t in args.tokens.split(",")]
        sweep = QUICK_SWEEP if args.quick else SWEEP
    if args.sweep_count is not None:
        sweep = sweep[:args.sweep_count]
    args.breakdown_m = [int(m) for m in args.breakdown_m.split(",") if m]
    rows: list[dict[str, Any]] = []
    t0 = time.monotonic()
    bench = Bench(args, rows, deadline=t0 + args.budget_s)
    for name, (d, f) in models.items():
        try:
            bench.run_model(name, d, f, tokens, sweep)
        except Exception:  # e.g. out of memory for the weights: report it and go on with the next model
            log(traceback.format_exc())
            rows.append({"model": name, "error": traceback.format_exc()[-1500:]})
    summary = summarize(rows, args.peak_tflops)
    bad = [r for r in rows if r.get("ok") is False]
    errors = [r for r in rows if "error" in r]
    log(f"\n{len(rows)} measurements in {time.monotonic() - t0:.0f} s; {len(bad)} BAD (wrong output), "
        f"{len(errors)} errors")
    for r in bad:
        log(f"  BAD {r['model']} M={r.get('M')} {r['variant']}: {({k: v for k, v in r.items() if k != 'traceback'})}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "rows": rows, "summary": summary}, fh, indent=1)
        log(f"wrote {args.json}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
