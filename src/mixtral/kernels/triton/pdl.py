"""Programmatic dependent launch (PDL) for the Triton kernels on Hopper and later.

A batch-1 decode step is ~13 kernels a layer and most of them are latency-bound; in a CUDA graph each one
still waited for the previous kernel to finish before its blocks were even scheduled. With PDL a kernel is
launched while its predecessor runs: its blocks are placed, then stop at ``gdc_wait`` (``griddepcontrol.wait``)
until the predecessor has completed and its writes are visible. Measured on an H200 (docs/KERNELS.md):
a chain of one-program kernels 1.21 -> 1.01 us a kernel, a layer-shaped chain of 7 small kernels and 4 GEMVs
11.5 -> 5.4 us a layer of overhead over the GEMVs alone.

The rule that keeps it correct: every kernel launched with PDL calls ``pdl_enter`` before it writes any
memory or reads anything but constant model weights, and before any early exit. (Reading a weight tile
first is the point for the router and the skinny GEMM: those bytes arrive while the previous kernel runs.)
A kernel therefore finishes only after its predecessor finished, so completion stays transitive down the
stream (a kernel two launches later may read what this one wrote), and no kernel writes memory that the
still-running previous kernel reads. Kernels that PyTorch launches (no PDL attribute) keep the ordinary
full-completion ordering on both sides.

Off on CPUs and the Triton interpreter (which has no ``griddepcontrol``), below sm90, and where the caller
passes ``enabled=False`` (``KernelConfig.pdl``, which kernels/dispatch.py hands every kernel it launches).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# Read once at import, as Triton itself reads it when the kernels are decorated: the interpreter has no
# griddepcontrol.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAS_GDC = True
except ImportError:  # Triton before 3.3 has no griddepcontrol: kernels launch the ordinary way
    gdc_launch_dependents = gdc_wait = None
    HAS_GDC = False


@functools.lru_cache(maxsize=16)
def _device_supports(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_on(t: torch.Tensor, enabled: bool = True) -> bool:
    """Whether kernels on ``t``'s device launch with PDL: ``enabled``, a CUDA tensor on sm90+, and compiled
    (not interpreted) Triton 3.3 or later."""
    if not enabled or not HAS_GDC or not t.is_cuda or INTERPRET:
        return False
    return _device_supports(t.device.index if t.device.index is not None else torch.cuda.current_device())


def pdl_args(t: torch.Tensor, enabled: bool = True) -> dict[str, bool]:
    """Launch keywords for a kernel taking a ``PDL`` constexpr: ``kernel[grid](..., **pdl_args(x, pdl))``.
    The ``launch_pdl`` option is passed only when on, so a Triton that predates it never sees it."""
    if pdl_on(t, enabled):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """First statement of every kernel: wait for the previous kernel in the stream (a no-op without PDL), then
    let the next one be scheduled so its launch overlaps this kernel's work."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
