"""The grouped-GEMM MoE path (kernels/grouped_mm_moe.py) against ``moe_reference``, and ``ops.fused_moe``'s
choice between it and the Triton kernel.

``torch._grouped_mm`` runs on CPU (a per-expert loop inside PyTorch), so the whole path — pair sort, group
offsets, both grouped GEMMs, the SiLU·mul, the weighted top-k sum — is checked here in fp32 (to 1e-5) and
bf16 (relative error within twice the reference's own bf16 error). The Triton SiLU·mul kernel runs through
the interpreter (conftest.py sets TRITON_INTERPRET=1). The CUTLASS fast path itself is timed and checked on
the GPU by scripts/gpu_moe_prefill.py.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest
import torch

from mixtral.kernels import grouped_mm_moe as gm
from mixtral.kernels import ops
from mixtral.kernels.reference import moe_reference, route_topk
from mixtral.model.args import preset
from mixtral.model.mixtral import Transformer, init_random_weights
from mixtral.model.moe import EXPERT_PATHS


def _problem(n: int, e: int, d: int, f: int, k: int, seed: int, dtype: torch.dtype = torch.float32,
             num_global: int | None = None):
    """x [N, D], w13 [E, 2F, D], w2 [E, D, F] scaled to unit-ish outputs; routing over num_global experts."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(dtype)
    w13 = (torch.randn(e, 2 * f, d, generator=g) / d**0.5).to(dtype)
    w2 = (torch.randn(e, d, f, generator=g) / f**0.5).to(dtype)
    weights, ids = route_topk(torch.randn(n, num_global or e, generator=g), k)  # [N, k] fp32, [N, k]
    return x, w13, w2, weights, ids


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize(("n", "e", "d", "f", "k", "seed"), [
    (37, 8, 32, 64, 2, 0),  # top-2 of 8, ragged groups
    (1, 8, 16, 24, 2, 1),  # one token: six empty groups between and around two of one row
    (64, 6, 48, 72, 2, 2),  # tiny-odd's shapes: 6 experts, D 48, F 72
    (20, 4, 16, 32, 3, 3),  # top-3
])
def test_matches_reference_fp32(n: int, e: int, d: int, f: int, k: int, seed: int) -> None:
    x, w13, w2, weights, ids = _problem(n, e, d, f, k, seed)
    want = moe_reference(x, w13, w2, weights, ids)
    got = gm.grouped_mm_moe(x, w13, w2, weights, ids)
    assert got.shape == (n, d) and got.dtype == x.dtype
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_experts_without_tokens() -> None:
    """Experts 0, 3 and 7 get no pair: empty first, middle and last groups (offs repeats a value)."""
    x, w13, w2, weights, _ = _problem(30, 8, 32, 40, 2, seed=4)
    g = torch.Generator().manual_seed(5)
    used = torch.tensor([1, 2, 4, 5, 6])
    ids = used[torch.stack([torch.randperm(5, generator=g)[:2] for _ in range(30)])]  # [30, 2] distinct per row
    got = gm.grouped_mm_moe(x, w13, w2, weights, ids)
    torch.testing.assert_close(got, moe_reference(x, w13, w2, weights, ids), rtol=1e-5, atol=1e-5)
    # The empty experts' weights are never read: poisoning them changes nothing.
    w13[[0, 3, 7]] = float("nan")
    w2[[0, 3, 7]] = float("nan")
    torch.testing.assert_close(gm.grouped_mm_moe(x, w13, w2, weights, ids), got, rtol=0, atol=0)


def test_no_tokens() -> None:
    x, w13, w2, weights, ids = _problem(0, 8, 16, 24, 2, seed=6)
    out = gm.grouped_mm_moe(x, w13, w2, weights, ids)
    assert out.shape == (0, 16) and out.dtype == x.dtype


