"""The glue around the prefill MoE's GEMMs (kernels/triton/moe_glue.py): the pair sort's layout, the Triton
weighted top-k sum against its PyTorch form (rows of other expert-parallel ranks never read), and the sorted
GEMMs composed with the Triton glue, on CPU through the interpreter (conftest.py sets TRITON_INTERPRET=1)."""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest
import torch

from mixtral.kernels.reference import moe_reference, route_topk
from mixtral.kernels.triton import moe_configs as mc


def _problem(n: int, e: int, d: int, f: int, k: int, seed: int, num_global: int | None = None):
    """x [N, D], w13 [E, 2F, D], w2 [E, D, F] scaled to unit-ish outputs; routing over num_global experts."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w13 = torch.randn(e, 2 * f, d, generator=g) / d**0.5
    w2 = torch.randn(e, d, f, generator=g) / f**0.5
    weights, ids = route_topk(torch.randn(n, num_global or e, generator=g), k)  # [N, k] fp32, [N, k]
    return x, w13, w2, weights, ids


@pytest.fixture
def glue() -> ModuleType:
    """The Triton glue module imported while TRITON_INTERPRET=1 (set by conftest's autouse fixture)."""
    import mixtral.kernels.triton.moe_glue as moe_glue

    return importlib.reload(moe_glue)


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
    want = glue.combine(y, row_of_pair, weights, num_local)  # CPU tensor: the PyTorch path
    got = glue.weighted_topk_sum(y, row_of_pair, weights, num_local, block=block)
    assert torch.isfinite(got).all() and torch.isfinite(want).all()
    torch.testing.assert_close(got, want, rtol=1e-5 if dtype == torch.float32 else 1e-3, atol=1e-5)


def test_sort_pairs_docstring_example(glue: ModuleType) -> None:
    order, row_of_pair, offs = glue.sort_pairs(torch.tensor([[2, 0], [3, 2]]), e_local=2, expert_start=2)
    assert order.tolist() == [0, 3, 2, 1] and row_of_pair.tolist() == [0, 3, 2, 1]
    assert offs.tolist() == [2, 3] and offs.dtype == torch.int32


def test_sort_pairs_matches_a_stable_sort(glue: ModuleType) -> None:
    """The pair sort equals torch's stable sort of the keys, with other ranks' pairs last."""
    ids = torch.randint(0, 8, (300, 2), generator=torch.Generator().manual_seed(16))
    order, row_of_pair, offs = glue.sort_pairs(ids, e_local=3, expert_start=2)
    flat = ids.reshape(-1) - 2
    key = torch.where((flat >= 0) & (flat < 3), flat, 3)
    assert torch.equal(order, torch.sort(key, stable=True).indices)
    assert torch.equal(row_of_pair[order], torch.arange(600))
    assert offs.tolist() == torch.cumsum(torch.bincount(key, minlength=4), 0)[:3].tolist()
    empty = glue.sort_pairs(torch.zeros(0, 2, dtype=torch.long), e_local=3)
    assert empty[0].numel() == 0 and empty[2].tolist() == [0, 0, 0]


def test_check_contract_names_the_bad_shape(glue: ModuleType) -> None:
    x, w13, w2, weights, ids = _problem(4, 4, 16, 16, 2, seed=1)
    with pytest.raises(ValueError, match="x \\[N, D\\]"):
        glue.check_contract(x[None], w13, w2, weights, ids)
    with pytest.raises(ValueError, match="do not fit"):
        glue.check_contract(x, w13, w2.transpose(1, 2)[:, :, :8], weights, ids)
    with pytest.raises(ValueError, match="topk_ids"):
        glue.check_contract(x, w13, w2, weights, ids[:3])


@pytest.mark.parametrize(("expert_start", "e_local"), [(0, 8), (4, 4)])
def test_sorted_gemms_with_triton_glue(glue: ModuleType, monkeypatch: pytest.MonkeyPatch, expert_start: int,
                                       e_local: int) -> None:
    """The GPU path's composition on CPU: the sorted GEMMs with both glue steps through the interpreted Triton
    kernels (the counting sort and the weighted sum), against the reference; a rank without all the experts
    leaves other ranks' rows unread."""
    import mixtral.kernels.triton.sorted_moe as sm

    monkeypatch.setattr(glue, "_triton_glue", lambda t: True)
    x, w13, w2, weights, ids = _problem(21, e_local, 32, 64, 2, seed=15, num_global=8)
    cfg = mc.MoEConfig(16, mc.GemmConfig(32, 32, 4, 2), mc.GemmConfig(32, 32, 4, 2))
    got = sm.sorted_moe(x, w13, w2, weights, ids, expert_start, config=cfg)
    torch.testing.assert_close(got, moe_reference(x, w13, w2, weights, ids, expert_start), rtol=1e-4, atol=1e-5)
