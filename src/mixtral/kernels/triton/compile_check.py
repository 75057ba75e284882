"""Compile every Triton kernel for a GPU architecture on a machine without one, through the real host code.

The CPU interpreter that the tests use runs a kernel's Python, not its compiled form: it accepts code that the
compiler rejects (a loop-carried variable that changes dtype, an early return whose branches give different
types) and cannot run ``griddepcontrol`` at all. This module swaps in a stand-in driver that reports an
sm90 (or any) target, makes every kernel launch compile without running (Triton's warmup), turns PDL on, and
calls the host wrappers at Mixtral-8x7B shapes, so each kernel variant that the decode and prefill paths
launch goes through the whole compiler down to ptxas. Outputs are never computed, so nothing may read them;
tensors are left uninitialised (their pages are never touched).

    python -m mixtral.kernels.triton.compile_check --arch 90 [--json out.json]   # Hopper, PDL on
    python -m mixtral.kernels.triton.compile_check --arch 80                     # A100: no PDL, no TMA

Run it with ``TRITON_INTERPRET`` unset: an interpreted kernel is never compiled.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


class _StandInDriver:
    """What Triton's launch path asks of the active driver, for a GPU that is not there."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self) -> Any:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_device_interface(self) -> Any:
        return torch.cuda

    def map_python_to_cpp_type(self, ty: str) -> str:
        from triton.backends.nvidia.driver import ty_to_cpp

        return ty_to_cpp(ty)


