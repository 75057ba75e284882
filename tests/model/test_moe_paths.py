"""The MoE experts paths that run without Triton agree: ``moe_grouped`` (the CPU and training path,
kernels/moe_grouped.py) against ``moe_reference`` (kernels/reference.py), including expert parallelism, and the
whole model's logits through each backend of ``KernelConfig``.

With expert parallelism each rank holds experts [expert_start, +E_local) and the ranks' outputs sum to the
single-rank result. (The Triton paths are held to the reference in tests/kernels.)
"""

from __future__ import annotations

import pytest
import torch

from mixtral.kernels.config import KernelConfig
from mixtral.kernels.moe_grouped import moe_grouped
from mixtral.kernels.reference import moe_reference, route_topk
from mixtral.model.mixtral import Transformer, init_random_weights
from mixtral.model.presets import preset

PATHS = {"reference": moe_reference, "grouped": moe_grouped}


def _problem(n: int, e: int, d: int, f: int, k: int, seed: int, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(dtype)  # [N, D]
    w13 = (torch.randn(e, 2 * f, d, generator=g) * 0.2).to(dtype)  # [E, 2F, D]
    w2 = (torch.randn(e, d, f, generator=g) * 0.2).to(dtype)  # [E, D, F]
    weights, ids = route_topk(torch.randn(n, e, generator=g), k)  # [N, k] fp32, [N, k]
    return x, w13, w2, weights, ids


@pytest.mark.parametrize(("n", "e", "d", "f", "k"), [(1, 8, 16, 24, 2), (37, 8, 32, 48, 2), (50, 6, 24, 36, 3)])
def test_paths_agree(n: int, e: int, d: int, f: int, k: int) -> None:
    x, w13, w2, weights, ids = _problem(n, e, d, f, k, seed=n)
    want = moe_reference(x, w13, w2, weights, ids, 0)  # [N, D]
    assert want.abs().max() > 0.1
    torch.testing.assert_close(moe_grouped(x, w13, w2, weights, ids, 0), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("ranks", [2, 4])
def test_expert_parallel_shards_sum_to_full(path: str, ranks: int) -> None:
    x, w13, w2, weights, ids = _problem(41, 8, 16, 20, 2, seed=ranks)
    full = moe_reference(x, w13, w2, weights, ids, 0)
    e_local = 8 // ranks
    parts = [
        PATHS[path](x, w13[r * e_local:(r + 1) * e_local], w2[r * e_local:(r + 1) * e_local], weights, ids,
                    r * e_local)
        for r in range(ranks)
    ]
    # Each rank contributes something (all experts are used by 41 tokens) and nothing it does not own.
    assert all(p.abs().max() > 0 for p in parts)
    torch.testing.assert_close(sum(parts), full, rtol=1e-5, atol=1e-5)


def test_paths_agree_in_bf16() -> None:
    x, w13, w2, weights, ids = _problem(33, 8, 32, 48, 2, seed=5, dtype=torch.bfloat16)
    want = moe_reference(x, w13, w2, weights, ids, 0).float()
    got = moe_grouped(x, w13, w2, weights, ids, 0).float()
    assert ((got - want).abs().mean() / want.abs().mean()).item() < 0.01


def test_grouped_backpropagates_like_the_reference() -> None:
    """Training takes the grouped path (autograd): its gradients are the reference's."""
    grads = {}
    for name, fn in PATHS.items():
        x, w13, w2, weights, ids = _problem(19, 8, 16, 24, 2, seed=9)
        leaves = [t.requires_grad_() for t in (x, w13, w2)]
        fn(x, w13, w2, weights, ids, 0).square().sum().backward()
        grads[name] = [t.grad for t in leaves]
    for got, want in zip(grads["grouped"], grads["reference"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_whole_model_logits_equal_across_backends() -> None:
    """On a CPU ``auto`` runs the grouped experts and the PyTorch small ops, ``reference`` the reference
    everywhere: the same logits."""
    model = Transformer(preset("tiny-odd")).eval()
    init_random_weights(model, seed=1, std=0.1)
    ids = torch.randint(0, model.args.vocab_size, (2, 13), generator=torch.Generator().manual_seed(2))
    outs = {}
    with torch.no_grad():
        for backend in ("auto", "reference"):
            model.set_kernel_config(KernelConfig(backend=backend))
            outs[backend] = model(ids)  # [B, T, V]
    assert outs["auto"].abs().max() > 0.1
    torch.testing.assert_close(outs["auto"], outs["reference"], rtol=1e-5, atol=1e-5)