def test_bf16_within_reference_error() -> None:
    """bf16 against an fp64 reference: no worse than twice the bf16 reference's own error (and under 1%)."""
    x, w13, w2, weights, ids = _problem(96, 8, 64, 128, 2, seed=7, dtype=torch.bfloat16)
    exact = moe_reference(x.double(), w13.double(), w2.double(), weights.double(), ids)
    ref_err = _rel_err(moe_reference(x, w13, w2, weights, ids), exact)
    got = gm.grouped_mm_moe(x, w13, w2, weights, ids)
    assert got.dtype == torch.bfloat16
    assert _rel_err(got, exact) < max(2 * ref_err, 1e-3) and _rel_err(got, exact) < 0.01


@pytest.mark.parametrize("ranks", [2, 4])
def test_expert_parallel_slices_sum_to_full(ranks: int) -> None:
    """Rank r owns experts [r*E/R, (r+1)*E/R): its pairs of other ranks add nothing, the ranks sum to the whole."""
    x, w13, w2, weights, ids = _problem(45, 8, 32, 48, 2, seed=8 + ranks)
    full = moe_reference(x, w13, w2, weights, ids)
    e_local = 8 // ranks
    parts = []
    for r in range(ranks):
        sl = slice(r * e_local, (r + 1) * e_local)
        part = gm.grouped_mm_moe(x, w13[sl], w2[sl], weights, ids, r * e_local)
        assert torch.isfinite(part).all()  # the never-multiplied trailing rows must not leak NaN/garbage
        torch.testing.assert_close(part, moe_reference(x, w13[sl], w2[sl], weights, ids, r * e_local),
                                   rtol=1e-5, atol=1e-5)
        parts.append(part)
    torch.testing.assert_close(sum(parts), full, rtol=1e-5, atol=1e-5)


def test_rank_without_local_pairs() -> None:
    """Every pair routed to the other rank: offs are all zero, the output is exactly zero."""
    x, w13, w2, weights, _ = _problem(5, 4, 16, 16, 2, seed=9)
    ids = torch.tensor([[0, 1], [2, 3], [1, 3], [0, 2], [3, 1]])
    out = gm.grouped_mm_moe(x, w13, w2, weights, ids, expert_start=4)
    assert torch.equal(out, torch.zeros_like(x))


def test_misaligned_shapes_refused_with_reason() -> None:
    """bf16 needs D and F multiples of 8 (16-byte strides): F = 36 is refused, naming the sizes."""
    x, w13, w2, weights, ids = _problem(4, 4, 32, 36, 2, seed=10, dtype=torch.bfloat16)
    assert "F=36" in (gm.layout_problem(x, w13, w2) or "")
    with pytest.raises(ValueError, match="F=36"):
        gm.grouped_mm_moe(x, w13, w2, weights, ids)
    x32, w13_32, w2_32, *_ = _problem(4, 4, 32, 36, 2, seed=10)  # fp32 needs multiples of 4 only
    assert gm.layout_problem(x32, w13_32, w2_32) is None
    assert "dtype" in (gm.layout_problem(x, w13.float(), w2) or "")
    with pytest.raises(ValueError, match="w2"):
        gm.grouped_mm_moe(x32, w13_32, w2_32.transpose(1, 2), weights, ids)


def test_device_problem_names_the_reason() -> None:
    x = torch.zeros(2, 8, dtype=torch.bfloat16)
    assert "cpu" in (gm.device_problem(x) or "")