@contextmanager
def compile_only(arch: int = 90) -> Iterator[list[tuple[str, Any]]]:
    """Inside: launches compile for ``arch`` and return without running, PDL on where the engine would turn it
    on (sm90+); yields the list of (kernel name, CompiledKernel) compiled so far."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset: interpreted kernels are never compiled")
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    import mixtral.kernels.triton.pdl as pdl

    compiled: list[tuple[str, Any]] = []
    original_run = JITFunction.run
    original_pdl = pdl.pdl_on

    def run(self: JITFunction, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
        kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.fn.__name__, kernel))
        return kernel

    previous = getattr(driver, "_active", None)  # None until first use (and no driver exists without a GPU)
    driver.set_active(_StandInDriver(arch))
    JITFunction.run = run  # type: ignore[method-assign]
    pdl.pdl_on = lambda t, enabled=True: enabled and arch >= 90  # type: ignore[assignment]
    try:
        yield compiled
    finally:
        JITFunction.run = original_run  # type: ignore[method-assign]
        pdl.pdl_on = original_pdl
        driver._active = previous


def empty(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """An uninitialised tensor (its pages are never touched: nothing runs)."""
    return torch.empty(*shape, dtype=dtype)


def routing(n: int, e: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """A valid top-2 routing of ``n`` tokens over ``e`` experts: weights [N, 2] fp32, ids [N, 2]."""
    ids = torch.stack([torch.arange(n) % e, (torch.arange(n) + 3) % e], dim=1)  # [N, 2] valid ids
    return torch.full((n, 2), 0.5), ids


def _cases(arch: int) -> dict[str, Callable[[], object]]:
    """One call per kernel variant the engine launches on ``arch``, at 8x7B shapes in bf16 (TMA loads only
    on sm90+, where ``kernels/dispatch.py`` sends prefill MoE to ``sorted_moe``)."""
    from mixtral.kernels.triton import (
        fused_moe,
        gate_router,
        moe_align,
        moe_configs,
        moe_glue,
        moe_sum,
        paged_attention,
        rmsnorm,
        rope,
        router,
        skinny_gemm,
        sorted_moe,
        write_kv,
    )

    bf16 = torch.bfloat16
    d, f, e, hd, heads, kv = 4096, 14336, 8, 128, 32, 8

    w13, w2 = empty(e, 2 * f, d), empty(e, d, f)
    blocks, page = 64, 16
    k_cache, v_cache = empty(blocks, page, kv, hd), empty(blocks, page, kv, hd)

    def attention(n_seqs: int, q_len: int) -> object:
        ctx = 300
        q = empty(n_seqs * q_len, heads, hd)
        tables = torch.arange(n_seqs * 20, dtype=torch.int32).reshape(n_seqs, 20) % blocks
        lens = torch.full((n_seqs,), ctx, dtype=torch.int32)
        qsl = torch.arange(n_seqs + 1, dtype=torch.int32) * q_len
        return paged_attention.paged_attention(q, k_cache, v_cache, tables, lens, qsl, max_query_len=q_len,
                                               max_context_len=ctx)

    def moe(n: int, direct: bool | None = None, config: moe_configs.MoEConfig | None = None) -> object:
        weights, ids = routing(n)
        return fused_moe.fused_moe(empty(n, d), w13, w2, weights, ids, config=config, direct=direct)

    # The Hopper tables' prefill entries (persistent GEMMs among them) by token count: CPU runs look up the
    # first table on disk, so they are named here to be built too.
    tables = {gpu: moe_configs.load_configs(moe_configs.config_path(e, f, d, name, "sorted_")) or {}
              for gpu, name in (("H100", "NVIDIA H100 80GB HBM3"), ("H200", "NVIDIA H200"))}
    split_k = moe_configs.MoEConfig(16, moe_configs.GemmConfig(32, 512), moe_configs.GemmConfig(64, 256, split_k=2))
    # w2's short tiles spanning two column tiles (sorted_moe._tile_of), at the 2048-token tiles.
    paired = moe_configs.MoEConfig(128, moe_configs.GemmConfig(128, 64, 8, 4, warp_specialize=True),
                                   moe_configs.GemmConfig(256, 64, 8, 4, pair_small=True), 64)
    # w13's w1 and w3 tiles in one MMA (a 3-D TMA box), in the sorted and the persistent kernel.
    joint = moe_configs.MoEConfig(128, moe_configs.GemmConfig(128, 64, 8, 3, warp_specialize=True, joint=True),
                                  moe_configs.GemmConfig(256, 64, 8, 4, pair_small=True), 64)
    joint_p = moe_configs.MoEConfig(128, moe_configs.GemmConfig(128, 64, 8, 4, persistent=True, joint=True),
                                    moe_configs.GemmConfig(256, 64, 8, 4), 0)
    return {
        "rms_norm": lambda: rmsnorm.rms_norm(empty(1, d), empty(d), 1e-5),
        "add_rms_norm": lambda: rmsnorm.add_rms_norm(empty(8, d), empty(8, d), empty(d), 1e-5),
        "rope_qk": lambda: rope.rope_qk(empty(4, heads, hd), empty(4, kv, hd), empty(4, hd), empty(4, hd)),
        "rope_qk + cache store": lambda: rope.rope_qk(empty(1, heads, hd), empty(1, kv, hd), empty(1, hd), empty(1, hd),
                                                      cache=(empty(1, kv, hd), k_cache, v_cache,
                                                             torch.zeros(1, dtype=torch.int64))),
        "write_kv": lambda: write_kv.write_kv(empty(4, kv, hd), empty(4, kv, hd), k_cache, v_cache,
                                              torch.arange(4, dtype=torch.int64)),
        "decode attention": lambda: attention(4, 1),
        "prefill attention": lambda: attention(2, 64),
        "gate_route": lambda: gate_router.gate_route_fused(empty(4, d), empty(e, d), 2,
                                                           torch.zeros(e, dtype=torch.int64),
                                                           torch.ones(4, dtype=torch.int32)),
        "route_topk": lambda: router.route_topk_fused(empty(300, e), 2),
        "skinny wqkv": lambda: skinny_gemm.skinny_gemm(empty(1, d), empty(6144, d)),
        "skinny wo, 4 rows": lambda: skinny_gemm.skinny_gemm(empty(4, d), empty(d, d)),
        "fused_moe batch 1 (direct)": lambda: moe(1),
        "fused_moe batch 8 (aligned)": lambda: moe(8),
        "fused_moe batch 2, split-K w2": lambda: moe(2, True, split_k),
        "fused_moe batch 256": lambda: moe(256),
        "moe_align": lambda: moe_align.moe_align(routing(64)[1], e, 16),
        "sort_pairs": lambda: moe_align.sort_pairs(routing(2048)[1], e),
        "sorted_moe 2048": lambda: sorted_moe.sorted_moe(empty(2048, d), w13, w2, *routing(2048),
                                                         use_tma=arch >= 90),
        "sorted_moe 2048 (w2 paired short tiles)": lambda: sorted_moe.sorted_moe(
            empty(2048, d), w13, w2, *routing(2048), config=paired, use_tma=arch >= 90),
        "sorted_moe 2048 (w13 joint)": lambda: sorted_moe.sorted_moe(
            empty(2048, d), w13, w2, *routing(2048), config=joint, use_tma=arch >= 90),
        "sorted_moe 4096 (persistent w13 joint)": lambda: sorted_moe.sorted_moe(
            empty(4096, d), w13, w2, *routing(4096), config=joint_p, use_tma=arch >= 90),
        **{f"sorted_moe {m} ({gpu} tiles)": functools.partial(
            lambda m, cfg: sorted_moe.sorted_moe(empty(m, d), w13, w2, *routing(m), config=cfg, use_tma=arch >= 90),
            m, cfg) for gpu, table in tables.items() for m, cfg in table.items()},
        "weighted_topk_sum": lambda: moe_glue.weighted_topk_sum(empty(128, d), torch.arange(128, dtype=torch.int32),
                                                                torch.full((64, 2), 0.5), torch.tensor([128])),
        "moe_sum": lambda: moe_sum.moe_sum(empty(2, 8, d, dtype=torch.float32), routing(4)[1], 0, e, bf16),
    }


def describe_kernel(name: str, ptx: str) -> dict[str, object]:
    """A compiled kernel's name and whether it waits on its predecessor (``griddepcontrol.wait``: sm90+ only)."""
    return {"name": name, "pdl_wait": "griddepcontrol.wait" in ptx}


