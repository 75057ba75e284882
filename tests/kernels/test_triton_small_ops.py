"""The small fused Triton kernels (RMSNorm, residual add + RMSNorm, RoPE on q and k, top-k routing) against
kernels/reference.py, on CPU through the interpreter (fp32 and fp16: the interpreter's bf16 is unreliable),
plus the dispatch (kernels/dispatch.py): Triton at inference, the reference under autograd, the model's logits
unchanged."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch

from mixtral.kernels.config import KernelConfig
from mixtral.kernels.dispatch import Kernels
from mixtral.kernels.reference import (
    add_rms_norm_reference,
    rms_norm_reference,
    rope_qk_reference,
    route_topk,
    write_kv_reference,
)
from mixtral.kernels.triton import gate_router, rmsnorm, rope, router
from mixtral.model.layers import rope_cos_sin
from mixtral.model.mixtral import Transformer, init_random_weights
from mixtral.model.presets import preset

DTYPES = [torch.float32, torch.float16]
# Normalised values differ from the reference by the fp32 sum-of-squares order only: at most one rounding
# step of the output dtype.
NORM_TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-6}, torch.float16: {"rtol": 1e-3, "atol": 1e-3}}


def _randn(gen: torch.Generator, *shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


# ---------------------------------------------------------------- RMSNorm
@pytest.mark.parametrize(("n", "dim"), [(1, 48), (5, 100), (37, 384), (3, 4096)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_reference(n: int, dim: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(n * dim)
    x = _randn(gen, n, dim, dtype=dtype, scale=3.0)  # [N, D]
    weight = (torch.rand(dim, generator=gen) + 0.5).to(dtype)  # [D]
    out = rmsnorm.rms_norm(x, weight, 1e-5)
    ref = rms_norm_reference(x, weight, 1e-5)
    assert out.dtype == ref.dtype == dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, **NORM_TOL[dtype])


def test_rms_norm_strided_3d_and_mixed_weight_dtype() -> None:
    """[B, T, D] input that is a column slice of a wider tensor; an fp32 weight on fp16 x gives fp32 (promotion),
    with the normalised x rounded to fp16 before the product, as the reference does."""
    gen = torch.Generator().manual_seed(3)
    wide = _randn(gen, 2, 7, 80, dtype=torch.float16)
    x = wide[..., 10:58]  # [2, 7, 48], row stride 80
    weight = torch.rand(48, generator=gen) + 0.5  # fp32
    out = rmsnorm.rms_norm(x, weight, 1e-6)
    ref = rms_norm_reference(x, weight, 1e-6)
    assert out.dtype == torch.float32 and out.shape == (2, 7, 48)
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(("n", "dim"), [(1, 48), (13, 200), (37, 4096)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_matches_reference(n: int, dim: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(n + dim)
    x = _randn(gen, n, dim, dtype=dtype)
    residual = _randn(gen, n, dim, dtype=dtype, scale=0.3)
    weight = (torch.rand(dim, generator=gen) + 0.5).to(dtype)
    out, summed = rmsnorm.add_rms_norm(x, residual, weight, 1e-5)
    ref, ref_sum = add_rms_norm_reference(x, residual, weight, 1e-5)
    assert torch.equal(summed, ref_sum), "the residual sum must be rounded exactly like x + residual"
    torch.testing.assert_close(out, ref, **NORM_TOL[dtype])


def test_rms_norm_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="weight shape"):
        rmsnorm.rms_norm(torch.randn(2, 8), torch.ones(9), 1e-5)
    with pytest.raises(ValueError, match="residual"):
        rmsnorm.add_rms_norm(torch.randn(2, 8), torch.randn(2, 8).half(), torch.ones(8), 1e-5)


# ---------------------------------------------------------------- RoPE
@pytest.mark.parametrize(("n", "n_heads", "n_kv", "head_dim"), [
    (1, 4, 4, 16),  # no GQA
    (7, 6, 2, 16),  # QG 3 (heads not a power of two)
    (37, 32, 8, 128),  # Mixtral's heads
    (5, 3, 1, 12),  # half = 6: not a power of two
])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_qk_matches_reference_exactly(n: int, n_heads: int, n_kv: int, head_dim: int,
                                           dtype: torch.dtype) -> None:
    """q and k are strided views of a fused qkv row, as in Attention.forward; the result is bit-identical."""
    gen = torch.Generator().manual_seed(n * head_dim + n_heads)
    qkv = _randn(gen, n, (n_heads + 2 * n_kv) * head_dim, dtype=dtype)  # [N, (H + 2KV) * hd]
    q, k, _ = qkv.split([n_heads * head_dim, n_kv * head_dim, n_kv * head_dim], dim=-1)
    q, k = q.view(n, n_heads, head_dim), k.view(n, n_kv, head_dim)  # [N, H, hd], [N, KV, hd]
    positions = torch.randint(0, 5000, (n,), generator=gen)
    cos, sin = rope_cos_sin(positions, head_dim, 1e6, dtype)  # [N, hd]
    q_out, k_out = rope.rope_qk(q, k, cos, sin)
    q_ref, k_ref = rope_qk_reference(q, k, cos, sin)
    assert q_out.dtype == dtype and q_out.shape == (n, n_heads, head_dim) and k_out.shape == (n, n_kv, head_dim)
    assert torch.equal(q_out, q_ref) and torch.equal(k_out, k_ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_qk_with_cache_store_equals_rope_then_write_kv(dtype: torch.dtype) -> None:
    """The fused decode-step variant: same q/k as ``rope_qk``, and the caches hold exactly what the reference
    rope + ``write_kv`` store, padding slots (-1) left alone, other slots untouched."""
    gen = torch.Generator().manual_seed(5)
    n, heads, kv, hd, blocks, page = 6, 8, 2, 16, 5, 4
    qkv = _randn(gen, n, (heads + 2 * kv) * hd, dtype=dtype)
    q, k, v = qkv.split([heads * hd, kv * hd, kv * hd], dim=-1)
    q, k, v = q.view(n, heads, hd), k.view(n, kv, hd), v.view(n, kv, hd)  # strided views, as in the model
    cos, sin = rope_cos_sin(torch.randint(0, 3000, (n,), generator=gen), hd, 1e6, dtype)
    slots = torch.tensor([17, 3, -1, 8, 19, 0])
    k_cache, v_cache = _randn(gen, blocks, page, kv, hd, dtype=dtype), _randn(gen, blocks, page, kv, hd, dtype=dtype)
    k_want, v_want = k_cache.clone(), v_cache.clone()
    q_ref, k_ref = rope_qk_reference(q, k, cos, sin)
    write_kv_reference(k_ref, v, k_want, v_want, slots)
    q_out, k_out = rope.rope_qk(q, k, cos, sin, cache=(v, k_cache, v_cache, slots))
    assert torch.equal(q_out, q_ref) and torch.equal(k_out, k_ref)
    assert torch.equal(k_cache, k_want) and torch.equal(v_cache, v_want)
    with pytest.raises(ValueError, match="slot_mapping"):
        rope.rope_qk(q, k, cos, sin, cache=(v, k_cache, v_cache, slots[:3]))


def test_rope_qk_uses_both_halves_of_cos_sin() -> None:
    """cos/sin whose two halves differ (the model's are equal) still match: no half is assumed to repeat."""
    gen = torch.Generator().manual_seed(11)
    q, k = _randn(gen, 6, 4, 16, dtype=torch.float32), _randn(gen, 6, 2, 16, dtype=torch.float32)
    cos, sin = _randn(gen, 6, 16, dtype=torch.float32), _randn(gen, 6, 16, dtype=torch.float32)
    q_out, k_out = rope.rope_qk(q, k, cos, sin)
    q_ref, k_ref = rope_qk_reference(q, k, cos, sin)
    assert torch.equal(q_out, q_ref) and torch.equal(k_out, k_ref)


def test_rope_qk_rejects_mixed_dtypes() -> None:
    q, k, cs = torch.randn(2, 4, 8), torch.randn(2, 2, 8), torch.randn(2, 8)
    with pytest.raises(ValueError, match="one dtype"):
        rope.rope_qk(q, k, cs.half(), cs.half())


# ---------------------------------------------------------------- routing
@pytest.mark.parametrize(("n", "num_experts", "top_k"), [(1, 8, 2), (37, 8, 2), (20, 6, 3), (16, 8, 1), (5, 5, 5)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_route_topk_matches_reference(n: int, num_experts: int, top_k: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(n * num_experts + top_k)
    logits = _randn(gen, n, num_experts, dtype=dtype, scale=2.0)  # [N, E]
    weights, ids = router.route_topk_fused(logits, top_k)
    ref_w, ref_ids = route_topk(logits, top_k)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64 and ids.shape == (n, top_k)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_w, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(weights.sum(-1), torch.ones(n), rtol=1e-6, atol=1e-6)


def test_route_topk_ties_take_lowest_index_first() -> None:
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0], [3.0, 3.0, 3.0, 3.0], [1.0, 0.0, 5.0, 5.0]])  # [3, E=4]
    weights, ids = router.route_topk_fused(logits, 2)
    assert ids.tolist() == [[1, 2], [0, 1], [2, 3]]
    torch.testing.assert_close(weights, torch.full((3, 2), 0.5))


def test_route_topk_rejects_bad_k() -> None:
    with pytest.raises(ValueError, match="top_k 9"):
        router.route_topk_fused(torch.randn(3, 8), 9)


@pytest.mark.parametrize(("n", "num_experts", "top_k", "dim", "dtype"), [
    (1, 8, 2, 64, torch.float32), (19, 8, 2, 300, torch.float32), (40, 6, 2, 48, torch.float16),
    (5, 16, 4, 256, torch.float32),
])
def test_gate_route_matches_linear_then_route(n: int, num_experts: int, top_k: int, dim: int,
                                              dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(n + dim)
    x = _randn(gen, n, dim, dtype=dtype)  # [N, D]
    w = _randn(gen, num_experts, dim, dtype=dtype, scale=dim**-0.5 * 2)  # [E, D]
    mask = (torch.arange(n) % 3 != 2).long()  # [N] every third row is padding
    counts = torch.zeros(num_experts, dtype=torch.int64)
    logits, weights, ids = gate_router.gate_route_fused(x, w, top_k, counts, mask)
    ref_logits = torch.nn.functional.linear(x.float(), w.float()).to(dtype)  # [N, E]
    torch.testing.assert_close(logits, ref_logits, **NORM_TOL[dtype])
    ref_w, ref_ids = route_topk(logits, top_k)  # routing of the kernel's own logits: exact ids
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_w, rtol=1e-6, atol=1e-6)
    want = torch.zeros(num_experts, dtype=torch.int64).index_add_(0, ids[mask.bool()].reshape(-1),
                                                                 torch.ones(int(mask.sum()) * top_k, dtype=torch.int64))
    assert torch.equal(counts, want) and counts.sum() == mask.sum() * top_k
    # Without counts or mask: the same routing, nothing counted anywhere.
    _, weights2, ids2 = gate_router.gate_route_fused(x, w, top_k)
    assert torch.equal(ids2, ids) and torch.equal(weights2, weights)


def test_gate_route_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        gate_router.gate_route_fused(torch.randn(2, 8), torch.randn(4, 9), 2)
    with pytest.raises(ValueError, match="counts must be"):
        gate_router.gate_route_fused(torch.randn(2, 8), torch.randn(4, 8), 2, torch.zeros(4, dtype=torch.int32))


# ---------------------------------------------------------------- dispatch and the model
@pytest.fixture
def triton_on_cpu(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count the calls of the small Triton kernels (the triton backend runs them on CPU tensors, interpreted)."""
    calls = {"rms_norm": 0, "add_rms_norm": 0, "rope_qk": 0, "route_topk_fused": 0, "gate_route_fused": 0}

    def counting(fn: Callable[..., object], name: str) -> Callable[..., object]:
        def counted(*args: object, **kwargs: object) -> object:
            calls[name] += 1
            return fn(*args, **kwargs)
        return counted

    for module, name in ((rmsnorm, "rms_norm"), (rmsnorm, "add_rms_norm"), (rope, "rope_qk"),
                         (router, "route_topk_fused"), (gate_router, "gate_route_fused")):
        monkeypatch.setattr(module, name, counting(getattr(module, name), name))
    return calls


def _tiny_model() -> Transformer:
    args = dataclasses.replace(preset("tiny-odd"), vocab_size=96)  # D 48, 6 heads / 2 KV of 8, 6 experts, top-2
    model = Transformer(args)
    init_random_weights(model, seed=7, std=0.2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)  # not all ones: the weight product must be exercised
    return model


def test_model_logits_with_fused_ops_match_reference(triton_on_cpu: dict[str, int]) -> None:
    model = _tiny_model()
    model.set_kernel_config(KernelConfig(backend="triton"))
    input_ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        fused = model(input_ids)  # [2, 9, V] through the Triton kernels
    # 3 layers: only the first attention norm is a plain rms_norm; every other norm (the ffn norms, the next
    # layers' attention norms, the final norm) takes the previous residual add with it.
    assert triton_on_cpu == {"rms_norm": 1, "add_rms_norm": 6, "rope_qk": 3, "route_topk_fused": 0,
                             "gate_route_fused": 3}  # the router: gate GEMM + routing in one kernel
    model.set_kernel_config(KernelConfig(backend="reference"))
    with torch.inference_mode():
        ref = model(input_ids)
    assert sum(triton_on_cpu.values()) == 13  # no kernel call more
    assert fused.abs().max() > 0.1
    torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-5)


def test_training_takes_the_reference_and_backpropagates(triton_on_cpu: dict[str, int]) -> None:
    """With autograd recording, dispatch uses the PyTorch ops (the kernels have no backward)."""
    model = _tiny_model()
    model.set_kernel_config(KernelConfig(backend="triton"))
    input_ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(1))
    model(input_ids).float().logsumexp(-1).mean().backward()
    assert all(v == 0 for v in triton_on_cpu.values()), triton_on_cpu
    grads = [model.layers[0].ffn_norm.weight.grad, model.layers[0].feed_forward.gate.weight.grad,
             model.layers[0].attention.wqkv.weight.grad]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_dispatch_falls_back_for_mixed_dtypes(triton_on_cpu: dict[str, int]) -> None:
    kernels = Kernels(KernelConfig(backend="triton"))
    q, k, cs = torch.randn(2, 4, 8), torch.randn(2, 2, 8), torch.randn(2, 8)
    out_q, _ = kernels.rope_qk(q, k, cs.half(), cs.half())  # promotes to fp32 like the reference
    assert triton_on_cpu["rope_qk"] == 0 and out_q.dtype == torch.float32
    x = torch.randn(3, 8)
    kernels.add_rms_norm(x, x.half(), torch.ones(8), 1e-5)
    assert triton_on_cpu["add_rms_norm"] == 0
