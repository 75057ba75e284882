"""LoRA: the adapted forward equals the merged forward, adapters alone train, saved adapters merge at load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mixtral.model.mixtral import Transformer, init_random_weights
from mixtral.model.presets import preset
from mixtral.train.lora import LoRAConfig, add_lora, lora_state_dict, merge_lora, merge_lora_into, save_lora


def _model(seed: int = 0) -> Transformer:
    model = Transformer(preset("tiny-odd"))  # 6 experts, odd sizes: catches shape mix-ups
    init_random_weights(model, seed=seed, std=0.1)
    return model.eval()


def _randomise_adapters(model: Transformer, seed: int) -> None:
    # B starts at zero (the adapter is a no-op); give it values so the test can see a difference.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in lora_state_dict(model).items():
            if name.endswith("lora_B"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.05)


def _tokens() -> torch.Tensor:
    return torch.randint(0, 32768, (2, 9), generator=torch.Generator().manual_seed(3))


def test_adapter_shapes_follow_the_weights() -> None:
    model = _model()
    add_lora(model, LoRAConfig(rank=4, alpha=8))
    sd = lora_state_dict(model)
    a = model.args
    assert sd["layers.0.attention.wqkv.lora_A"].shape == (4, a.dim)
    assert sd["layers.0.attention.wqkv.lora_B"].shape == (a.q_size + 2 * a.kv_size, 4)
    assert sd["layers.1.feed_forward.w13.lora_A"].shape == (a.num_experts, 4, a.dim)
    assert sd["layers.1.feed_forward.w13.lora_B"].shape == (a.num_experts, 2 * a.hidden_dim, 4)
    assert sd["layers.2.feed_forward.w2.lora_A"].shape == (a.num_experts, 4, a.hidden_dim)
    assert sd["layers.2.feed_forward.w2.lora_B"].shape == (a.num_experts, a.dim, 4)
    assert len(sd) == 2 * 4 * a.n_layers


def test_fresh_adapters_are_a_no_op_and_only_adapters_train() -> None:
    base = _model()
    tokens = _tokens()
    with torch.no_grad():
        want = base(tokens)
    params = add_lora(base, LoRAConfig(rank=2))
    with torch.no_grad():
        torch.testing.assert_close(base(tokens), want)
    assert {id(p) for p in base.parameters() if p.requires_grad} == {id(p) for p in params}
    base.train()
    base(tokens).float().pow(2).mean().backward()
    assert all(p.grad is not None for p in params if p.shape[-1] == 2)  # every B gets a gradient


def test_merged_equals_unmerged_forward() -> None:
    model = _model()
    add_lora(model, LoRAConfig(rank=3, alpha=6))
    _randomise_adapters(model, 1)
    tokens = _tokens()
    with torch.no_grad():
        unmerged = model(tokens)
        assert not torch.allclose(unmerged, _model()(tokens), atol=1e-3)  # the adapters do change the output
        merge_lora(model)
        merged = model(tokens)
    assert not hasattr(model, "lora_config")
    assert set(dict(model.named_parameters())) == set(dict(_model().named_parameters()))  # plain model again
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)


def test_saved_adapter_merges_into_a_freshly_loaded_model(tmp_path: Path) -> None:
    model = _model()
    add_lora(model, LoRAConfig(rank=2, alpha=4, targets=("wo", "w13")))
    _randomise_adapters(model, 2)
    save_lora(model, tmp_path / "adapter")
    tokens = _tokens()
    with torch.no_grad():
        want = model(tokens)
        fresh = _model()
        config = merge_lora_into(fresh, tmp_path / "adapter")
        got = fresh(tokens)
    assert config.targets == ("wo", "w13") and config.rank == 2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_adapter_for_another_model_is_refused(tmp_path: Path) -> None:
    model = _model()
    add_lora(model, LoRAConfig(rank=2, targets=("wo",)))
    save_lora(model, tmp_path / "a")
    other = Transformer(preset("tiny"))
    with pytest.raises(ValueError, match=r"trained on a base model of shape \(dim 48.*has shape \(dim 64"):
        merge_lora_into(other, tmp_path / "a")
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        merge_lora_into(other, tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown LoRA target"):
        LoRAConfig(targets=("wq",))