def describe_mma(name: str, ptx: str) -> dict[str, object]:
    """``describe_kernel`` plus the kernel's matrix instructions (``wgmma`` / ``mma.sync`` with operand types)."""
    mma = sorted(set(re.findall(r"(wgmma\.mma_async[.\w]*|mma\.sync[.\w]*)", ptx)))
    return {**describe_kernel(name, ptx), "mma": mma}


def run_cases(arch: int, cases: dict[str, Callable[[], object]], only: list[str] | None = None,
              describe: Callable[[str, str], dict[str, object]] = describe_kernel) -> list[dict[str, object]]:
    """Compile every case (or those named in ``only``) for ``arch``: per case its kernels (``describe(name,
    ptx)`` of each, plus its ``shared`` memory in bytes), the seconds it took and the error, if one failed."""
    results: list[dict[str, object]] = []
    with compile_only(arch) as compiled:
        for name, call in cases.items():
            if only and name not in only:
                continue
            start, t0 = len(compiled), time.time()
            entry: dict[str, object] = {"case": name}
            try:
                call()
            except Exception as exc:  # reported per case: one broken kernel must not hide the others
                entry["error"] = f"{type(exc).__name__}: {str(exc)[:2000]}"
            # Shared memory is checked against the device's limit only when a launch loads the kernel, so a
            # compile-only check reads the figure here (bytes one block asks for).
            entry["kernels"] = [{**describe(n, k.asm["ptx"]), "shared": int(k.metadata.shared)}
                                for n, k in compiled[start:] if k is not None]
            entry["seconds"] = round(time.time() - t0, 2)
            results.append(entry)
    return results


def check(arch: int = 90, only: list[str] | None = None) -> list[dict[str, object]]:
    """Compile every case for ``arch``: per case its kernels, whether each waits on its predecessor
    (``griddepcontrol.wait`` in the PTX: expected on sm90+ only) and the error, if one failed."""
    return run_cases(arch, _cases(arch), only)


def _pdl_label(kernel: dict[str, object]) -> str:
    return f"{kernel['name']}{'' if kernel['pdl_wait'] else ' (no PDL wait)'}"


def cli(doc: str, check: Callable[[int, list[str] | None], list[dict[str, object]]],
        label: Callable[[dict[str, object]], str] = _pdl_label, width: int = 32, what: str = "cases") -> int:
    """The command line of a compile check: ``--arch``, ``--only``, ``--json``; a line per case (``label`` of
    each kernel), then the count compiled. Exit status 1 when a case failed."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability to build for, e.g. 90 (Hopper)")
    ap.add_argument("--only", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--json", default=None, help="write the per-case results here")
    args = ap.parse_args()
    results = check(args.arch, [c for c in args.only.split(",") if c] or None)
    failed = 0
    for r in results:
        kernels = ", ".join(label(k) for k in r["kernels"])  # type: ignore[attr-defined]
        status = "FAILED " + str(r["error"]) if "error" in r else "ok"
        failed += "error" in r
        print(f"{r['case']:{width}s} {r['seconds']:6.1f} s  {status}  [{kernels}]")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"arch": args.arch, "cases": results}, fh, indent=1)
    print(f"{len(results) - failed}/{len(results)} {what} compiled for sm{args.arch}")
    return 1 if failed else 0


def main() -> int:
    return cli(__doc__ or "", check)


if __name__ == "__main__":
    sys.exit(main())