class _Recorder:
    """Stands in for the Triton fused_moe: records that the dispatch chose it, returns the reference."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                 topk_ids: torch.Tensor, expert_start: int = 0) -> torch.Tensor:
        self.calls += 1
        return moe_reference(x, w13, w2, topk_weights, topk_ids, expert_start)


@pytest.fixture
def cuda_like_dispatch(monkeypatch: pytest.MonkeyPatch) -> _Recorder:
    """ops.fused_moe as on an sm90 GPU with CPU tensors and the grouped GEMMs chosen for prefill
    (MIXTRAL_MOE_PREFILL=grouped_mm): Triton 'available', the CUTLASS path 'fast', the Triton kernel replaced
    by a recorder, and a threshold of 16 tokens so the shapes stay tiny."""
    from mixtral.kernels.triton import fused_moe as fm

    recorder = _Recorder()
    monkeypatch.setattr(ops, "use_triton", lambda t: True)
    monkeypatch.setattr(gm, "device_problem", lambda x: None)
    monkeypatch.setattr(fm, "fused_moe", recorder)
    monkeypatch.setattr(ops, "GROUPED_MM_MIN_TOKENS", 16)
    monkeypatch.setenv("MIXTRAL_MOE_PREFILL", "grouped_mm")
    return recorder


def test_dispatch_by_token_count(cuda_like_dispatch: _Recorder) -> None:
    x, w13, w2, weights, ids = _problem(16, 8, 32, 48, 2, seed=11)
    out = ops.fused_moe(x, w13, w2, weights, ids)  # at the threshold: grouped GEMMs
    assert cuda_like_dispatch.calls == 0
    torch.testing.assert_close(out, moe_reference(x, w13, w2, weights, ids), rtol=1e-5, atol=1e-5)
    ops.fused_moe(x[:15], w13, w2, weights[:15], ids[:15])  # below it: Triton
    assert cuda_like_dispatch.calls == 1


def test_dispatch_env_override(cuda_like_dispatch: _Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    x, w13, w2, weights, ids = _problem(20, 8, 32, 48, 2, seed=12)
    monkeypatch.setenv("MIXTRAL_MOE_PREFILL", "triton")  # the decode kernel at every size
    ops.fused_moe(x, w13, w2, weights, ids)
    assert cuda_like_dispatch.calls == 1
    monkeypatch.setenv("MIXTRAL_MOE_PREFILL", "yes")
    with pytest.raises(ValueError, match="MIXTRAL_MOE_PREFILL='yes'"):
        ops.fused_moe(x, w13, w2, weights, ids)


def test_dispatch_falls_back_for_misaligned_shapes(cuda_like_dispatch: _Recorder) -> None:
    """F = 36 in bf16 is refused by _grouped_mm's alignment: the Triton kernel runs."""
    x, w13, w2, weights, ids = _problem(40, 8, 32, 36, 2, seed=13, dtype=torch.bfloat16)
    ops.fused_moe(x, w13, w2, weights, ids)
    assert cuda_like_dispatch.calls == 1


def test_dispatch_never_on_cpu() -> None:
    """Without the patches (real device check): a CPU bf16 tensor never takes the grouped path."""
    x, w13, w2, *_ = _problem(4, 8, 32, 48, 2, seed=14, dtype=torch.bfloat16)
    assert not ops.use_grouped_mm(x, w13, w2)


@pytest.fixture
def glue() -> ModuleType:
    """The Triton glue module imported while TRITON_INTERPRET=1 (set by conftest's autouse fixture)."""
    import mixtral.kernels.triton.moe_glue as moe_glue

    return importlib.reload(moe_glue)


@pytest.mark.parametrize(("dtype", "rows", "f", "block"), [
    (torch.float32, 7, 40, 16),  # F not a multiple of the block: masked tail
    (torch.float16, 5, 64, 1024),  # block clipped to F
])
def test_triton_silu_mul(glue: ModuleType, dtype: torch.dtype, rows: int, f: int, block: int) -> None:
    g = torch.Generator().manual_seed(rows)
    h = (torch.randn(rows, 2 * f, generator=g) * 3).to(dtype)  # [R, 2F]
    want = (torch.nn.functional.silu(h[:, :f].double()) * h[:, f:].double()).to(dtype)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-3, "atol": 1e-3}
    torch.testing.assert_close(glue.silu_mul(h, block=block), want, **tol)
    # Rows from num_rows on are skipped: the result's first rows are computed, the rest left alone.
    limited = glue.silu_mul(h, torch.tensor([rows - 2], dtype=torch.int32), block=block)
    torch.testing.assert_close(limited[:rows - 2], want[:rows - 2], **tol)
    with pytest.raises(ValueError, match="even"):
        glue.silu_mul(h[:, 1:])


