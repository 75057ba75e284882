"""Compile the W4A16 / W8A16 kernels for a GPU architecture on a machine without one, at Mixtral-8x7B and
8x22B shapes, through compile_check.py's stand-in driver (launches compile down to ptxas, nothing runs).

    python -m mixtral.kernels.triton.int_compile_check --arch 90 [--json out.json]

Each kernel's matrix instructions are recorded: the dequantized tiles must reach the tensor cores as bf16
(``mma``/``wgmma`` on bf16 operands), and every kernel must wait for its predecessor under PDL. So is the shared
memory each launch asks for, which must fit Hopper's 227 KB a block (a launch over it fails on the GPU). Run it with
``TRITON_INTERPRET`` unset.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from mixtral.kernels.triton.compile_check import cli, describe_mma, routing, run_cases


def int_cases() -> dict[str, Callable[[], object]]:
    """One call per int kernel variant the decode and prefill steps launch, on empty tensors of real shapes."""
    from mixtral.kernels.triton import int_linear, int_moe
    from mixtral.kernels.triton.moe_configs import GemmConfig
    from mixtral.quant.int_layout import IntFormat

    bf16 = torch.bfloat16

    def weight(fmt: IntFormat, lead: tuple[int, ...], n: int, k: int, act_order: bool = False) -> dict:
        t = {s.name: torch.empty(s.shape(lead, n, k), dtype=s.dtype) for s in fmt.stored()}
        if act_order:
            t["perm"] = torch.zeros(*lead, k, dtype=torch.int32)
        return t

    int4 = IntFormat(4, 128, torch.float16, "none")
    awq = IntFormat(4, 128, torch.float16, "int")
    int8 = IntFormat(8, 0, torch.float16, "none")
    q4k = IntFormat(4, 32, torch.float32, "float")
    q6k = IntFormat(8, 16, torch.float32, "none")

    def moe(fmt13: IntFormat, fmt2: IntFormat, d: int, f: int, n: int, act_order: bool = False,
            config: int_moe.IntMoEConfig | None = None) -> object:
        w13, w2 = weight(fmt13, (8,), 2 * f, d, act_order), weight(fmt2, (8,), d, f, act_order)
        return int_moe.int_fused_moe(torch.empty(n, d, dtype=bf16), w13, w2, *routing(n), config=config)

    split_k = int_moe.IntMoEConfig(16, GemmConfig(64, 128), GemmConfig(64, 128, split_k=4))
    return {
        "int4 linear wqkv 8x7B, 1 row": lambda: int_linear.int_linear(torch.empty(1, 4096, dtype=bf16),
                                                                      weight(int4, (), 6144, 4096)),
        "int4 zero-point linear wo 8x22B, 2048 rows": lambda: int_linear.int_linear(
            torch.empty(2048, 6144, dtype=bf16), weight(awq, (), 6144, 6144)),
        "int8 linear act-order, 4 rows": lambda: int_linear.int_linear(
            torch.empty(4, 4096, dtype=bf16), weight(IntFormat(8, 128, torch.float16, "int", True), (), 4096, 4096)),
        "int4 fused_moe 8x7B batch 1 (direct)": lambda: moe(int4, int4, 4096, 14336, 1),
        "int4 fused_moe 8x22B batch 1, split-K 4": lambda: moe(int4, int4, 6144, 16384, 1, config=split_k),
        "int4 zero-point fused_moe 8x7B batch 64 (aligned)": lambda: moe(awq, awq, 4096, 14336, 64),
        "int4 act-order fused_moe 8x7B batch 8": lambda: moe(IntFormat(4, 128, torch.float16, "int", True),
                                                             IntFormat(4, 128, torch.float16, "int", True),
                                                             4096, 14336, 8, act_order=True),
        "int8 fused_moe 8x22B prefill 2048": lambda: moe(int8, int8, 6144, 16384, 2048),
        "gguf q4_k/q6_k fused_moe 8x7B batch 4": lambda: moe(q4k, q6k, 4096, 14336, 4),
        "gguf q4_k/q6_k fused_moe 8x22B prefill 1024": lambda: moe(q4k, q6k, 6144, 16384, 1024),
    }


def check(arch: int = 90, only: list[str] | None = None) -> list[dict[str, object]]:
    """Compile every int case for ``arch``: per case its kernels (name, PDL wait, matrix instructions) and the
    error, if one failed."""
    return run_cases(arch, int_cases(), only, describe_mma)


def _label(kernel: dict[str, object]) -> str:
    return f"{kernel['name']}{'' if kernel['pdl_wait'] else ' (no PDL wait)'} {kernel['mma']} {kernel['shared']} B smem"


def main() -> int:
    return cli(__doc__ or "", check, _label, width=48)


if __name__ == "__main__":
    sys.exit(main())
