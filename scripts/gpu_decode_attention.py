"""Batch-1 decode attention as the decode step runs it: the partition size of the split-K kernel, timed in a
CUDA graph of 32 layers of (RoPE + K/V store, paged attention), each layer its own cache.

The partition size comes from the graph's context bound (max_model_len), not the running context; this
times the current choice against fixed caps and against no split, for a 512-token context under the
bench's bound (2056) and under 32K.

    PYTHONPATH=src python3 scripts/gpu_decode_attention.py --json out.json
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Callable

import torch

from mixtral.bench.cuda_timing import graph_ms
from mixtral.kernels.dispatch import Kernels
from mixtral.kernels.triton import paged_decode

ops = Kernels()  # the default KernelConfig: what the engine runs


def _capped(original: Callable[..., int | None], cap: int, s: int, h: int, m: int, sms: int) -> int:
    return min(cap, max(64, original(s, h, m, sms) or cap))


def _fixed(size: int | None, s: int, h: int, m: int, sms: int) -> int | None:
    return size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=32,
                    help="layers of KV cache (one attention call each) timed together")
    ap.add_argument("--context", type=int, default=512, help="tokens in the sequence, the new one included")
    ap.add_argument("--json", default=None, help="write the timings here")
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    heads, kv, hd, page = 32, 8, 128, 16
    blocks = args.context // page + 2
    caches = [(torch.randn(blocks, page, kv, hd, device=dev, dtype=dt), torch.randn(blocks, page, kv, hd, device=dev,
                                                                                    dtype=dt))
              for _ in range(args.layers)]
    qkv = torch.randn(1, (heads + 2 * kv) * hd, device=dev, dtype=dt)
    q, k, v = (t.view(1, -1, hd) for t in qkv.split([heads * hd, kv * hd, kv * hd], dim=-1))
    cos, sin = torch.randn(1, hd, device=dev, dtype=dt), torch.randn(1, hd, device=dev, dtype=dt)
    tables = torch.arange(blocks, device=dev, dtype=torch.int32)[None, :]  # [1, blocks]
    lens = torch.tensor([args.context], device=dev, dtype=torch.int32)
    qsl = torch.tensor([0, 1], device=dev, dtype=torch.int32)
    slot = torch.tensor([args.context - 1], device=dev, dtype=torch.int64)

    def step(bound: int) -> None:
        for kc, vc in caches:
            qr, _ = ops.rope_qk_store(q, k, v, cos, sin, kc, vc, slot)
            ops.paged_attention(qr, kc, vc, tables, lens, qsl, max_query_len=1, max_context_len=bound)

    original = paged_decode.decode_partition_size
    out: dict[str, float] = {}
    try:
        for bound in (2056, 32768):
            variants: dict[str, Callable[..., int | None]] = {"current": original}
            for cap in (64, 128, 256, 512):
                variants[f"cap {cap}"] = functools.partial(_capped, original, cap)
            for size in (256, 512):
                variants[f"fixed {size}"] = functools.partial(_fixed, size)
            variants["no split"] = functools.partial(_fixed, None)
            for name, fn in variants.items():
                paged_decode.decode_partition_size = fn  # type: ignore[assignment]
                us = graph_ms(lambda bound=bound: step(bound)) * 1e3 / args.layers
                chosen = fn(1, kv, bound, torch.cuda.get_device_properties(dev).multi_processor_count)
                out[f"bound {bound} {name} (partition {chosen})"] = us
                print(f"bound {bound:6d} {name:10s} partition {chosen!s:5s}: {us:6.2f} us a layer", flush=True)
    finally:
        paged_decode.decode_partition_size = original
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "context": args.context, "us_per_layer": out}, fh,
                      indent=1)


if __name__ == "__main__":
    main()