@pytest.mark.parametrize(("dtype", "n", "k", "d", "block"), [
    (torch.float32, 9, 2, 40, 16),  # D not a multiple of the block
    (torch.float16, 6, 3, 64, 1024),
])
def test_triton_weighted_topk_sum(glue: ModuleType, dtype: torch.dtype, n: int, k: int, d: int, block: int) -> None:
    """Against combine's PyTorch path; rows past num_local hold NaN and must not reach the output."""
    g = torch.Generator().manual_seed(n)
    y = torch.randn(n * k, d, generator=g).to(dtype)  # [P, D]
    row_of_pair = torch.randperm(n * k, generator=g)  # [P]
    weights = torch.rand(n, k, generator=g)  # [N, k] fp32
    num_local = torch.tensor([n * k - 3], dtype=torch.int32)
    y[n * k - 3:] = float("nan")
    want = gm.combine(y, row_of_pair, weights, num_local)  # CPU tensor: the PyTorch path
    got = glue.weighted_topk_sum(y, row_of_pair, weights, num_local, block=block)
    assert torch.isfinite(got).all() and torch.isfinite(want).all()
    torch.testing.assert_close(got, want, rtol=1e-5 if dtype == torch.float32 else 1e-3, atol=1e-5)


def test_sort_pairs_docstring_example() -> None:
    order, row_of_pair, offs = gm.sort_pairs(torch.tensor([[2, 0], [3, 2]]), e_local=2, expert_start=2)
    assert order.tolist() == [0, 3, 2, 1] and row_of_pair.tolist() == [0, 3, 2, 1]
    assert offs.tolist() == [2, 3] and offs.dtype == torch.int32


def test_sort_pairs_matches_a_stable_sort() -> None:
    """The counting sort equals torch's stable sort of the keys, with other ranks' pairs last."""
    ids = torch.randint(0, 8, (300, 2), generator=torch.Generator().manual_seed(16))
    order, row_of_pair, offs = gm.sort_pairs(ids, e_local=3, expert_start=2)
    flat = ids.reshape(-1) - 2
    key = torch.where((flat >= 0) & (flat < 3), flat, 3)
    assert torch.equal(order, torch.sort(key, stable=True).indices)
    assert torch.equal(row_of_pair[order], torch.arange(600))
    assert offs.tolist() == torch.cumsum(torch.bincount(key, minlength=4), 0)[:3].tolist()
    empty = gm.sort_pairs(torch.zeros(0, 2, dtype=torch.long), e_local=3)
    assert empty[0].numel() == 0 and empty[2].tolist() == [0, 0, 0]


@pytest.mark.parametrize(("expert_start", "e_local"), [(0, 8), (4, 4)])
def test_with_triton_glue(glue: ModuleType, monkeypatch: pytest.MonkeyPatch, expert_start: int,
                          e_local: int) -> None:
    """The GPU path's composition on CPU: both glue steps through the interpreted Triton kernels."""
    monkeypatch.setattr(gm, "_triton_glue", lambda t: True)
    x, w13, w2, weights, ids = _problem(21, e_local, 32, 48, 2, seed=15, num_global=8)
    got = gm.grouped_mm_moe(x, w13, w2, weights, ids, expert_start)
    torch.testing.assert_close(got, moe_reference(x, w13, w2, weights, ids, expert_start), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny", "tiny-odd"])
def test_model_logits_equal_reference_path(name: str) -> None:
    """The whole model with EXPERT_PATHS['grouped_mm'] gives the reference path's logits."""
    assert EXPERT_PATHS["grouped_mm"] is gm.grouped_mm_moe
    model = Transformer(preset(name)).eval()
    init_random_weights(model, seed=3, std=0.1)
    ids = torch.randint(0, model.args.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        model.set_moe_path("reference")
        want = model(ids)  # [B, T, V]
        model.set_moe_path("grouped_mm")
        got = model(ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
