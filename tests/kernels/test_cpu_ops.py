"""The fast CPU forms of the small ops (kernels/cpu_ops.py) against kernels/reference.py: batched decode attention
(GQA folded into the query axis, K/V gathered through block tables, sliding window), the K/V store, RoPE; and the
dispatch sending each case to the right one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mixtral.kernels import cpu_ops, reference
from mixtral.kernels.config import KernelConfig
from mixtral.kernels.dispatch import Kernels
from mixtral.model.layers import rope_cos_sin

BLOCK = 4


def _paged(lens: list[int], n_heads: int, n_kv: int, hd: int, dtype: torch.dtype, seed: int):
    """Caches holding each sequence's tokens in shuffled blocks; one new query per sequence (its last token).
    Table entries past a sequence's blocks are junk (stale ids, some out of range) that must not be read."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // BLOCK) for n in lens]
    num_blocks = sum(need) + 3
    k_cache = torch.randn(num_blocks, BLOCK, n_kv, hd, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, BLOCK, n_kv, hd, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    width = max(need) + 2
    tables = torch.randint(-5, num_blocks + 5, (len(lens), width), generator=g, dtype=torch.int32)
    for i, n in enumerate(need):
        tables[i, :n] = torch.tensor([perm.pop() for _ in range(n)], dtype=torch.int32)
    q = torch.randn(len(lens), n_heads, hd, generator=g).to(dtype)
    ctx = torch.tensor(lens, dtype=torch.int32)
    qsl = torch.arange(len(lens) + 1, dtype=torch.int32)
    return q, k_cache, v_cache, tables, ctx, qsl


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize(("heads", "kv"), [(6, 2), (4, 4), (8, 1)])
def test_decode_attention_is_the_reference(dtype: torch.dtype, window: int | None, heads: int, kv: int) -> None:
    lens = [1, 7, 13, 4, 9]
    q, kc, vc, tables, ctx, qsl = _paged(lens, heads, kv, 16, dtype, seed=heads + kv)
    safe = tables.clamp(0, kc.shape[0] - 1)  # the reference reads only each sequence's own entries
    want = reference.paged_attention_reference(q, kc, vc, safe, ctx, qsl, window)
    got = cpu_ops.paged_decode_attention(q, kc, vc, tables, ctx, max(lens) + 2, window)  # a loose bound is fine
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert got.shape == q.shape and got.dtype == dtype


def test_decode_attention_reads_only_each_sequence_own_blocks() -> None:
    """Changing any cache block a sequence does not own leaves its output unchanged."""
    q, kc, vc, tables, ctx, _ = _paged([5, 9], 4, 2, 8, torch.float32, seed=3)
    before = cpu_ops.paged_decode_attention(q, kc, vc, tables, ctx, 9)
    own = {int(b) for i, n in enumerate([2, 3]) for b in tables[i, :n]}
    for b in set(range(kc.shape[0])) - own:
        kc[b] = 1e4
        vc[b] = -1e4
    torch.testing.assert_close(cpu_ops.paged_decode_attention(q, kc, vc, tables, ctx, 9), before, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_is_the_reference(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(6, 2, 8, generator=g).to(dtype), torch.randn(6, 2, 8, generator=g).to(dtype)
    for slots in ([3, 17, 0, 22, 9, 5], [3, -1, 0, 22, -1, 5]):  # the second takes the -1-skipping path
        caches = [torch.zeros(6, BLOCK, 2, 8, dtype=dtype) for _ in range(4)]
        mapping = torch.tensor(slots)
        reference.write_kv_reference(k, v, caches[0], caches[1], mapping)
        cpu_ops.write_kv(k, v, caches[2], caches[3], mapping)
        assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
        assert caches[2].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_is_bitwise_the_reference(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(5, (6 + 2 * 2) * 32, generator=g).to(dtype)
    q, k, _ = qkv.split([6 * 32, 2 * 32, 2 * 32], dim=-1)  # strided views, as the model passes them
    q, k = q.view(5, 6, 32), k.view(5, 2, 32)
    cos, sin = rope_cos_sin(torch.tensor([0, 3, 17, 400, 2047]), 32, 1e6, dtype)
    want = reference.rope_qk_reference(q, k, cos, sin)
    got = cpu_ops.rope_qk(q, k, cos, sin)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_dispatch_takes_the_fast_forms_only_where_they_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    """``auto`` on CPU: batched decode attention for one token per sequence, the reference loop for a step with a
    prompt chunk in it; ``reference`` never takes the fast forms."""
    calls: list[str] = []
    fast = cpu_ops.paged_decode_attention
    monkeypatch.setattr(cpu_ops, "paged_decode_attention", lambda *a: calls.append("fast") or fast(*a))
    q, kc, vc, tables, ctx, qsl = _paged([3, 6], 4, 2, 8, torch.float32, seed=4)
    tables = tables.clamp(0, kc.shape[0] - 1)
    auto, ref = Kernels(KernelConfig()), Kernels(KernelConfig(backend="reference"))
    want = reference.paged_attention_reference(q, kc, vc, tables, ctx, qsl)
    got = auto.paged_attention(q, kc, vc, tables, ctx, qsl, max_query_len=1, max_context_len=6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert calls == ["fast"]
    ref.paged_attention(q, kc, vc, tables, ctx, qsl, max_query_len=1, max_context_len=6)
    # Sequence 1 brings 3 new tokens: not a decode step.
    q3 = torch.randn(4, 4, 8)
    qsl3 = torch.tensor([0, 1, 4], dtype=torch.int32)
    want = reference.paged_attention_reference(q3, kc, vc, tables, ctx, qsl3)
    got = auto.paged_attention(q3, kc, vc, tables, ctx, qsl3, max_query_len=3, max_context_len=6)
    assert torch.equal(got, want) and calls == ["fast"]


@pytest.mark.parametrize("m", [1, 3, 16, 70])
def test_packed_bf16_linear_is_bitwise_f_linear(m: int) -> None:
    g = torch.Generator().manual_seed(m)
    w = torch.nn.Parameter((torch.randn(96, 64, generator=g) * 0.1).bfloat16(), requires_grad=False)
    x = torch.randn(m, 64, generator=g).bfloat16()
    packed = cpu_ops.PackedWeights()
    assert cpu_ops.packable(x, w)
    assert torch.equal(packed.linear(x, w), torch.nn.functional.linear(x, w))
    assert torch.equal(packed.linear(x[None], w), torch.nn.functional.linear(x[None], w))  # [B, M, K]


def test_packed_weights_follow_their_weight() -> None:
    """An in-place change of the weight is seen (repacked); a freed weight's entry goes; a deep copy (and a pickle)
    of the holder carries no packed tensor (they have no storage); what is not a bf16 Parameter at inference is not
    packed: a LoRA-adapted weight is a new tensor each call, autograd needs F.linear."""
    import copy
    import pickle

    w = torch.nn.Parameter(torch.randn(32, 16).bfloat16(), requires_grad=False)
    x = torch.randn(2, 16).bfloat16()
    packed = cpu_ops.PackedWeights()
    first = packed.linear(x, w)
    with torch.no_grad():
        w.mul_(2)
    assert torch.equal(packed.linear(x, w), torch.nn.functional.linear(x, w))
    assert not torch.equal(packed.linear(x, w), first)
    w.data = torch.randn(32, 16).bfloat16()  # what module.to() does: same Parameter, new data, same version
    assert torch.equal(packed.linear(x, w), torch.nn.functional.linear(x, w))
    assert len(copy.deepcopy(packed)._memo) == 0 and len(pickle.loads(pickle.dumps(packed))._memo) == 0
    del w
    packed.linear(x, torch.nn.Parameter(torch.randn(32, 16).bfloat16(), requires_grad=False))
    assert len(packed._memo) == 1
    trainable = torch.nn.Parameter(torch.randn(32, 16).bfloat16())
    assert not cpu_ops.packable(x, trainable)  # grad enabled and the weight wants it
    with torch.no_grad():
        assert cpu_ops.packable(x, trainable)
    assert not cpu_ops.packable(x, trainable.detach() + 0)  # a computed weight (LoRA): not a Parameter
    assert not cpu_ops.packable(x.float(), trainable.float())


def test_model_logits_and_deepcopy_with_packed_weights() -> None:
    """A bf16 model on CPU gives the same logits through the prepacked projections and lm_head as with the
    reference backend, and can still be deep-copied after they were packed."""
    import copy

    from mixtral.model.mixtral import Transformer, init_random_weights
    from mixtral.model.presets import preset

    model = Transformer(preset("tiny")).eval()
    init_random_weights(model, seed=2, std=0.1)
    model = model.bfloat16()
    ids = torch.tensor([[1, 5, 99, 1000, 7]])
    with torch.inference_mode():
        fast = model(ids)
        assert len(model.kernels._packed._memo) == 2 * 2 + 1  # wqkv and wo of 2 layers, the lm_head
        twin = copy.deepcopy(model)
        model.set_kernel_config(KernelConfig(backend="reference"))
        assert torch.equal(fast, model(ids)) and torch.equal(twin(ids), fast)


@pytest.mark.native_cpu
def test_expert_linear_takes_the_gemv_where_it_wins_and_f_linear_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16, M = 1 or a small weight: the native GEMV (same result as F.linear up to fp32 sum order); larger
    batches of a large weight, fp32, autograd: F.linear itself."""
    calls: list[tuple[int, ...]] = []
    real = cpu_ops.bf16_gemv
    monkeypatch.setattr(cpu_ops, "bf16_gemv", lambda x, w: calls.append(tuple(x.shape)) or real(x, w))
    g = torch.Generator().manual_seed(0)
    small, large = torch.randn(64, 96, generator=g).bfloat16(), torch.randn(2048, 640, generator=g).bfloat16()
    for x, w, native in ((torch.randn(1, 640, generator=g).bfloat16(), large, True),
                         (torch.randn(2, 640, generator=g).bfloat16(), large, False),
                         (torch.randn(8, 96, generator=g).bfloat16(), small, True),
                         (torch.randn(9, 96, generator=g).bfloat16(), small, False),
                         (torch.randn(1, 96, generator=g), small.float(), False)):
        calls.clear()
        got = cpu_ops.expert_linear(x, w)
        assert bool(calls) == native, (tuple(x.shape), tuple(w.shape))
        torch.testing.assert_close(got.float(), F.linear(x, w).float(), rtol=2 ** -7, atol=1e-2)
    calls.clear()
    x = torch.randn(1, 96, generator=g).bfloat16().requires_grad_()
    cpu_ops.expert_linear(x, small).sum().backward()  # autograd: F.linear, so the gradient exists
    assert not calls and x.grad is not None
