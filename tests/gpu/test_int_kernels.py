"""W4A16 / W8A16 Triton kernels on the GPU at Mixtral's real shapes (8x7B: D 4096, F 14336; 8x22B: D 6144,
F 16384; 8 experts, top-2), in bf16, held to the reference: the canonical weights dequantized to bf16, then
PyTorch's matmul / MoE (quant/int_method.py). Random codes and scales (no quantization run): every format the
loaders produce, decode (direct and aligned layouts, split-K) and prefill sizes.

Tolerance: both sides round each dequantized weight once to bf16 and accumulate in fp32; they differ in
summation order and in the reference's bf16 roundings between its ops, so outputs are compared relative to
the output's scale (bf16 has 8 mantissa bits).
"""

from __future__ import annotations

import pytest
import torch

from mixtral.kernels.reference import route_topk
from mixtral.quant.int_layout import IntFormat, dequantize, pack_int4
from mixtral.quant.int_method import reference_linear, reference_moe

pytestmark = pytest.mark.gpu

SHAPES = {"8x7B": (4096, 14336), "8x22B": (6144, 16384)}
FORMATS = {
    "int4-g128": IntFormat(4, 128, torch.float16, "none"),
    "awq-g128": IntFormat(4, 128, torch.float16, "int"),
    "int8-channel": IntFormat(8, 0, torch.float16, "none"),
    "gguf-q4k": IntFormat(4, 32, torch.float32, "float"),
    "gguf-q6k": IntFormat(8, 16, torch.float32, "none"),
}


def _weight(fmt: IntFormat, lead: tuple[int, ...], n: int, k: int, seed: int, act_order: bool = False) -> dict:
    """Random canonical tensors on the GPU with weights of a realistic size (|w| ~ 0.02)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    hi = 16 if fmt.bits == 4 else 256
    codes = torch.randint(0, hi, (*lead, n, k), generator=gen, device=dev, dtype=torch.int32)
    t = {"qweight": pack_int4(codes) if fmt.bits == 4 else (codes - 128).to(torch.int8)}
    groups = (k // fmt.group_size,) if fmt.group_size else ()
    step = 0.04 / (16 if fmt.bits == 4 else 256)
    t["scales"] = (torch.rand(*lead, n, *groups, generator=gen, device=dev) * step + step / 4).to(fmt.scale_dtype)
    if fmt.zero == "int":
        t["zeros"] = torch.randint(0, 16, (*lead, n, *groups), generator=gen, device=dev).to(fmt.zero_dtype)
    elif fmt.zero == "float":
        t["offsets"] = (-t["scales"].float() * 8).to(fmt.scale_dtype)
    if act_order:
        perms = [torch.randperm(k, generator=gen, device=dev) for _ in range(lead[0] if lead else 1)]
        t["perm"] = torch.stack(perms).reshape(*lead, k).to(torch.int32)
    return t


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.mark.parametrize("model", list(SHAPES))
@pytest.mark.parametrize("fmt_name", ["int4-g128", "awq-g128", "int8-channel", "gguf-q4k"])
@pytest.mark.parametrize("m", [1, 8, 512])
def test_int_linear_at_real_shapes(model: str, fmt_name: str, m: int) -> None:
    from mixtral.kernels.triton.int_linear import int_linear

    d, _ = SHAPES[model]
    t = _weight(FORMATS[fmt_name], (), d + 2048, d, seed=m)  # wqkv: q rows + k and v rows (8 KV heads of 128)
    x = torch.randn(m, d, device="cuda", dtype=torch.bfloat16)
    got = int_linear(x, t)
    assert got.dtype == torch.bfloat16
    assert _rel_err(got, reference_linear(x, t)) < 2e-2


def test_int_linear_act_order() -> None:
    from mixtral.kernels.triton.int_linear import int_linear

    t = _weight(IntFormat(4, 128, torch.float16, "int", True), (), 4096, 4096, seed=3, act_order=True)
    x = torch.randn(4, 4096, device="cuda", dtype=torch.bfloat16)
    assert _rel_err(int_linear(x, t), reference_linear(x, t)) < 2e-2


@pytest.mark.parametrize("model", list(SHAPES))
@pytest.mark.parametrize(("w13_name", "w2_name"), [("int4-g128", "int4-g128"), ("awq-g128", "awq-g128"),
                                                   ("int8-channel", "int8-channel"), ("gguf-q4k", "gguf-q6k")])
@pytest.mark.parametrize("n", [1, 4, 64, 1024])
def test_int_fused_moe_at_real_shapes(model: str, w13_name: str, w2_name: str, n: int) -> None:
    from mixtral.kernels.triton.int_moe import int_fused_moe

    d, f = SHAPES[model]
    w13 = _weight(FORMATS[w13_name], (8,), 2 * f, d, seed=1)
    w2 = _weight(FORMATS[w2_name], (8,), d, f, seed=2)
    x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    weights, ids = route_topk(torch.randn(n, 8, device="cuda"), 2)
    got = int_fused_moe(x, w13, w2, weights, ids)
    ref = reference_moe(x, w13, w2, weights, ids)
    assert got.dtype == torch.bfloat16 and got.shape == (n, d)
    assert _rel_err(got, ref) < 3e-2


def test_int_fused_moe_expert_parallel_and_act_order() -> None:
    from mixtral.kernels.triton.int_moe import int_fused_moe

    d, f = SHAPES["8x7B"]
    fmt = IntFormat(4, 128, torch.float16, "int", True)
    w13 = _weight(fmt, (4,), 2 * f, d, seed=5, act_order=True)  # experts 4..7 of 8 on this rank
    w2 = _weight(fmt, (4,), d, f, seed=6, act_order=True)
    x = torch.randn(16, d, device="cuda", dtype=torch.bfloat16)
    weights, ids = route_topk(torch.randn(16, 8, device="cuda"), 2)
    got = int_fused_moe(x, w13, w2, weights, ids, expert_start=4)
    assert _rel_err(got, reference_moe(x, w13, w2, weights, ids, 4)) < 3e-2


def test_canonical_dequantize_on_gpu_matches_cpu() -> None:
    """The reference itself: dequantizing on the GPU equals the CPU's, bit for bit (fp32 math, one rounding)."""
    t = _weight(FORMATS["gguf-q4k"], (2,), 256, 512, seed=9)
    cpu = {k: v.cpu() for k, v in t.items()}
    assert torch.equal(dequantize(t, torch.bfloat16).cpu(), dequantize(cpu, torch.bfloat16))
