"""config.json fields that real exports write in odd ways: scaled RoPE, null ids and coefficients."""

from __future__ import annotations

import pytest

from mixtral.model.args import ConfigError
from mixtral.model.config_formats import args_from_hf_config, args_from_params_json

# The shape fields of Mixtral-8x7B's config.json and Mixtral-8x22B's params.json.
MIXTRAL_8X7B_CONFIG = {
    "model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 32768,
    "num_attention_heads": 32, "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "num_local_experts": 8, "rms_norm_eps": 1e-05, "rope_theta": 1e6, "router_aux_loss_coef": 0.02,
    "sliding_window": None, "vocab_size": 32000, "bos_token_id": 1, "eos_token_id": 2,
}
MIXTRAL_8X22B_PARAMS = {
    "dim": 6144, "n_layers": 56, "head_dim": 128, "hidden_dim": 16384, "n_heads": 48, "n_kv_heads": 8,
    "norm_eps": 1e-05, "vocab_size": 32768, "rope_theta": 1000000.0,
    "moe": {"num_experts": 8, "num_experts_per_tok": 2},
}


@pytest.mark.parametrize("changes", [
    {"rope_scaling": {"type": "linear", "factor": 2.0}},
    {"rope_scaling": {"rope_type": "dynamic", "factor": 4.0}},
    {"rope_theta": None, "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}},
])
def test_scaled_rope_is_refused_not_ignored(changes: dict) -> None:
    # Silently computing plain RoPE for a config that asks for scaling would give wrong logits.
    with pytest.raises(ConfigError, match="RoPE scaling"):
        args_from_hf_config({**MIXTRAL_8X7B_CONFIG, **changes})


@pytest.mark.parametrize("changes", [
    {"rope_scaling": None},
    {"rope_theta": None, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
    {"rope_scaling": {"rope_type": "default"}},
])
def test_plain_rope_in_any_spelling_is_accepted(changes: dict) -> None:
    assert args_from_hf_config({**MIXTRAL_8X7B_CONFIG, **changes}).rope_theta == 1e6


def test_null_fields_take_mixtrals_defaults() -> None:
    cfg = {**MIXTRAL_8X7B_CONFIG, "bos_token_id": None, "eos_token_id": None, "router_aux_loss_coef": None}
    args = args_from_hf_config(cfg)
    assert (args.bos_id, args.eos_id, args.router_aux_loss_coef) == (1, 2, 0.02)
    params = args_from_params_json({**MIXTRAL_8X22B_PARAMS, "router_aux_loss_coef": None, "rope_theta": None,
                                         "sliding_window": None})
    assert (params.router_aux_loss_coef, params.rope_theta, params.sliding_window) == (0.02, 1e6, None)


def test_eos_list_takes_its_first_id_and_an_empty_list_is_named() -> None:
    assert args_from_hf_config({**MIXTRAL_8X7B_CONFIG, "eos_token_id": [2, 7]}).eos_id == 2
    with pytest.raises(ConfigError, match="empty eos_token_id"):
        args_from_hf_config({**MIXTRAL_8X7B_CONFIG, "eos_token_id": []})


@pytest.mark.parametrize("value", ["0.02", -0.1, True])
def test_bad_router_aux_loss_coef_is_named(value: object) -> None:
    with pytest.raises(ConfigError, match="router_aux_loss_coef"):
        args_from_hf_config({**MIXTRAL_8X7B_CONFIG, "router_aux_loss_coef": value})
