#!/usr/bin/env python3
"""GPU check of the small fused Triton kernels (RMSNorm, residual add + RMSNorm, RoPE on q/k, top-k routing)
against their PyTorch references in kernels/reference.py, at Mixtral-8x7B shapes, with timings.

What it does, in one process on one GPU:
1. correctness, bf16 / fp16 / fp32, N = 1..512 tokens: D 4096; 32 query / 8 KV heads of 128 (q and k are
   strided views of a fused qkv row, as in the model); E 8, top-2. Criteria: RMSNorm within one rounding
   step of the dtype (only the fp32 sum-of-squares order differs), the residual sum and RoPE bit-identical,
   routing ids equal (where the reference's probabilities tie, either id counts) and weights within 1e-5;
   kernels/dispatch.py must dispatch to the kernels under inference mode;
2. a CUDA-graph capture of each kernel, replayed on new inputs;
3. a 2-layer model of 8x7B attention/norm shapes (experts narrowed to F 1024): logits with the kernels
   against KernelConfig(backend="reference"), fp32 and bf16;
4. timings, bf16, fused vs the PyTorch ops they replace: CUDA-graph replay (how decode runs) and eager,
   CUDA events, median of 15 groups of 20 calls; "layer" is one decoder layer's four small ops together.
Prints a table and exits non-zero on any mismatch or error.

    PYTHONPATH=src python3 scripts/gpu_small_ops_check.py --json small_ops.json   # on a CUDA GPU
    python scripts/gpu_small_ops_check.py --smoke                                  # CPU: interpreter, small N
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and "--smoke" in sys.argv[1:]:
    os.environ["TRITON_INTERPRET"] = "1"  # before any triton decorator runs
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import argparse
import dataclasses
import json
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from mixtral.bench.cuda_timing import capture, events_ms, graph_ms
from mixtral.kernels import reference
from mixtral.kernels.config import KernelConfig
from mixtral.kernels.dispatch import Kernels
from mixtral.kernels.triton import gate_router, rmsnorm, rope, router, skinny_gemm
from mixtral.model.layers import rope_cos_sin
from mixtral.model.mixtral import Transformer, init_random_weights
from mixtral.model.presets import preset

DIM, N_HEADS, N_KV, HEAD_DIM, N_EXPERTS, TOP_K, EPS = 4096, 32, 8, 128, 8, 2, 1e-5
NAME = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
STEP = {torch.bfloat16: 1e-2, torch.float16: 1e-3, torch.float32: 1e-5}  # ~ one rounding step of the dtype
ROUTE_TOL = 1e-5  # fp32 weights: Triton's exp vs PyTorch's differ by a few ulps
ops = Kernels(KernelConfig())  # the dispatch under test (main() makes it the triton backend for --smoke)


def log(msg: str) -> None:
    print(msg, flush=True)


class Check:
    def __init__(self, dev: torch.device, smoke: bool) -> None:
        self.dev, self.smoke = dev, smoke
        self.gen = torch.Generator(device=dev).manual_seed(4321)
        self.res: dict[str, Any] = {"checks": [], "time": [], "errors": []}

    # ---------------------------------------------------------------- helpers
    def randn(self, *shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, device=self.dev, generator=self.gen) * scale).to(dtype)

    def record(self, op: str, dtype: torch.dtype, n: int, ok: bool, **info: Any) -> None:
        self.res["checks"].append({"op": op, "dtype": NAME[dtype], "n": n, "ok": ok, **info})
        if not ok or n in (1, 512) or self.smoke:
            detail = " ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items())
            log(f"  {op:13s} {NAME[dtype]} N {n:4d}: {'ok' if ok else 'FAIL'}  {detail}")

    @staticmethod
    def within_step(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> tuple[bool, float, int]:
        """(|out - ref| <= 2 steps * (1 + |ref|) everywhere and finite, max |out - ref|, elements not identical).

        Two steps, not one: the normalised value is rounded to the dtype and then multiplied by the weight and
        rounded again, so a one-step difference before the weight can become two after it (seen on an H100:
        fp16, 24 of 1M elements at 2 steps)."""
        diff = (out.double() - ref.double()).abs()
        ok = bool(torch.isfinite(out).all()) and bool((diff <= 2 * STEP[dtype] * (1 + ref.double().abs())).all())
        return ok and out.dtype == ref.dtype, diff.max().item(), int((out != ref).sum())

    def qk_inputs(self, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """q [N, H, hd], k [N, KV, hd] as views of one fused qkv row; cos/sin [N, hd] at random positions."""
        qkv = self.randn(n, (N_HEADS + 2 * N_KV) * HEAD_DIM, dtype=dtype)
        q, k, _ = qkv.split([N_HEADS * HEAD_DIM, N_KV * HEAD_DIM, N_KV * HEAD_DIM], dim=-1)
        pos = torch.randint(0, 32768, (n,), device=self.dev, generator=self.gen)
        cos, sin = rope_cos_sin(pos, HEAD_DIM, 1e6, dtype)
        return q.view(n, N_HEADS, HEAD_DIM), k.view(n, N_KV, HEAD_DIM), cos, sin

    # ---------------------------------------------------------------- correctness
    def check_ops(self) -> None:
        batches = [1, 2, 5, 37] if self.smoke else [1, 2, 3, 7, 8, 16, 37, 64, 100, 128, 256, 333, 512]
        dtypes = [torch.float32, torch.float16] if self.smoke else [torch.bfloat16, torch.float16, torch.float32]
        for dtype in dtypes:
            for n in batches:
                self.check_norms(n, dtype)
                self.check_rope(n, dtype)
                self.check_router(n, dtype)
                if n <= 256:
                    self.check_gate_router(n, dtype)
                if n <= skinny_gemm.MAX_ROWS and dtype != torch.float32:
                    self.check_skinny(n, dtype)

    def check_norms(self, n: int, dtype: torch.dtype) -> None:
        x = self.randn(n, DIM, dtype=dtype, scale=3.0)  # [N, D]
        res = self.randn(n, DIM, dtype=dtype)
        w = (torch.rand(DIM, device=self.dev, generator=self.gen) + 0.5).to(dtype)  # [D]
        out = rmsnorm.rms_norm(x, w, EPS)
        ok, err, ndiff = self.within_step(out, reference.rms_norm_reference(x, w, EPS), dtype)
        with torch.inference_mode():
            dispatched = torch.equal(ops.rms_norm(x, w, EPS), out)
        self.record("rms_norm", dtype, n, ok and dispatched, max_err=err, not_identical=ndiff,
                    dispatch=dispatched)
        normed, summed = rmsnorm.add_rms_norm(x, res, w, EPS)
        ref_normed, ref_sum = reference.add_rms_norm_reference(x, res, w, EPS)
        ok, err, ndiff = self.within_step(normed, ref_normed, dtype)
        sum_exact = torch.equal(summed, ref_sum)
        with torch.inference_mode():
            dispatched = torch.equal(ops.add_rms_norm(x, res, w, EPS)[0], normed)
        self.record("add_rms_norm", dtype, n, ok and sum_exact and dispatched, max_err=err, not_identical=ndiff,
                    sum_exact=sum_exact, dispatch=dispatched)

    def check_rope(self, n: int, dtype: torch.dtype) -> None:
        q, k, cos, sin = self.qk_inputs(n, dtype)
        q_out, k_out = rope.rope_qk(q, k, cos, sin)
        q_ref, k_ref = reference.rope_qk_reference(q, k, cos, sin)
        exact = torch.equal(q_out, q_ref) and torch.equal(k_out, k_ref)
        err = max((q_out.double() - q_ref.double()).abs().max().item(),
                  (k_out.double() - k_ref.double()).abs().max().item())
        with torch.inference_mode():
            dispatched = torch.equal(ops.rope_qk(q, k, cos, sin)[0], q_out)
        self.record("rope_qk", dtype, n, exact and dispatched, max_err=err, exact=exact, dispatch=dispatched)

    def check_router(self, n: int, dtype: torch.dtype) -> None:
        logits = self.randn(n, N_EXPERTS, dtype=dtype, scale=2.0)  # [N, E] in the model dtype, as the gate gives
        w, ids = router.route_topk_fused(logits, TOP_K)
        ref_w, ref_ids = reference.route_topk(logits, TOP_K)
        probs = torch.softmax(logits.float(), dim=-1)  # [N, E]
        # Exact ties (frequent for bf16 logits) may be ordered differently by torch.topk: accept either id.
        same = (ids == ref_ids) | (probs.gather(1, ids) == probs.gather(1, ref_ids))
        ids_ok = bool(same.all())
        ties = int((ids != ref_ids).any(-1).sum())
        err = (w - ref_w).abs().max().item()
        # Weights compare where the ids agree (a tie swap permutes equal weights, also fine).
        w_ok = bool(((w - ref_w).abs() <= ROUTE_TOL * (1 + ref_w.abs())).all())
        with torch.inference_mode():
            dispatched = torch.equal(ops.route_topk(logits, TOP_K)[1], ids)
        self.record("route_topk", dtype, n, ids_ok and w_ok and dispatched, max_err=err, tie_rows=ties,
                    dispatch=dispatched)

    def check_gate_router(self, n: int, dtype: torch.dtype) -> None:
        """Gate GEMM + routing + counts in one kernel: logits within a rounding step of the Linear's, routing
        exactly that of its own logits, counts exactly the masked choices."""
        x = self.randn(n, DIM, dtype=dtype)  # [N, D]
        gw = self.randn(N_EXPERTS, DIM, dtype=dtype, scale=DIM**-0.5)  # [E, D]
        mask = (torch.arange(n, device=self.dev) % 5 != 4).long()  # every fifth row is padding
        counts = torch.zeros(N_EXPERTS, dtype=torch.int64, device=self.dev)
        logits, w, ids = gate_router.gate_route_fused(x, gw, TOP_K, counts, mask)
        ok_logits, err, _ = self.within_step(logits, torch.nn.functional.linear(x.float(), gw.float()).to(dtype), dtype)
        ref_w, ref_ids = reference.route_topk(logits, TOP_K)
        probs = torch.softmax(logits.float(), dim=-1)
        ids_ok = bool(((ids == ref_ids) | (probs.gather(1, ids) == probs.gather(1, ref_ids))).all())
        w_ok = bool(((w - ref_w).abs() <= ROUTE_TOL * (1 + ref_w.abs())).all())
        want = torch.zeros_like(counts).index_add_(0, ids[mask.bool()].reshape(-1),
                                                   torch.ones_like(ids[mask.bool()].reshape(-1)))
        counts_ok = torch.equal(counts, want)
        self.record("gate_route", dtype, n, ok_logits and ids_ok and w_ok and counts_ok, max_err=err,
                    counts_ok=counts_ok)

    def check_skinny(self, n: int, dtype: torch.dtype) -> None:
        """Decode-size GEMM against an fp32 product: relative Frobenius error of one rounding of the output."""
        for rows, cols in ((6144, 4096), (4096, 4096)):
            x = self.randn(n, cols, dtype=dtype)
            w = self.randn(rows, cols, dtype=dtype, scale=cols**-0.5)
            out = skinny_gemm.skinny_gemm(x, w)
            ref = x.float() @ w.float().T
            rel = ((out.float() - ref).norm() / ref.norm()).item()
            with torch.inference_mode():
                dispatched = torch.equal(ops.linear(x, w), out)
            self.record(f"skinny {rows}x{cols}", dtype, n, rel < STEP[dtype] and dispatched, rel_err=rel,
                        dispatch=dispatched)

    # ---------------------------------------------------------------- CUDA graphs
    def check_graphs(self) -> None:
        n, dtype = 8, torch.bfloat16
        x, res = self.randn(n, DIM, dtype=dtype), self.randn(n, DIM, dtype=dtype)
        w = (torch.rand(DIM, device=self.dev, generator=self.gen) + 0.5).to(dtype)
        q, k, cos, sin = self.qk_inputs(n, dtype)
        logits = self.randn(n, N_EXPERTS, dtype=dtype, scale=2.0)

        def step() -> tuple[torch.Tensor, ...]:
            normed, summed = rmsnorm.add_rms_norm(x, res, w, EPS)
            qr, kr = rope.rope_qk(q, k, cos, sin)
            tw, ti = router.route_topk_fused(logits, TOP_K)
            return rmsnorm.rms_norm(x, w, EPS), normed, summed, qr, kr, tw, ti

        graph, outs = capture(step)
        for t in (x, res, q, k, logits):  # new contents in the captured buffers (q/k refill their qkv rows)
            t.copy_(torch.randn(t.shape, device=self.dev, generator=self.gen).to(dtype))
        graph.replay()
        torch.cuda.synchronize()
        want = (rmsnorm.rms_norm(x, w, EPS), *rmsnorm.add_rms_norm(x, res, w, EPS), *rope.rope_qk(q, k, cos, sin),
                *router.route_topk_fused(logits, TOP_K))
        ok = all(torch.equal(a, b) for a, b in zip(outs, want, strict=True))
        self.record("graph replay", dtype, n, ok)

    # ---------------------------------------------------------------- the model
    def check_model(self) -> None:
        if self.smoke:
            args = dataclasses.replace(preset("tiny-odd"), vocab_size=96)
        else:  # 8x7B attention and norm shapes; narrow experts keep it small (the MoE is not under test here)
            args = dataclasses.replace(preset("mixtral-8x7b"), n_layers=2, hidden_dim=1024, vocab_size=512)
        model = Transformer(args).to(self.dev)
        init_random_weights(model, seed=3, std=0.02)
        tokens = torch.randint(0, args.vocab_size, (4, 16), device=self.dev, generator=self.gen)

        def logits(dtype: torch.dtype, kernels: bool) -> torch.Tensor:
            model.set_kernel_config(ops.config if kernels else KernelConfig(backend="reference"))
            with torch.inference_mode():
                return model.to(dtype)(tokens).double()

        def rel(a: torch.Tensor, b: torch.Tensor) -> float:
            return ((a - b).norm() / b.norm()).item()

        truth = logits(torch.float32, kernels=False)
        fused = logits(torch.float32, kernels=True)
        err = rel(fused, truth)
        self.record("model logits", torch.float32, tokens.numel(), bool(torch.isfinite(fused).all()) and err < 1e-4,
                    rel_err=err)
        # 2-byte dtypes: the kernels' error against the fp32 model must not exceed PyTorch's own (a routing flip
        # on a near-tie can move either one a little, hence the slack).
        half = torch.float16 if self.smoke else torch.bfloat16
        fused_err, ref_err = rel(logits(half, kernels=True), truth), rel(logits(half, kernels=False), truth)
        self.record("model logits", half, tokens.numel(), fused_err <= 1.25 * ref_err + 1e-3,
                    rel_err_vs_fp32=fused_err, torch_rel_err_vs_fp32=ref_err)

    # ---------------------------------------------------------------- timing
    def time_ms(self, fn: Callable[[], object], graph: bool, reps: int = 15, per_rep: int = 20) -> float:
        """ms of one call: median over ``reps`` groups of ``per_rep`` calls (graph replays or eager calls)."""
        for _ in range(3):  # warm-up: compiles, fills the allocator's cache
            fn()
        return graph_ms(fn, reps, per_rep) if graph else events_ms(fn, reps, per_rep)

    def time_ops(self) -> None:
        for n in (1, 8, 64, 256, 512):
            self.time_batch(n)

    def time_batch(self, n: int, dtype: torch.dtype = torch.bfloat16) -> None:
        """Fused vs PyTorch time of each small op, and of one layer's four, at N tokens."""
        x, res = self.randn(n, DIM, dtype=dtype), self.randn(n, DIM, dtype=dtype)
        w = (torch.rand(DIM, device=self.dev, generator=self.gen) + 0.5).to(dtype)
        q, k, cos, sin = self.qk_inputs(n, dtype)
        logits = self.randn(n, N_EXPERTS, dtype=dtype)

        def ref_add_norm() -> object:
            h = x + res  # what TransformerBlock did before: the add, then ffn_norm(h)
            return reference.rms_norm_reference(h, w, EPS), h

        fused_layer = [lambda: rmsnorm.rms_norm(x, w, EPS), lambda: rope.rope_qk(q, k, cos, sin),
                       lambda: rmsnorm.add_rms_norm(x, res, w, EPS),
                       lambda: router.route_topk_fused(logits, TOP_K)]
        ref_layer = [lambda: reference.rms_norm_reference(x, w, EPS),
                     lambda: reference.rope_qk_reference(q, k, cos, sin), ref_add_norm,
                     lambda: reference.route_topk(logits, TOP_K)]
        names = ["rms_norm", "rope_qk", "add_rms_norm", "route_topk"]
        pairs = [*zip(names, fused_layer, ref_layer, strict=True),
                 ("layer (all 4)", lambda: [f() for f in fused_layer], lambda: [f() for f in ref_layer])]
        for name, fused, ref in pairs:
            row = {"op": name, "n": n}
            for mode in ("graph", "eager"):
                row[f"{mode}_fused_us"] = 1e3 * self.time_ms(fused, graph=mode == "graph")
                row[f"{mode}_ref_us"] = 1e3 * self.time_ms(ref, graph=mode == "graph")
            self.res["time"].append(row)

    # ---------------------------------------------------------------- report
    def summary(self) -> None:
        checks = self.res["checks"]
        failed = [c for c in checks if not c["ok"]]
        log(f"\n{len(checks) - len(failed)}/{len(checks)} checks ok")
        for c in failed:
            log(f"  FAIL {c}")
        if self.res["time"]:
            log("\nbf16, us per call (CUDA events, median): graph = CUDA-graph replay, eager = Python launches")
            log(f"| {'op':14s} | {'N':>4s} | graph fused | graph torch | speed-up | eager fused | eager torch |")
            log("|---|---|---|---|---|---|---|")
            for r in self.res["time"]:
                log(f"| {r['op']:14s} | {r['n']:4d} | {r['graph_fused_us']:11.1f} | {r['graph_ref_us']:11.1f} | "
                    f"{r['graph_ref_us'] / r['graph_fused_us']:7.2f}x | {r['eager_fused_us']:11.1f} | "
                    f"{r['eager_ref_us']:11.1f} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help="CPU only: run the correctness checks through Triton's interpreter at small N (no graphs, "
                        "no timings)")
    p.add_argument("--json", default=None, help="write all results (checks and timings) to this JSON file")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: ops,graph,model,time")
    args = p.parse_args()
    dev = torch.device("cpu" if args.smoke else "cuda")
    if args.smoke:
        # The dispatch checks must reach the (interpreted) kernels on CPU tensors: the triton backend does.
        global ops
        ops = Kernels(KernelConfig(backend="triton"))
    check = Check(dev, args.smoke)
    device = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (interpreter)"
    check.res.update(device=device, torch=torch.__version__,
                     date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    log(f"device {device}  torch {torch.__version__}")
    skip = set(args.skip.split(","))
    parts = [("ops", check.check_ops), ("model", check.check_model)]
    if not args.smoke:
        parts += [("graph", check.check_graphs), ("time", check.time_ops)]
    for name, fn in parts:
        if name in skip:
            continue
        t0 = time.monotonic()
        log(f"== {name}")
        try:
            fn()
        except Exception:  # keep going: one broken part must not hide the others
            tb = traceback.format_exc()
            log(tb)
            check.res["errors"].append({"part": name, "traceback": tb[-2000:]})
        log(f"   ({time.monotonic() - t0:.1f} s)")
    check.summary()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(check.res, f, indent=1)
    bad = [c for c in check.res["checks"] if not c["ok"]]
    return 1 if bad or check.res["errors"] or not check.res["checks"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
