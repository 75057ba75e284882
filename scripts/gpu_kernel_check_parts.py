"""The parts of scripts/gpu_kernel_check.py: correctness checks and timings of the Triton kernels.

Imported by gpu_kernel_check.py after it has set TRITON_INTERPRET (for --smoke), so triton's decorators see
the right mode. Every check draws fresh random inputs and compares with the fp32 reference by
||out - ref|| / ||ref||; every timing is a median of CUDA-graph replays (launch gaps removed).
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable
from typing import Any

import torch

from mixtral.bench.cuda_timing import capture, graph_ms
from mixtral.kernels.reference import moe_reference, paged_attention_reference, route_topk, write_kv_reference
from mixtral.kernels.triton.fused_moe import fused_moe
from mixtral.kernels.triton.moe_configs import get_config
from mixtral.kernels.triton.paged_attention import decode_partition_size, paged_attention
from mixtral.kernels.triton.write_kv import write_kv

TOL = {torch.bfloat16: 1.5e-2, torch.float16: 3e-3, torch.float32: 1e-4}
MOE_SHAPES = {"8x7b": (4096, 14336), "8x22b": (6144, 16384)}  # D, F; E = 8, top-2
ATTN_SHAPES = {"8x7b": (32, 8), "8x22b": (48, 8)}  # query heads, KV heads; head_dim 128
NAME = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


class Parts:
    def __init__(self, dev: torch.device, results: dict[str, Any], log: Callable[[str], None], smoke: bool) -> None:
        self.dev, self.res, self.log, self.smoke = dev, results, log, smoke
        self.gen = torch.Generator(device=dev).manual_seed(1234)
        self.copy_bw = 0.0

    # ---------------------------------------------------------------- helpers
    def randn(self, *shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, device=self.dev, generator=self.gen) * scale).to(dtype)

    def graph_time_ms(self, fn: Callable[[], object], reps: int = 7, per_rep: int = 10) -> float:
        """ms of one call of fn, as a CUDA graph replayed back to back (median over ``reps`` groups of
        ``per_rep`` replays, so the host's submission latency stays hidden as it is inside a model's graph)."""
        fn()  # a second warm-up call beside the one ``capture`` makes
        return graph_ms(fn, reps, per_rep)

    # ---------------------------------------------------------------- bandwidth
    def copy_bandwidth(self) -> None:
        n = 2 << 30  # 2 GiB each way: far past the L2
        src = torch.empty(n, dtype=torch.uint8, device=self.dev).random_(0, 255)
        dst = torch.empty_like(src)
        for _ in range(3):
            dst.copy_(src)
        torch.cuda.synchronize()
        times = []
        for _ in range(10):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst.copy_(src)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        ms = statistics.median(times)
        self.copy_bw = 2 * n / (ms * 1e-3)
        props = torch.cuda.get_device_properties(self.dev)
        self.res.update(copy_bandwidth_GBs=self.copy_bw / 1e9, sms=props.multi_processor_count)
        self.log(f"copy bandwidth {self.copy_bw / 1e9:.0f} GB/s (read + write, 2 GiB), "
                 f"{props.multi_processor_count} SMs")
        del src, dst

    # ---------------------------------------------------------------- MoE correctness
    def _moe_case(self, tag: str, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, w13_ref: torch.Tensor,
                  w2_ref: torch.Tensor, expert_start: int = 0) -> None:
        n = x.shape[0]
        weights, ids = route_topk(self.randn(n, 8), 2)
        out = fused_moe(x, w13, w2, weights, ids, expert_start)
        ref = moe_reference(x.float(), w13_ref, w2_ref, weights, ids, expert_start)
        err = rel_err(out, ref)
        ok = bool(torch.isfinite(out).all()) and err < TOL[x.dtype] and out.dtype == x.dtype
        cfg = get_config(w13.shape[0], w13.shape[1] // 2, x.shape[1], n, x.dtype, x.device)
        self.res["moe_check"].append({"case": tag, "batch": n, "dtype": NAME[x.dtype], "rel_err": err, "ok": ok,
                                      "block_m": cfg.block_m})
        self.log(f"  moe {tag:14s} {NAME[x.dtype]} batch {n:4d}: rel err {err:.2e} {'ok' if ok else 'FAIL'}")

    def check_moe(self) -> None:
        shapes = {"tiny": (64, 96)} if self.smoke else MOE_SHAPES
        batches = [1, 3, 8] if self.smoke else [1, 2, 3, 8, 16, 64, 100, 256, 512]
        for model, (d, f) in shapes.items():
            dt0 = torch.float16 if self.smoke else torch.bfloat16
            w13 = self.randn(8, 2 * f, d, dtype=dt0, scale=d**-0.5)  # [E, 2F, D]
            w2 = self.randn(8, d, f, dtype=dt0, scale=f**-0.5)  # [E, D, F]
            w13_ref, w2_ref = w13.float(), w2.float()
            for n in batches:
                self._moe_case(model, self.randn(n, d, dtype=dt0), w13, w2, w13_ref, w2_ref)
            # Expert parallel: this rank holds experts 4..7 (a contiguous view of the same weights).
            self._moe_case(f"{model} EP 4..7", self.randn(33, d, dtype=dt0), w13[4:], w2[4:], w13_ref[4:],
                           w2_ref[4:], expert_start=4)
            if model == "8x7b" or self.smoke:  # the other 2-byte dtype on one shape
                w13h, w2h = w13_ref.half(), w2_ref.half()
                for n in ([1, 8] if self.smoke else [1, 8, 16, 256]):
                    self._moe_case(model, self.randn(n, d, dtype=torch.float16), w13h, w2h, w13_ref, w2_ref)
                del w13h, w2h
            del w13, w2, w13_ref, w2_ref
            if not self.smoke:
                torch.cuda.empty_cache()

    # ---------------------------------------------------------------- attention correctness
    def paged_batch(self, q_lens: list[int], ctx_lens: list[int], n_heads: int, n_kv: int, head_dim: int,
                    block_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """q, caches with each sequence's blocks scattered over a shuffled pool, tables, lengths, starts."""
        per_seq = [-(-c // block_size) for c in ctx_lens]
        num_blocks = sum(per_seq) + 7
        pool = torch.randperm(num_blocks, device=self.dev, generator=self.gen).to(torch.int32)
        tables = torch.zeros(len(ctx_lens), max(per_seq), dtype=torch.int32, device=self.dev)  # [S, max_blocks]
        used = 0
        for i, nb in enumerate(per_seq):
            tables[i, :nb] = pool[used:used + nb]
            used += nb
        kc = self.randn(num_blocks, block_size, n_kv, head_dim, dtype=dtype)
        vc = self.randn(num_blocks, block_size, n_kv, head_dim, dtype=dtype)
        q = self.randn(sum(q_lens), n_heads, head_dim, dtype=dtype)  # [N, H, hd]
        qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=self.dev)
        cl = torch.tensor(ctx_lens, dtype=torch.int32, device=self.dev)
        return q, kc, vc, tables, cl, qsl

    def _attn_case(self, tag: str, q_lens: list[int], ctx_lens: list[int], n_heads: int, n_kv: int, head_dim: int,
                   dtype: torch.dtype, block_size: int = 16, max_context_len: int | None = None,
                   window: int | None = None) -> None:
        q, kc, vc, bt, cl, qsl = self.paged_batch(q_lens, ctx_lens, n_heads, n_kv, head_dim, block_size, dtype)
        bound = max_context_len or max(ctx_lens)
        out = paged_attention(q, kc, vc, bt, cl, qsl, max_query_len=max(q_lens), max_context_len=bound,
                              sliding_window=window)
        ref = paged_attention_reference(q.float(), kc.float(), vc.float(), bt, cl, qsl, window)
        err = rel_err(out, ref)
        ok = bool(torch.isfinite(out).all()) and err < TOL[dtype]
        sms = self.res.get("sms", 132)
        split = decode_partition_size(len(ctx_lens), n_kv, bound, sms) if max(q_lens) == 1 else None
        self.res["attn_check"].append({"case": tag, "seqs": len(ctx_lens), "dtype": NAME[dtype], "heads": n_heads,
                                       "rel_err": err, "ok": ok, "split": split})
        self.log(f"  attn {tag:26s} {NAME[dtype]} H{n_heads}/KV{n_kv} seqs {len(ctx_lens):4d}"
                 f"{f' split {split}' if split else ''}: rel err {err:.2e} {'ok' if ok else 'FAIL'}")

    def check_attention(self) -> None:
        g = torch.Generator().manual_seed(7)
        rint = lambda lo, hi, n: torch.randint(lo, hi, (n,), generator=g).tolist()  # noqa: E731
        if self.smoke:
            heads, hd, dtypes, max_ctx = {"tiny": (8, 2)}, 32, [torch.float16], 300
            decode_batches = [1, 5]
        else:
            heads, hd, dtypes, max_ctx = ATTN_SHAPES, 128, [torch.bfloat16, torch.float16], 2048
            decode_batches = [1, 8, 64, 512]
        edges = [1, 15, 16, 17, 255, 256, 257, max_ctx]
        for model, (h, kv) in heads.items():
            for dtype in dtypes:
                for b in decode_batches:
                    ctx = (edges + rint(1, max_ctx + 1, b))[:b]
                    self._attn_case(f"{model} decode", [1] * b, ctx, h, kv, hd, dtype)
                self._attn_case(f"{model} decode bound 4x", [1] * 4, edges[-4:], h, kv, hd, dtype,
                                max_context_len=4 * max_ctx)
                q_lens = [1, 15, 16, 17, 100, 4 if self.smoke else 512]
                prefix = rint(0, 300, len(q_lens))
                ctx_lens = [a + b for a, b in zip(q_lens, prefix, strict=True)]
                self._attn_case(f"{model} prefill ragged", q_lens, ctx_lens, h, kv, hd, dtype)
                self._attn_case(f"{model} prefill fresh", [64 if self.smoke else 2048], [64 if self.smoke else 2048],
                                h, kv, hd, dtype)
                self._attn_case(f"{model} prefill block 8", [7, 33], [7, 90], h, kv, hd, dtype, block_size=8)
                self._attn_case(f"{model} window 100", [40, 1], [300, 280], h, kv, hd, dtype, window=100)
        # write_kv: strided k/v views of a fused qkv buffer, padding slots.
        n, kv, nb, bs = 300, 8, 64, 16
        qkv = self.randn(n, 32 + 2 * kv, 128, dtype=torch.bfloat16)
        k, v = qkv[:, 32:32 + kv], qkv[:, 32 + kv:]
        slots = torch.randperm(nb * bs, device=self.dev, generator=self.gen)[:n]
        slots[::7] = -1
        caches = [self.randn(nb, bs, kv, 128, dtype=torch.bfloat16) for _ in range(2)]
        expect = [c.clone() for c in caches]
        write_kv(k, v, caches[0], caches[1], slots)
        write_kv_reference(k, v, expect[0], expect[1], slots)
        ok = torch.equal(caches[0], expect[0]) and torch.equal(caches[1], expect[1])
        self.res["attn_check"].append({"case": "write_kv", "seqs": n, "dtype": "bf16", "heads": kv, "rel_err": 0.0,
                                       "ok": ok, "split": None})
        self.log(f"  write_kv 300 tokens, every 7th slot -1: {'exact' if ok else 'FAIL'}")

    # ---------------------------------------------------------------- CUDA graphs
    def check_graphs(self) -> None:
        """Capture fused MoE + paged decode once, replay on new inputs copied into the static buffers."""
        d, f, n = 4096, 14336, 8
        w13 = self.randn(8, 2 * f, d, dtype=torch.bfloat16, scale=d**-0.5)
        w2 = self.randn(8, d, f, dtype=torch.bfloat16, scale=f**-0.5)
        x = self.randn(n, d, dtype=torch.bfloat16)
        weights, ids = route_topk(self.randn(n, 8), 2)
        q, kc, vc, bt, cl, qsl = self.paged_batch([1] * n, [700] * n, 32, 8, 128, 16, torch.bfloat16)
        run = lambda: (fused_moe(x, w13, w2, weights, ids),  # noqa: E731
                       paged_attention(q, kc, vc, bt, cl, qsl, max_query_len=1, max_context_len=2048))
        graph, static_out = capture(run)
        x.copy_(self.randn(n, d, dtype=torch.bfloat16))
        w_new, id_new = route_topk(self.randn(n, 8), 2)
        weights.copy_(w_new)
        ids.copy_(id_new)
        q.copy_(self.randn(*q.shape, dtype=torch.bfloat16))
        cl.copy_(torch.randint(1, 701, (n,), device=self.dev, generator=self.gen).to(torch.int32))  # <= 44 blocks
        bt_full = torch.randperm(kc.shape[0], device=self.dev, generator=self.gen)[: n * bt.shape[1]]
        bt.copy_(bt_full.view(n, -1).to(torch.int32))
        graph.replay()
        eager = run()
        torch.cuda.synchronize()
        ok_moe = torch.equal(static_out[0], eager[0])
        ok_attn = torch.equal(static_out[1], eager[1])
        for tag, ok in (("graph replay fused_moe", ok_moe), ("graph replay paged decode", ok_attn)):
            self.res["attn_check" if "decode" in tag else "moe_check"].append(
                {"case": tag, "batch": n, "seqs": n, "dtype": "bf16", "rel_err": 0.0, "ok": ok, "split": None})
            self.log(f"  {tag}: {'identical to eager' if ok else 'FAIL (differs from eager)'}")

    # ---------------------------------------------------------------- timing
    def time_moe(self) -> None:
        for model, (d, f) in MOE_SHAPES.items():
            w13 = self.randn(8, 2 * f, d, dtype=torch.bfloat16, scale=d**-0.5)
            w2 = self.randn(8, d, f, dtype=torch.bfloat16, scale=f**-0.5)
            expert_bytes = 3 * f * d * 2
            for n in [1, 4, 8, 16, 64, 256]:
                x = self.randn(n, d, dtype=torch.bfloat16)
                weights, ids = route_topk(self.randn(n, 8), 2)
                hit = int(torch.unique(ids).numel())
                ms = self.graph_time_ms(functools.partial(fused_moe, x, w13, w2, weights, ids))
                gbs = hit * expert_bytes / (ms * 1e-3) / 1e9
                frac = gbs * 1e9 / self.copy_bw if self.copy_bw else float("nan")
                cfg = get_config(8, f, d, n, torch.bfloat16, self.dev)
                row = {"model": model, "batch": n, "experts_hit": hit, "us": ms * 1e3, "GBs": gbs,
                       "fraction_of_copy_bw": frac, "config": cfg.to_dict()}
                self.res["moe_time"].append(row)
                self.log(f"  moe {model:6s} batch {n:4d}: {hit} experts {ms * 1e3:8.1f} us  {gbs:7.0f} GB/s "
                         f"({frac:.0%} of copy)  block_m {cfg.block_m}")
            del w13, w2
            torch.cuda.empty_cache()

    def time_attention(self) -> None:
        h, kv, hd = 32, 8, 128
        for b, ctx in [(1, 512), (8, 512), (32, 512), (64, 512), (128, 512), (1, 4096), (8, 4096), (64, 4096)]:
            q, kc, vc, bt, cl, qsl = self.paged_batch([1] * b, [ctx] * b, h, kv, hd, 16, torch.bfloat16)
            ms = self.graph_time_ms(functools.partial(paged_attention, q, kc, vc, bt, cl, qsl, max_query_len=1,
                                                      max_context_len=ctx))
            kv_bytes = b * ctx * kv * hd * 2 * 2  # K and V, bf16
            gbs = kv_bytes / (ms * 1e-3) / 1e9
            frac = gbs * 1e9 / self.copy_bw if self.copy_bw else float("nan")
            self.res["attn_time"].append({"kind": "decode", "batch": b, "context": ctx, "us": ms * 1e3, "GBs": gbs,
                                          "fraction_of_copy_bw": frac})
            self.log(f"  decode batch {b:4d} ctx {ctx:5d}: {ms * 1e3:8.1f} us  {gbs:7.0f} GB/s ({frac:.0%} of copy)")
        self.sweep_prefill(h, kv, hd)
        for n in [512, 2048]:
            q, kc, vc, bt, cl, qsl = self.paged_batch([n], [n], h, kv, hd, 16, torch.bfloat16)
            ms = self.graph_time_ms(functools.partial(paged_attention, q, kc, vc, bt, cl, qsl, max_query_len=n,
                                                      max_context_len=n))
            flops = 4 * h * hd * n * (n + 1) / 2  # causal: QK^T and PV over the visible half
            tflops = flops / (ms * 1e-3) / 1e12
            self.res["attn_time"].append({"kind": "prefill", "batch": 1, "context": n, "us": ms * 1e3,
                                          "TFLOPs": tflops})
            self.log(f"  prefill {n:5d} tokens: {ms * 1e3:8.1f} us  {tflops:6.1f} TFLOP/s")

    def sweep_prefill(self, h: int, kv: int, hd: int, n: int = 2048) -> None:
        """Time (and check) prefill launch configs at one 2048-token prompt; the kernel's default is last."""
        import mixtral.kernels.triton.paged_attention as pa_mod

        default = pa_mod.prefill_launch_config
        q, kc, vc, bt, cl, qsl = self.paged_batch([n], [n], h, kv, hd, 16, torch.bfloat16)
        ref = paged_attention_reference(q.float(), kc.float(), vc.float(), bt, cl, qsl)
        flops = 4 * h * hd * n * (n + 1) / 2
        variants = [(128, 64, 8, 3), (128, 128, 8, 2), (128, 32, 4, 2), (64, 64, 4, 2), (64, 64, 4, 3),
                    (64, 128, 4, 2), (128, 64, 4, 2), (256, 32, 8, 2)]
        try:
            for cfg in variants:
                pa_mod.prefill_launch_config = lambda rows, bd, cfg=cfg: cfg
                try:
                    run = functools.partial(paged_attention, q, kc, vc, bt, cl, qsl, max_query_len=n,
                                            max_context_len=n)
                    err = rel_err(run(), ref)
                    ms = self.graph_time_ms(run)
                    self.res.setdefault("prefill_sweep", []).append({"config": cfg, "us": ms * 1e3, "rel_err": err})
                    self.log(f"  prefill variant {cfg}: {ms * 1e3:7.1f} us {flops / ms / 1e9:6.1f} TFLOP/s "
                             f"rel err {err:.1e}")
                except Exception as exc:  # a variant the chip cannot run
                    self.log(f"  prefill variant {cfg}: failed {type(exc).__name__}: {str(exc)[:100]}")
        finally:
            pa_mod.prefill_launch_config = default

    def moe_breakdown(self) -> None:
        """8x7B at batch 1 and 8: each piece of fused_moe on its own, three routings, and w2 tile variants."""
        from mixtral.kernels.triton.fused_moe import invoke_w2, invoke_w13, layout_pairs, w2_partials
        from mixtral.kernels.triton.moe_align import moe_align
        from mixtral.kernels.triton.moe_configs import GemmConfig

        d, f = MOE_SHAPES["8x7b"]
        w13 = self.randn(8, 2 * f, d, dtype=torch.bfloat16, scale=d**-0.5)
        w2 = self.randn(8, d, f, dtype=torch.bfloat16, scale=f**-0.5)
        expert_mb = 3 * f * d * 2 / 1e6
        for n in (1, 8):
            for trial in range(3):
                x = self.randn(n, d, dtype=torch.bfloat16)
                weights, ids = route_topk(self.randn(n, 8), 2)
                hit = int(torch.unique(ids).numel())
                cfg = get_config(8, f, d, n, torch.bfloat16, self.dev)
                lay = layout_pairs(ids, 8, cfg.block_m)  # direct (no align launch) at batch 1
                act = torch.empty(n * 2, f, device=self.dev, dtype=torch.bfloat16)
                flat_w = weights.reshape(-1).contiguous()
                t = {
                    "full": self.graph_time_ms(functools.partial(fused_moe, x, w13, w2, weights, ids)),
                    "align": self.graph_time_ms(functools.partial(moe_align, ids, 8, cfg.block_m)),
                    "w13": self.graph_time_ms(functools.partial(invoke_w13, x, w13, act, lay, 2,
                                                                cfg.block_m, cfg.w13)),
                }
                for c2 in [cfg.w2, GemmConfig(64, 256, 4, 3, 1), GemmConfig(32, 256, 4, 3, 2),
                           GemmConfig(64, 128, 4, 4, 4)]:
                    out = w2_partials(n * 2, d, c2, torch.bfloat16, self.dev)
                    t[f"w2 {c2.block_n}x{c2.block_k} s{c2.num_stages} k{c2.split_k}"] = self.graph_time_ms(
                        functools.partial(invoke_w2, act, w2, out, flat_w, lay, cfg.block_m, c2))
                parts = "  ".join(f"{k} {v * 1e3:.1f}" for k, v in t.items())
                self.log(f"  8x7b batch {n} trial {trial}: {hit} experts ({hit * expert_mb:.0f} MB) us: {parts}")
                self.res.setdefault("moe_breakdown", []).append({"batch": n, "experts_hit": hit,
                                                                 "us": {k: v * 1e3 for k, v in t.items()}})

    # ---------------------------------------------------------------- summary
    def summary(self) -> None:
        checks = self.res["moe_check"] + self.res["attn_check"]
        bad = [c for c in checks if not c["ok"]]
        worst = {}
        for c in checks:
            key = (c["case"].split()[0], c["dtype"])
            worst[key] = max(worst.get(key, 0.0), c["rel_err"])
        self.log("== summary")
        self.log(f"device {self.res['device']}  commit {self.res.get('commit', '')}  "
                 f"copy {self.res.get('copy_bandwidth_GBs', 0):.0f} GB/s")
        self.log(f"checks: {len(checks) - len(bad)}/{len(checks)} ok; worst rel err per (shape, dtype): "
                 + ", ".join(f"{k[0]}/{k[1]} {v:.1e}" for k, v in sorted(worst.items())))
        for c in bad:
            self.log(f"  FAILED {c}")
        for r in self.res["moe_time"]:
            self.log(f"moe {r['model']:6s} b{r['batch']:<4d} {r['experts_hit']} exp {r['us']:8.1f} us "
                     f"{r['GBs']:6.0f} GB/s {r['fraction_of_copy_bw']:.0%}")
        for r in self.res["attn_time"]:
            if "GBs" in r:
                tail = f"{r['GBs']:6.0f} GB/s {r['fraction_of_copy_bw']:.0%}"
            else:
                tail = f"{r['TFLOPs']:.0f} TFLOP/s"
            self.log(f"attn {r['kind']:7s} b{r['batch']:<4d} ctx {r['context']:5d} {r['us']:8.1f} us {tail}")
        for e in self.res["errors"]:
            self.log(f"ERROR in {e['section']}: {e['traceback'].splitlines()[-1]}")
