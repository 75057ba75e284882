"""The W4A16 / W8A16 Triton kernels (int_linear, int_fused_moe) held to the reference (dequantize, then the
PyTorch matmul / MoE) under the Triton interpreter, on tiny shapes, for every canonical format the loaders
produce: int4/int8, symmetric / zero points / float offsets, groups of 16..128 and per channel, act-order.

fp32 activations: the kernels multiply in IEEE fp32, so the result equals the reference up to summation order.
fp16: both round the dequantized weight once to fp16 and accumulate in fp32. (The interpreter's bf16 tl.dot
is broken: bf16 runs in tests/gpu/test_int_kernels.py.)
"""

from __future__ import annotations

import pytest
import torch

from mixtral.kernels.reference import route_topk
from mixtral.kernels.triton.int_linear import int_linear
from mixtral.kernels.triton.int_moe import IntMoEConfig, int_fused_moe
from mixtral.kernels.triton.moe_configs import GemmConfig
from mixtral.quant.int_layout import IntFormat, pack_int4, quantize_rtn
from mixtral.quant.int_method import reference_linear, reference_moe

FORMATS = {
    "int4-g128-sym": IntFormat(4, 128, torch.float16, "none"),
    "int4-g32-zero": IntFormat(4, 32, torch.float16, "int"),
    "int4-q4k": IntFormat(4, 32, torch.float32, "float"),
    "int8-channel": IntFormat(8, 0, torch.float16, "none"),
    "int8-q6k": IntFormat(8, 16, torch.float32, "none"),
    "int8-g64-zero": IntFormat(8, 64, torch.bfloat16, "int"),
}


def _weight(fmt: IntFormat, shape: tuple[int, ...], seed: int, act_order: bool = False) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if fmt.zero == "float":  # GGUF K-quant style: codes with float scales and offsets
        *lead, n, k = shape
        codes = torch.randint(0, 16 if fmt.bits == 4 else 32, shape, generator=gen)
        t = {"qweight": pack_int4(codes) if fmt.bits == 4 else codes.to(torch.int8),
             "scales": (torch.rand(*lead, n, k // fmt.group_size, generator=gen) * 0.02).to(fmt.scale_dtype),
             "offsets": (-torch.rand(*lead, n, k // fmt.group_size, generator=gen) * 0.1).to(fmt.scale_dtype)}
    else:
        t = quantize_rtn(torch.randn(shape, generator=gen) * 0.1, fmt)
    if act_order:
        *lead, _, k = shape
        count = lead[0] if lead else 1
        perms = torch.stack([torch.randperm(k, generator=gen) for _ in range(count)])  # one per expert
        t["perm"] = perms.reshape(*lead, k).to(torch.int32)
    return t


def _close(got: torch.Tensor, x: torch.Tensor, ref: torch.Tensor, truth: torch.Tensor) -> None:
    assert got.dtype == x.dtype and got.shape == ref.shape
    if x.dtype == torch.float32:
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    else:  # as close to the fp32 truth as the fp16 reference, give or take one rounding of the output
        ref_err = (ref.float() - truth).abs().max().item()
        assert (got.float() - truth).abs().max().item() <= 2 * ref_err + 1e-3 * truth.abs().max().item()


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_int_linear_matches_reference(name: str, dtype: torch.dtype) -> None:
    fmt = FORMATS[name]
    t = _weight(fmt, (48, 256), seed=1)
    for m in (1, 37):
        x = torch.randn(m, 256, dtype=dtype)
        truth = reference_linear(x.float(), t)
        _close(int_linear(x, t), x, reference_linear(x, t), truth)


def test_int_linear_act_order_perm() -> None:
    t = _weight(FORMATS["int4-g32-zero"], (48, 128), seed=2, act_order=True)
    x = torch.randn(3, 128)
    _close(int_linear(x, t), x, reference_linear(x, t), reference_linear(x, t))


def test_int_linear_rejects_a_bad_shape() -> None:
    t = _weight(FORMATS["int8-channel"], (16, 64), seed=3)
    with pytest.raises(ValueError, match="x has 32 columns, the weight 64"):
        int_linear(torch.randn(2, 32), t)


SPLIT_K = IntMoEConfig(16, GemmConfig(32, 64), GemmConfig(32, 64, split_k=2))


@pytest.mark.parametrize(("w13_name", "w2_name", "n", "expert_start", "config"), [
    ("int4-g128-sym", "int4-g128-sym", 1, 0, None),  # decode, direct layout, split-K w2
    ("int4-g32-zero", "int4-g32-zero", 40, 0, None),  # moe_align blocks
    ("int4-q4k", "int8-q6k", 3, 0, SPLIT_K),  # a GGUF Q4_K_M layer: Q4_K gate/up, Q6_K down
    ("int8-channel", "int8-g64-zero", 5, 2, None),  # expert parallel: experts 2..5 here
])
def test_int_fused_moe_matches_reference(w13_name: str, w2_name: str, n: int, expert_start: int,
                                         config: IntMoEConfig | None) -> None:
    e, d, f = 4, 128, 256
    w13 = _weight(FORMATS[w13_name], (e, 2 * f, d), seed=4)
    w2 = _weight(FORMATS[w2_name], (e, d, f), seed=5)
    x = torch.randn(n, d)
    weights, ids = route_topk(torch.randn(n, 8), 2)
    got = int_fused_moe(x, w13, w2, weights, ids, expert_start, config=config)
    ref = reference_moe(x, w13, w2, weights, ids, expert_start)
    _close(got, x, ref, ref)


def test_int_fused_moe_act_order_fp16() -> None:
    e, d, f = 3, 64, 128
    w13 = _weight(FORMATS["int4-g32-zero"], (e, 2 * f, d), seed=6, act_order=True)
    w2 = _weight(FORMATS["int4-g32-zero"], (e, d, f), seed=7, act_order=True)
    x = torch.randn(4, d, dtype=torch.float16)
    weights, ids = route_topk(torch.randn(4, e), 2)
    ref = reference_moe(x, w13, w2, weights, ids)
    _close(int_fused_moe(x, w13, w2, weights, ids), x, ref, reference_moe(x.float(), w13, w2, weights, ids))
