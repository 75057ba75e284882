"""KernelConfig: which implementation runs each fused op, validated on construction.

It only names the choice; ``kernels/dispatch.py`` turns it into the ops a model calls (the one module that
reads it). The engine holds it as ``EngineConfig.kernels`` and the CLIs fill it from their kernel flags
(``cli/kernel_args.py``). Nothing here looks at the machine: whether Triton is installed, or a CUDA device is
there, is checked when the dispatch is built.
"""

from __future__ import annotations

from dataclasses import dataclass

# ``auto``: the Triton kernels for CUDA tensors when Triton is importable, the PyTorch paths elsewhere.
# ``triton``: the Triton kernels, an error where Triton is missing (on CPU tensors they run only under Triton's
# interpreter, TRITON_INTERPRET=1: the CPU kernel tests). ``reference``: kernels/reference.py everywhere.
BACKENDS = ("auto", "triton", "reference")
# The MoE experts at prefill-sized token counts on sm90+ (below them the Triton decode kernel runs):
# ``sorted``: the sorted-row TMA GEMMs with the tiles tuned per device (persistent tiles where those won);
# ``persistent``: the same GEMMs with persistent tiles forced on for both; ``triton``: the decode kernel at
# every size.
MOE_PREFILL = ("sorted", "persistent", "triton")
# Integer weights on CPU: ``native``: the integer-dot kernel (kernels/int_dot.c: int8 activations in blocks of 32,
# as llama.cpp's; x86 CPUs with AVX512-VNNI or AVX2, built with the machine's C compiler), an error where it
# cannot run; ``packed``: PyTorch's packed matmuls (bf16 activations); ``auto``: native where it runs, else packed.
CPU_INT_KERNELS = ("auto", "native", "packed")


def _one_of(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"kernel config: {name}={value!r} is not one of {', '.join(allowed)}")


@dataclass(frozen=True)
class KernelConfig:
    """Per op, which implementation runs.

    - ``backend``: ``auto`` | ``triton`` | ``reference`` (see ``BACKENDS``).
    - ``moe_prefill``: ``sorted`` | ``persistent`` | ``triton`` (see ``MOE_PREFILL``).
    - ``dense_prefill``: a step of fresh prompts attends with PyTorch's SDPA (cuDNN first) instead of the
      paged kernel, from the lengths where that wins (kernels/dispatch.py says which).
    - ``fused_gate``: at decode sizes the MoE router (gate GEMM, softmax, top-k, counts) is one Triton kernel.
    - ``pdl``: Triton kernels launch with programmatic dependent launch on sm90+ (kernels/triton/pdl.py).
    - ``cpu_int_kernel``: ``auto`` | ``native`` | ``packed`` (see ``CPU_INT_KERNELS``).
    """

    backend: str = "auto"
    moe_prefill: str = "sorted"
    dense_prefill: bool = True
    fused_gate: bool = True
    pdl: bool = True
    cpu_int_kernel: str = "auto"

    def __post_init__(self) -> None:
        _one_of("backend", self.backend, BACKENDS)
        _one_of("cpu_int_kernel", self.cpu_int_kernel, CPU_INT_KERNELS)
        _one_of("moe_prefill", self.moe_prefill, MOE_PREFILL)
        for name in ("dense_prefill", "fused_gate", "pdl"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"kernel config: {name} must be True or False, got {value!r}")
