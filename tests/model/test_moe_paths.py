"""The three MoE expert paths (model/moe.py EXPERT_PATHS) agree with each other, including expert parallelism.

``reference`` loops over experts (kernels/reference.py), ``grouped`` sorts token/expert pairs, ``gather``
indexes each pair's weights. With expert parallelism each rank holds experts [expert_start, +E_local) and
the ranks' outputs sum to the single-rank result.
"""

from __future__ import annotations

import pytest
import torch

from mixtral.kernels.reference import route_topk
from mixtral.model.args import preset
from mixtral.model.mixtral import Transformer, init_random_weights
from mixtral.model.moe import EXPERT_PATHS


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
    want = EXPERT_PATHS["reference"](x, w13, w2, weights, ids, 0)  # [N, D]
    assert want.abs().max() > 0.1
    for name in ("grouped", "gather"):
        torch.testing.assert_close(EXPERT_PATHS[name](x, w13, w2, weights, ids, 0), want, rtol=1e-5, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("path", sorted(EXPERT_PATHS))
@pytest.mark.parametrize("ranks", [2, 4])
def test_expert_parallel_shards_sum_to_full(path: str, ranks: int) -> None:
    x, w13, w2, weights, ids = _problem(41, 8, 16, 20, 2, seed=ranks)
    full = EXPERT_PATHS["reference"](x, w13, w2, weights, ids, 0)
    e_local = 8 // ranks
    parts = [
        EXPERT_PATHS[path](x, w13[r * e_local:(r + 1) * e_local], w2[r * e_local:(r + 1) * e_local], weights, ids,
                           r * e_local)
        for r in range(ranks)
    ]
    # Each rank contributes something (all experts are used by 41 tokens) and nothing it does not own.
    assert all(p.abs().max() > 0 for p in parts)
    torch.testing.assert_close(sum(parts), full, rtol=1e-5, atol=1e-5)


def test_paths_agree_in_bf16() -> None:
    x, w13, w2, weights, ids = _problem(33, 8, 32, 48, 2, seed=5, dtype=torch.bfloat16)
    want = EXPERT_PATHS["reference"](x, w13, w2, weights, ids, 0).float()
    for name in ("grouped", "gather"):
        got = EXPERT_PATHS[name](x, w13, w2, weights, ids, 0).float()
        assert ((got - want).abs().mean() / want.abs().mean()).item() < 0.01, name


def test_whole_model_logits_equal_across_paths() -> None:
    model = Transformer(preset("tiny-odd")).eval()
    init_random_weights(model, seed=1, std=0.1)
    ids = torch.randint(0, model.args.vocab_size, (2, 13), generator=torch.Generator().manual_seed(2))
    outs = {}
    with torch.no_grad():
        for path in sorted(EXPERT_PATHS):
            model.set_moe_path(path)
            outs[path] = model(ids)  # [B, T, V]
    for path, logits in outs.items():
        torch.testing.assert_close(logits, outs["reference"], rtol=1e-5, atol=1e-5, msg=lambda m, p=path: f"{p}: {m}")
