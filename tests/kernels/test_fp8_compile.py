"""The FP8 kernels compile for Hopper (sm90, down to ptxas, PDL on) on this CPU, and into the instructions
they exist for: FP8 ``wgmma`` with TMA loads in the prefill GEMMs. Run in a subprocess
(``python -m mixtral.kernels.triton.fp8_compile_check``) because this test process imported the kernels in
interpreter mode (conftest)."""

from __future__ import annotations

import pytest
from compile_testing import compile_cases


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, object]]:
    return compile_cases("fp8_compile_check", 90, tmp_path_factory.mktemp("fp8_sm90") / "compile.json")


def _kernels(case: dict[str, object]) -> list[dict[str, object]]:
    return case["kernels"]  # type: ignore[return-value]


def test_every_fp8_kernel_compiles_for_sm90_and_waits_for_its_predecessor(compiled) -> None:
    assert not {name: c["error"] for name, c in compiled.items() if "error" in c}
    assert len(compiled) >= 13
    kernels = [k for c in compiled.values() for k in _kernels(c)]
    assert kernels and all(k["pdl_wait"] for k in kernels), [k["name"] for k in kernels if not k["pdl_wait"]]


def test_prefill_gemms_use_fp8_wgmma_and_tma(compiled) -> None:
    for case in ("fp8 sorted_moe 2048", "fp8 gemm wo, 2048 rows"):
        gemms = [k for k in _kernels(compiled[case]) if k["name"] in ("_fp8_sorted_kernel", "_fp8_gemm_kernel")]
        assert gemms, case
        for k in gemms:
            assert k["mma"] and all("wgmma" in m and "e4m3.e4m3" in m for m in k["mma"]), (case, k["mma"])
    assert all(k["tma"] for k in _kernels(compiled["fp8 sorted_moe 2048"]) if k["name"] == "_fp8_sorted_kernel")


def test_decode_moe_skips_the_align_launch_and_quantizes_twice(compiled) -> None:
    names = [k["name"] for k in _kernels(compiled["fp8 fused_moe batch 1 (direct)"])]
    assert names == ["_quant_rows_kernel", "_fp8_w13_kernel", "_quant_rows_kernel", "_fp8_w2_kernel",
                     "_moe_sum_kernel"]
    assert "_moe_align_kernel" in [k["name"] for k in _kernels(compiled["fp8 fused_moe batch 64 (aligned)"])]


def test_fp8_kv_cache_kernels_build(compiled) -> None:
    names = {k["name"] for case in ("fp8 KV write_kv", "fp8 KV rope_qk + cache store", "fp8 KV decode attention",
                                    "fp8 KV prefill attention") for k in _kernels(compiled[case])}
    assert {"_write_kv_kernel", "_rope_qk_kernel", "_decode_kernel", "_prefill_kernel"} <= names


def test_nothing_to_build_below_sm89() -> None:
    from mixtral.kernels.triton.fp8_compile_check import fp8_cases

    assert fp8_cases(80) == {} and fp8_cases(90)
