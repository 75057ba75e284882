"""What a kernel boundary costs inside a CUDA graph, and what programmatic dependent launch (PDL) saves.

A decode step at batch 1 is ~13 kernels a layer, most of them latency-bound; this times chains of them
captured in a graph: tiny one-program kernels alone, and a layer-shaped chain (norm, GEMVs over real 8x7B
weight sizes, small kernels between), each with PDL off and on (``launch_pdl`` plus ``gdc_wait`` at the
top of every kernel, optionally a first weight tile read before the wait).

    PYTHONPATH=src python3 scripts/gpu_pdl_probe.py --json out.json
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from mixtral.bench.cuda_timing import graph_ms


@triton.jit
def _vec_kernel(x_ptr, y_ptr, D: tl.constexpr, PDL: tl.constexpr):
    """y = rmsnorm(x) for one [D] row: one program, pure latency."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    offs = tl.arange(0, D)
    x = tl.load(x_ptr + offs).to(tl.float32)
    y = x * tl.rsqrt(tl.sum(x * x, 0) / D + 1e-5)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty))


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, D: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr,
                 PREFETCH: tl.constexpr):
    """y[n] = w[n] . x for a [BN] slice of rows; w [N, D] streamed from HBM."""
    pid = tl.program_id(0)
    offs_n = pid * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * D + offs_k[None, :]  # [BN, BK]
    acc = tl.zeros((BN,), dtype=tl.float32)
    k_first = 0
    if PDL:
        if PREFETCH:  # the first weight tile does not depend on the previous kernel: read it before the wait
            w0 = tl.load(w_ptrs).to(tl.float32)
            gdc_wait()
            gdc_launch_dependents()
            x0 = tl.load(x_ptr + offs_k).to(tl.float32)
            acc += tl.sum(w0 * x0[None, :], 1)
            k_first = BK
        else:
            gdc_wait()
            gdc_launch_dependents()
    for k in range(k_first, D, BK):
        w = tl.load(w_ptrs + k).to(tl.float32)
        x = tl.load(x_ptr + k + offs_k).to(tl.float32)
        acc += tl.sum(w * x[None, :], 1)
    tl.store(y_ptr + offs_n, acc.to(y_ptr.dtype.element_ty))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=32, help="layer-shaped chains to time back to back")
    ap.add_argument("--json", default="", help="write the figures here")
    args = ap.parse_args()
    dev = torch.device("cuda")
    d = 4096
    x = torch.randn(d, device=dev, dtype=torch.bfloat16)
    ys = [torch.empty(d, device=dev, dtype=torch.bfloat16) for _ in range(2)]
    out: dict[str, object] = {"device": torch.cuda.get_device_name(), "triton": triton.__version__,
                              "torch": torch.__version__}

    def tiny_chain(pdl: bool, n: int = 400) -> None:
        src = x
        for i in range(n):
            _vec_kernel[(1,)](src, ys[i % 2], D=d, PDL=pdl, launch_pdl=pdl, num_warps=4)
            src = ys[i % 2]

    for pdl in (False, True):
        ms = graph_ms(lambda pdl=pdl: tiny_chain(pdl))
        out[f"tiny_us_per_kernel_pdl{int(pdl)}"] = ms * 1e3 / 400
        print(f"tiny kernel chain, PDL {pdl}: {ms * 1e3 / 400:.2f} us a kernel", flush=True)

    # A layer-shaped chain: norm, wqkv, 3 small, wo, norm, small, w13 (2 experts), w2 (2 experts), small.
    rows = [6144, 4096, 2 * 2 * 14336, 2 * 4096]
    ks = [d, d, d, 14336]
    weights = [[torch.randn(r, k, device=dev, dtype=torch.bfloat16) * 0.01 for r, k in zip(rows, ks, strict=True)]
               for _ in range(args.layers)]
    bufs = [torch.randn(max(rows + ks), device=dev, dtype=torch.bfloat16) for _ in range(2)]
    bytes_per_layer = sum(w.numel() * 2 for w in weights[0])

    def layer_chain(pdl: bool, prefetch: bool, bn: int, bk: int) -> None:
        for layer in weights:
            for j, w in enumerate(layer):
                n_small = (1, 3, 2, 1)[j]
                for _ in range(n_small):
                    _vec_kernel[(1,)](bufs[0], bufs[1], D=d, PDL=pdl, launch_pdl=pdl, num_warps=4)
                _gemv_kernel[(w.shape[0] // bn,)](bufs[1], w, bufs[0], D=w.shape[1], BN=bn, BK=bk, PDL=pdl,
                                                   PREFETCH=prefetch, launch_pdl=pdl, num_warps=4)

    def gemv_only(bn: int, bk: int) -> None:
        for layer in weights:
            for w in layer:
                _gemv_kernel[(w.shape[0] // bn,)](bufs[1], w, bufs[0], D=w.shape[1], BN=bn, BK=bk, PDL=False,
                                                   PREFETCH=False, launch_pdl=False, num_warps=4)

    total_bytes = bytes_per_layer * args.layers
    for bn, bk in ((16, 512), (32, 256)):
        base = graph_ms(lambda bn=bn, bk=bk: gemv_only(bn, bk), reps=10)
        out[f"gemv_only_{bn}x{bk}_ms"] = base
        print(f"GEMVs alone {bn}x{bk}: {base:.3f} ms, {total_bytes / base / 1e9:.0f} GB/s", flush=True)
        for pdl, prefetch in ((False, False), (True, False), (True, True)):
            ms = graph_ms(lambda pdl=pdl, prefetch=prefetch, bn=bn, bk=bk: layer_chain(pdl, prefetch, bn, bk),
                          reps=10)
            key = f"layer_chain_{bn}x{bk}_pdl{int(pdl)}_prefetch{int(prefetch)}_ms"
            out[key] = ms
            print(f"layer chain {bn}x{bk} PDL {pdl} prefetch {prefetch}: {ms:.3f} ms "
                  f"({(ms - base) * 1e3 / args.layers:.1f} us a layer over the GEMVs alone, "
                  f"{total_bytes / ms / 1e9:.0f} GB/s)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
