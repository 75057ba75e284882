"""Compile the FP8 kernels for a GPU architecture on a machine without one, at Mixtral-8x7B shapes, through
compile_check.py's stand-in driver (launches compile down to ptxas and return without running).

    python -m mixtral.kernels.triton.fp8_compile_check --arch 90 [--json out.json]

Besides compile_check's report (kernels, PDL waits, errors) each kernel's matrix instructions and whether it
loads through TMA are recorded: the prefill GEMMs must run FP8 ``wgmma`` (e4m3 x e4m3) with TMA loads. The
decode tiles (16 rows) compile to ``mma.sync`` on f16 operands: sm90 has no FP8 ``mma.sync``, so Triton
widens the FP8 codes to f16 in registers (exact: every e4m3 value is an f16, every product fits fp32).
FP8 MMAs exist from sm89 (Ada) on; below that there is nothing to build. Run it with ``TRITON_INTERPRET``
unset.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from mixtral.kernels.triton.compile_check import cli, describe_mma, empty, routing, run_cases

FP8_MIN_ARCH = 89


def fp8_cases(arch: int) -> dict[str, Callable[[], object]]:
    """One call per FP8 kernel variant the decode and prefill steps launch (none below sm89)."""
    if arch < FP8_MIN_ARCH:
        return {}
    from mixtral.kernels.triton import (
        fp8_fused_moe,
        fp8_gemm,
        fp8_quant,
        fp8_sorted_moe,
        moe_configs,
        paged_attention,
        rope,
        write_kv,
    )
    from mixtral.quant.fp8 import FP8

    bf16 = torch.bfloat16
    d, f, e, qkv, hd, heads, kv = 4096, 14336, 8, 6144, 128, 32, 8

    w13, w2 = empty(e, 2 * f, d, dtype=FP8), empty(e, d, f, dtype=FP8)
    s13, s2 = empty(e, 2 * f, dtype=torch.float32), empty(e, d, dtype=torch.float32)
    one = torch.ones(1)

    def moe(n: int, direct: bool | None = None, config: moe_configs.MoEConfig | None = None) -> object:
        return fp8_fused_moe.fp8_fused_moe(empty(n, d), w13, s13, w2, s2, *routing(n), config=config, direct=direct)

    blocks, page = 64, 16
    k_cache, v_cache = empty(blocks, page, kv, hd, dtype=FP8), empty(blocks, page, kv, hd, dtype=FP8)

    def attention(n_seqs: int, q_len: int) -> object:
        ctx = 300
        tables = torch.arange(n_seqs * 20, dtype=torch.int32).reshape(n_seqs, 20) % blocks
        return paged_attention.paged_attention(
            empty(n_seqs * q_len, heads, hd), k_cache, v_cache, tables, torch.full((n_seqs,), ctx, dtype=torch.int32),
            torch.arange(n_seqs + 1, dtype=torch.int32) * q_len, max_query_len=q_len, max_context_len=ctx,
            k_scale=0.5, v_scale=0.25)

    split_k = moe_configs.MoEConfig(16, moe_configs.GemmConfig(64, 128), moe_configs.GemmConfig(64, 256, split_k=2))
    return {
        "fp8 quantize_rows": lambda: fp8_quant.quantize_rows(empty(4, d)),
        "fp8 quantize_rows (static, bounded)": lambda: fp8_quant.quantize_rows(
            empty(64, f), one, torch.tensor([40], dtype=torch.int32)),
        "fp8 quantize_rows (by expert)": lambda: fp8_quant.quantize_rows(
            empty(2, f), row_experts=(routing(1)[1].view(-1), 0, e)),
        "fp8 linear wqkv, 1 row": lambda: fp8_gemm.fp8_linear(empty(1, d), empty(qkv, d, dtype=FP8),
                                                              empty(qkv, dtype=torch.float32)),
        "fp8 gemm wo, 2048 rows": lambda: fp8_gemm.fp8_gemm(
            empty(2048, d, dtype=FP8), empty(2048, dtype=torch.float32), empty(d, d, dtype=FP8),
            empty(d, dtype=torch.float32), bf16),
        "fp8 fused_moe batch 1 (direct)": lambda: moe(1),
        "fp8 fused_moe batch 64 (aligned)": lambda: moe(64),
        "fp8 fused_moe batch 2, split-K w2": lambda: moe(2, True, split_k),
        "fp8 KV write_kv": lambda: write_kv.write_kv(empty(4, kv, hd), empty(4, kv, hd), k_cache, v_cache,
                                                     torch.arange(4, dtype=torch.int64), 0.5, 0.25),
        "fp8 KV rope_qk + cache store": lambda: rope.rope_qk(
            empty(1, heads, hd), empty(1, kv, hd), empty(1, hd), empty(1, hd),
            cache=(empty(1, kv, hd), k_cache, v_cache, torch.zeros(1, dtype=torch.int64)), kv_scales=(0.5, 0.25)),
        "fp8 KV decode attention": lambda: attention(4, 1),
        "fp8 KV prefill attention": lambda: attention(2, 64),
        "fp8 sorted_moe 2048": lambda: fp8_sorted_moe.fp8_sorted_moe(empty(2048, d), w13, s13, w2, s2, *routing(2048),
                                                                     use_tma=arch >= 90),
    }


def check(arch: int = 90, only: list[str] | None = None) -> list[dict[str, object]]:
    """Compile every FP8 case for ``arch``: per case its kernels (name, PDL wait, matrix instructions, TMA) and
    the error, if one failed."""
    return run_cases(arch, fp8_cases(arch), only, _describe)


def _describe(name: str, ptx: str) -> dict[str, object]:
    return {**describe_mma(name, ptx), "tma": "cp.async.bulk.tensor" in ptx}


def _label(kernel: dict[str, object]) -> str:
    return " ".join(filter(None, [str(kernel["name"]), "/".join(kernel["mma"]),  # type: ignore[arg-type]
                                  "tma" if kernel["tma"] else ""]))


def main() -> int:
    return cli(__doc__ or "", check, _label, width=40, what="FP8 cases")


if __name__ == "__main__":
    sys.exit(main())
