"""The W4A16 / W8A16 kernels compile for Hopper (sm90, down to ptxas, PDL on) on this CPU at 8x7B and 8x22B
shapes, into bf16 tensor-core instructions. Run in a subprocess (``python -m
mixtral.kernels.triton.int_compile_check``) because this test process imported the kernels in interpreter
mode (conftest)."""

from __future__ import annotations

import pytest
from compile_testing import compile_cases


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, object]]:
    return compile_cases("int_compile_check", 90, tmp_path_factory.mktemp("int_sm90") / "compile.json")


def _kernels(case: dict[str, object]) -> list[dict[str, object]]:
    return case["kernels"]  # type: ignore[return-value]


def test_every_int_kernel_compiles_for_sm90_and_waits_for_its_predecessor(compiled) -> None:
    assert not {name: c["error"] for name, c in compiled.items() if "error" in c}
    assert len(compiled) >= 9
    kernels = [k for c in compiled.values() for k in _kernels(c)]
    assert kernels and all(k["pdl_wait"] for k in kernels), [k["name"] for k in kernels if not k["pdl_wait"]]


def test_dequantized_tiles_reach_the_tensor_cores_as_bf16(compiled) -> None:
    gemms = [k for c in compiled.values() for k in _kernels(c) if k["name"].startswith("_int_")]
    assert len(gemms) == 3 + 2 * 7  # three dense cases, seven MoE cases of two GEMMs
    for k in gemms:
        assert k["mma"] and all("bf16.bf16" in m for m in k["mma"]), (k["name"], k["mma"])
    prefill = _kernels(compiled["int8 fused_moe 8x22B prefill 2048"])
    assert any("wgmma" in m for k in prefill for m in k["mma"])  # Hopper's async MMA at prefill tiles


def test_decode_moe_skips_the_align_launch(compiled) -> None:
    names = [k["name"] for k in _kernels(compiled["int4 fused_moe 8x7B batch 1 (direct)"])]
    assert names == ["_int_w13_silu_kernel", "_int_w2_weighted_kernel", "_moe_sum_kernel"]
    assert "_moe_align_kernel" in [k["name"] for k in _kernels(compiled["int4 zero-point fused_moe 8x7B batch 64 "
                                                                         "(aligned)"])]


SM90_MAX_SHARED = 232448  # bytes a block may ask for on Hopper (227 KB)


def test_every_int_kernel_fits_hoppers_shared_memory(compiled) -> None:
    """GGUF's small groups once pipelined a per-column copy of the scales and offsets: 430,080 bytes (Q4_K w13 at
    64 x 128 tiles, 4 stages), refused at launch on an H100. Per group they take a few KB."""
    sizes = {(name, k["name"]): k["shared"] for name, c in compiled.items() for k in _kernels(c)}
    assert sizes and all(isinstance(v, int) for v in sizes.values())
    assert not {key: v for key, v in sizes.items() if v > SM90_MAX_SHARED}
    gguf = [v for (name, kernel), v in sizes.items() if name.startswith("gguf") and kernel == "_int_w13_silu_kernel"]
    assert len(gguf) == 2 and max(gguf) < 100_000, gguf
