"""The kernel flags shared by every command that runs a model (serve, generate, chat, bench gpu / throughput,
train): ``add_kernel_args(parser)`` adds them as one group, ``kernel_config_from_args(args)`` turns them into a
``KernelConfig``. argparse refuses a value outside the allowed ones and lists them.
"""

from __future__ import annotations

import argparse

from mixtral.kernels.config import BACKENDS, CPU_INT_KERNELS, MOE_PREFILL, KernelConfig


def add_kernel_args(parser: argparse.ArgumentParser) -> None:
    """Add the ``kernels`` flag group to ``parser``."""
    g = parser.add_argument_group("kernels", "which implementation runs each fused op (defaults: the fastest)")
    g.add_argument("--kernel-backend", choices=BACKENDS, default="auto",
                   help="auto: the Triton kernels on CUDA when Triton is installed, PyTorch elsewhere; triton: "
                        "require them; reference: the readable PyTorch reference everywhere, for debugging a "
                        "kernel (slow; no CUDA graphs) (default: auto)")
    g.add_argument("--moe-prefill", choices=MOE_PREFILL, default="sorted",
                   help="the MoE experts of prefill-sized steps (>= 1024 tokens) on Hopper: sorted, the "
                        "sorted-row TMA GEMMs with the tiles tuned for the GPU; persistent, the same GEMMs with "
                        "persistent tiles forced on; triton, the decode kernel at every size (default: sorted)")
    g.add_argument("--no-dense-prefill", dest="dense_prefill", action="store_false",
                   help="long fresh prompts attend through the paged Triton kernel instead of PyTorch's cuDNN "
                        "attention")
    g.add_argument("--no-fused-gate", dest="fused_gate", action="store_false",
                   help="route decode-sized MoE batches with a GEMM, softmax and top-k instead of one fused "
                        "Triton kernel")
    g.add_argument("--no-pdl", dest="pdl", action="store_false",
                   help="launch the Triton kernels without programmatic dependent launch (Hopper and later; "
                        "on by default)")
    g.add_argument("--cpu-int-kernel", choices=CPU_INT_KERNELS, default="auto",
                   help="int4/int8 weights on CPU: native, an integer-dot kernel built with this machine's C "
                        "compiler on first use (x86 with AVX512-VNNI or AVX2; activations rounded to int8 in blocks "
                        "of 32 as llama.cpp does; 2-4x the packed matmuls at batch 1); packed, PyTorch's packed "
                        "matmuls (bf16 activations, exact W4A16/W8A16); auto, native where it runs, else packed "
                        "(default: auto)")


def kernel_config_from_args(args: argparse.Namespace) -> KernelConfig:
    """The ``KernelConfig`` the kernel flags name (defaults for flags a namespace built in code lacks)."""
    return KernelConfig(backend=getattr(args, "kernel_backend", "auto"),
                        moe_prefill=getattr(args, "moe_prefill", "sorted"),
                        dense_prefill=getattr(args, "dense_prefill", True),
                        fused_gate=getattr(args, "fused_gate", True), pdl=getattr(args, "pdl", True),
                        cpu_int_kernel=getattr(args, "cpu_int_kernel", "auto"))
