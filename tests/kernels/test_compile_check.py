"""Every Triton kernel the engine launches compiles for Hopper (sm90, down to ptxas) with PDL on, and for the
A100 (sm80) without it, on this CPU.

The other kernel tests run through the interpreter, which executes a kernel's Python and accepts code the
compiler rejects; two such bugs (a loop-carried tensor changing dtype, branches returning different int
widths) reached the GPU before this test existed. It runs ``python -m mixtral.kernels.triton.compile_check``
in a subprocess, because this test process imported the kernels in interpreter mode (conftest).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from compile_testing import compile_cases


def _compile(arch: int, out: Path) -> dict[str, dict[str, object]]:
    return compile_cases("compile_check", arch, out, timeout=600)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, object]]:
    return _compile(90, tmp_path_factory.mktemp("sm90") / "compile.json")


def test_every_kernel_compiles_for_sm90(compiled: dict[str, dict[str, object]]) -> None:
    failed = {name: c["error"] for name, c in compiled.items() if "error" in c}
    assert not failed, failed
    assert len(compiled) >= 20


def test_every_kernel_waits_for_its_predecessor(compiled: dict[str, dict[str, object]]) -> None:
    """PDL's rule (kernels/triton/pdl.py): each kernel launched with it runs ``griddepcontrol.wait``."""
    kernels = [k for c in compiled.values() for k in c["kernels"]]  # type: ignore[attr-defined]
    assert kernels
    assert all(k["pdl_wait"] for k in kernels), [k["name"] for k in kernels if not k["pdl_wait"]]


def test_decode_moe_skips_the_align_launch(compiled: dict[str, dict[str, object]]) -> None:
    def names(case: str) -> list[str]:
        return [k["name"] for k in compiled[case]["kernels"]]  # type: ignore[attr-defined]

    assert names("fused_moe batch 1 (direct)") == ["_w13_silu_kernel", "_w2_weighted_kernel", "_moe_sum_kernel"]
    assert names("fused_moe batch 8 (aligned)")[0] == "_moe_align_kernel"


def _moe_kernels(case: dict[str, object]) -> list[str]:
    return [k["name"] for k in case["kernels"]]  # type: ignore[attr-defined, index]


@pytest.mark.parametrize(("gpu", "name"), [("H100", "NVIDIA H100 80GB HBM3"), ("H200", "NVIDIA H200")])
def test_hopper_prefill_tiles_build_the_kernels_their_configs_name(compiled: dict[str, dict[str, object]], gpu: str,
                                                                  name: str) -> None:
    """Each entry of the H100 and H200 prefill tables is built, and a GEMM whose tiles say ``persistent`` runs
    the persistent kernel (one program per SM) on sm90."""
    from mixtral.kernels.triton import moe_configs

    table = moe_configs.load_configs(moe_configs.config_path(8, 14336, 4096, name, "sorted_"))
    assert table and any(c.w13.persistent or c.w2.persistent for c in table.values())
    for m, cfg in table.items():
        want = ["_persistent_kernel" if g.persistent else "_sorted_kernel" for g in (cfg.w13, cfg.w2)]
        assert _moe_kernels(compiled[f"sorted_moe {m} ({gpu} tiles)"]) == want, m


def test_every_kernel_compiles_for_sm80_without_pdl(tmp_path: Path) -> None:
    """An A100 gets no griddepcontrol (it has none) and the sorted prefill MoE with pointer loads, also where
    a borrowed Hopper table asks for persistent (TMA) tiles."""
    cases = _compile(80, tmp_path / "compile.json")
    assert not {name: c["error"] for name, c in cases.items() if "error" in c}
    kernels = [k for c in cases.values() for k in c["kernels"]]  # type: ignore[attr-defined]
    assert kernels and not any(k["pdl_wait"] for k in kernels)
    assert "_persistent_kernel" not in {k["name"] for k in kernels}  # type: ignore[index]
