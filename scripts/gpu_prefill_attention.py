"""A fresh prompt's causal attention at prefill sizes: the paged Triton kernel against PyTorch's SDPA backends
(flash, cuDNN, memory-efficient) on the same q/k/v with GQA, TFLOP/s (causal half counted) and max error
against the fp32 reference. Needs a CUDA GPU.

    PYTHONPATH=src python3 scripts/gpu_prefill_attention.py --tokens 512,2048,8192
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from mixtral.kernels.dispatch import Kernels
from mixtral.kernels.triton.paged_attention import paged_attention

ops = Kernels()  # the default KernelConfig: what the engine runs


def measure(n: int, h: int, kv: int, hd: int, bs: int) -> list[dict[str, object]]:
    """Every variant at n tokens: time, TFLOP/s and max error against the fp32 reference."""
    dev, dt = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(n)
    q = torch.randn(n, h, hd, device=dev, dtype=dt, generator=gen)
    k = torch.randn(n, kv, hd, device=dev, dtype=dt, generator=gen)
    v = torch.randn(n, kv, hd, device=dev, dtype=dt, generator=gen)
    nb = triton.cdiv(n, bs)
    k_cache = k.new_zeros(nb * bs, kv, hd)
    v_cache = v.new_zeros(nb * bs, kv, hd)
    k_cache[:n], v_cache[:n] = k, v
    k_cache, v_cache = k_cache.view(nb, bs, kv, hd), v_cache.view(nb, bs, kv, hd)
    tables = torch.arange(nb, device=dev, dtype=torch.int32)[None]
    ctx = torch.tensor([n], device=dev, dtype=torch.int32)
    qsl = torch.tensor([0, n], device=dev, dtype=torch.int32)
    flops = 4 * n * n / 2 * h * hd
    qt, kt, vt = (t.transpose(0, 1)[None] for t in (q, k, v))  # [1, H, N, hd] views
    ref = F.scaled_dot_product_attention(qt.float(), kt.float(), vt.float(), is_causal=True,
                                         enable_gqa=True)[0].transpose(0, 1)

    def sdpa(backend: SDPBackend) -> torch.Tensor:
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)[0].transpose(0, 1)

    variants = {
        "triton_paged": lambda: paged_attention(q, k_cache, v_cache, tables, ctx, qsl, max_query_len=n,
                                                max_context_len=n),
        "sdpa_flash": lambda: sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa_cudnn": lambda: sdpa(SDPBackend.CUDNN_ATTENTION),
        "sdpa_efficient": lambda: sdpa(SDPBackend.EFFICIENT_ATTENTION),
        # What the engine runs for a step of fresh prompts (cuDNN first, written back to [N, H, hd]).
        "ops_dense": lambda: ops.dense_prefill_attention(q, k, v, [n]),
    }
    rows: list[dict[str, object]] = []
    for name, fn in variants.items():
        try:
            out = fn().float()
            us = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3
            row: dict[str, object] = {"tokens": n, "variant": name, "us": us, "TFLOPs": flops / us / 1e6,
                                      "max_err": (out - ref).abs().max().item()}
        except Exception as exc:  # a backend this build lacks must not hide the others
            row = {"tokens": n, "variant": name, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        rows.append(row)
        print(row, flush=True)
    # Two fresh prompts in one step: the dense path against the paged kernel on the same cache.
    lens = [n // 2 + n // 8, n - n // 2 - n // 8]
    qsl2 = torch.tensor([0, lens[0], n], device=dev, dtype=torch.int32)
    nb0 = triton.cdiv(lens[0], bs)
    tables2 = torch.zeros(2, nb, device=dev, dtype=torch.int32)
    k2, v2 = k_cache.new_zeros(2 * nb * bs, kv, hd), v_cache.new_zeros(2 * nb * bs, kv, hd)
    k2[:lens[0]], v2[:lens[0]] = k[:lens[0]], v[:lens[0]]
    k2[nb0 * bs:nb0 * bs + lens[1]], v2[nb0 * bs:nb0 * bs + lens[1]] = k[lens[0]:], v[lens[0]:]
    tables2[0, :nb0] = torch.arange(nb0, device=dev)
    tables2[1, :nb] = torch.arange(nb0, nb0 + nb, device=dev)
    paged = paged_attention(q, k2.view(-1, bs, kv, hd), v2.view(-1, bs, kv, hd), tables2,
                            torch.tensor(lens, device=dev, dtype=torch.int32), qsl2, max_query_len=max(lens),
                            max_context_len=max(lens))
    dense = ops.dense_prefill_attention(q, k, v, lens)
    row = {"tokens": n, "variant": "two_prompts_dense_vs_paged", "lens": lens,
           "max_diff": None if dense is None else (dense.float() - paged.float()).abs().max().item()}
    rows.append(row)
    print(row, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="512,2048,8192", help="comma-separated prompt lengths to time")
    ap.add_argument("--heads", type=int, default=32, help="query heads")
    ap.add_argument("--kv-heads", type=int, default=8, help="key/value heads (GQA groups)")
    ap.add_argument("--head-dim", type=int, default=128, help="dimension of each head")
    ap.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    ap.add_argument("--json", default=None, help="write the timings here")
    args = ap.parse_args()
    rows = []
    for n in (int(t) for t in args.tokens.split(",")):
        rows += measure(n, args.heads, args.kv_heads, args.head_dim, args.block_size)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
