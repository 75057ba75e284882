"""The load-balancing loss equals transformers' load_balancing_loss_func; z-loss and expert load by definition."""

from __future__ import annotations

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from mixtral.train.losses import expert_load, load_balancing_loss, masked_lm_loss, router_z_loss


def _logits(layers: int, rows: int, experts: int, seed: int, scale: float = 2.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, experts, generator=g) * scale for _ in range(layers)]


@pytest.mark.parametrize(("layers", "batch", "seq", "experts", "top_k", "seed"),
                         [(4, 3, 7, 8, 2, 0), (2, 1, 33, 8, 2, 1), (3, 2, 5, 6, 2, 2), (1, 4, 9, 8, 1, 3)])
def test_aux_loss_equals_transformers_without_mask(layers: int, batch: int, seq: int, experts: int, top_k: int,
                                                   seed: int) -> None:
    logits = _logits(layers, batch * seq, experts, seed)
    ours = load_balancing_loss(logits, experts, top_k)
    theirs = load_balancing_loss_func(tuple(logits), experts, top_k)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aux_loss_equals_transformers_with_padding_mask(seed: int) -> None:
    layers, batch, seq, experts = 3, 4, 11, 8
    logits = _logits(layers, batch * seq, experts, seed)
    g = torch.Generator().manual_seed(100 + seed)
    lengths = torch.randint(1, seq + 1, (batch,), generator=g)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()  # [B, T], right padding
    ours = load_balancing_loss(logits, experts, 2, mask)
    theirs = load_balancing_loss_func(tuple(logits), experts, 2, mask)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    # The mask matters: padding rows change the unmasked value.
    assert not torch.allclose(ours, load_balancing_loss(logits, experts, 2))


def test_aux_loss_is_k_when_balanced_and_grows_when_collapsed() -> None:
    uniform = [torch.zeros(64, 8)]
    # All-equal logits: probabilities 1/E; top-k picks the same k experts, so f is skewed but p is flat -> k.
    assert float(load_balancing_loss(uniform, 8, 2)) == pytest.approx(2.0)
    collapsed = torch.full((64, 8), -10.0)
    collapsed[:, :2] = 10.0
    assert float(load_balancing_loss([collapsed], 8, 2)) > 7.9  # E * (1 * 0.5 + 1 * 0.5) = 8


def test_aux_loss_gradient_reaches_logits_and_rejects_bad_shapes() -> None:
    logits = [t.requires_grad_() for t in _logits(2, 10, 8, 5)]
    load_balancing_loss(logits, 8, 2).backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in logits)
    with pytest.raises(ValueError, match="num_experts=6"):
        load_balancing_loss(_logits(1, 4, 8, 0), 6, 2)
    with pytest.raises(ValueError, match="attention mask has 3 entries"):
        load_balancing_loss(_logits(1, 4, 8, 0), 8, 2, torch.ones(3))


def test_z_loss_and_expert_load_by_definition() -> None:
    logits = _logits(2, 6, 8, 7)
    mask = torch.tensor([1, 1, 0, 1, 0, 1])
    z = torch.stack([torch.logsumexp(t, -1).pow(2) for t in logits])  # [L, N]
    expected = (z * mask).sum() / (mask.sum() * 2)
    torch.testing.assert_close(router_z_loss(logits, mask), expected)
    load = expert_load(logits, 2, mask)  # [L, E]
    assert load.shape == (2, 8)
    assert load.sum(dim=1).tolist() == [8.0, 8.0]  # 4 real tokens x top-2 in each layer
    top = logits[0][0].topk(2).indices
    assert (load[0, top] >= 1).all()


def test_masked_lm_loss_handles_an_empty_selection() -> None:
    logits = torch.randn(0, 10, requires_grad=True)
    loss = masked_lm_loss(logits, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert float(loss.detach()) == 0.0
