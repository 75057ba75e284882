"""ModelArgs: built from config.json / params.json (real ones and round trips), validated, and its presets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import MixtralConfig

from mixtral.model.args import ConfigError
from mixtral.model.config_formats import (
    args_from_hf_config,
    args_from_params_json,
    args_to_hf_config,
    args_to_params_json,
)
from mixtral.model.presets import PRESETS, preset

# config.json of mistralai/Mixtral-8x7B-v0.1 as published on the Hub.
MIXTRAL_8X7B_CONFIG = {
    "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 32, "num_experts_per_tok": 2,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8, "output_router_logits": False,
    "rms_norm_eps": 1e-05, "rope_theta": 1e6, "router_aux_loss_coef": 0.02, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.36.0.dev0",
    "use_cache": True, "vocab_size": 32000,
}
# params.json of Mixtral-8x22B-Instruct-v0.1 (consolidated release).
MIXTRAL_8X22B_PARAMS = {
    "dim": 6144, "n_layers": 56, "head_dim": 128, "hidden_dim": 16384, "n_heads": 48, "n_kv_heads": 8,
    "norm_eps": 1e-05, "vocab_size": 32768, "rope_theta": 1000000.0,
    "moe": {"num_experts": 8, "num_experts_per_tok": 2},
}
SHAPE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "vocab_size", "num_experts",
                "num_experts_per_tok", "norm_eps", "rope_theta", "sliding_window", "tokenizer")


def test_real_8x7b_config_is_the_preset() -> None:
    assert args_from_hf_config(MIXTRAL_8X7B_CONFIG) == PRESETS["mixtral-8x7b"]


def test_real_8x22b_params_json_has_the_presets_shapes() -> None:
    got, want = args_from_params_json(MIXTRAL_8X22B_PARAMS), PRESETS["mixtral-8x22b-instruct"]
    assert {f: getattr(got, f) for f in SHAPE_FIELDS} == {f: getattr(want, f) for f in SHAPE_FIELDS}
    assert got.tokenizer == "v3"  # 32768 ids


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_config_round_trip(name: str) -> None:
    args = PRESETS[name]
    assert args_from_hf_config(args_to_hf_config(args), tokenizer=args.tokenizer) == args


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_transformers_config_dict_round_trip(name: str) -> None:
    """transformers 5 moves rope_theta into rope_parameters; the dict it writes still parses to the same args."""
    args = PRESETS[name]
    cfg = MixtralConfig(**args_to_hf_config(args)).to_dict()
    assert args_from_hf_config(cfg, tokenizer=args.tokenizer) == args


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_params_json_round_trip(name: str) -> None:
    args = PRESETS[name]
    back = args_from_params_json(args_to_params_json(args), tokenizer=args.tokenizer)
    # params.json has no field for the router aux-loss coefficient (a training knob); all else survives.
    assert back == args.replace(router_aux_loss_coef=back.router_aux_loss_coef)


def test_folder_args_prefer_config_json_and_read_tokenizer(tmp_path: Path) -> None:
    """A folder's args (read by the checkpoint loader): config.json over params.json, the tokenizer file's
    version over the vocabulary's."""
    from mixtral.checkpoint.loader import resolve_folder

    (tmp_path / "params.json").write_text(json.dumps(MIXTRAL_8X22B_PARAMS))
    assert resolve_folder(tmp_path).args.dim == 6144
    (tmp_path / "config.json").write_text(json.dumps(MIXTRAL_8X7B_CONFIG))
    (tmp_path / "tokenizer.model.v3").write_bytes(b"")
    args = resolve_folder(tmp_path).args
    assert args.dim == 4096 and args.tokenizer == "v3"


def test_folder_without_config(tmp_path: Path) -> None:
    from mixtral.checkpoint.errors import CheckpointError
    from mixtral.checkpoint.loader import resolve_folder

    with pytest.raises(CheckpointError, match=r"neither config\.json .*nor params\.json"):
        resolve_folder(tmp_path)


def test_sliding_window_only_when_configured() -> None:
    assert args_from_hf_config(MIXTRAL_8X7B_CONFIG).sliding_window is None
    assert args_from_hf_config({**MIXTRAL_8X7B_CONFIG, "sliding_window": 4096}).sliding_window == 4096


def test_missing_rope_theta_defaults_to_mixtrals_not_llamas() -> None:
    cfg = {k: v for k, v in MIXTRAL_8X7B_CONFIG.items() if k != "rope_theta"}
    assert args_from_hf_config(cfg).rope_theta == 1e6
    params = {k: v for k, v in MIXTRAL_8X22B_PARAMS.items() if k != "rope_theta"}
    assert args_from_params_json(params).rope_theta == 1e6


BASE = PRESETS["tiny"]


@pytest.mark.parametrize(("changes", "message"), [
    ({"n_kv_heads": 3}, "multiple of n_kv_heads"),
    ({"head_dim": 15}, "head_dim must be even"),
    ({"num_experts_per_tok": 9}, "exceeds num_experts"),
    ({"dim": 0}, "dim must be a positive integer"),
    ({"n_layers": 2.0}, "n_layers must be a positive integer"),
    ({"norm_eps": 0.0}, "norm_eps"),
    ({"rope_theta": -1.0}, "rope_theta"),
    ({"sliding_window": 0}, "sliding_window"),
    ({"tokenizer": "v7"}, "tokenizer must be one of"),
    ({"eos_id": 32768}, "eos_id=32768 is outside the vocabulary"),
])
def test_validation_errors_name_the_value(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        BASE.replace(**changes)


@pytest.mark.parametrize(("changes", "message"), [
    ({"model_type": "llama"}, "model_type='llama'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ({"hidden_size": -4096}, "dim must be a positive integer, got -4096"),
])
def test_hf_config_errors(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        args_from_hf_config({**MIXTRAL_8X7B_CONFIG, **changes})


def test_hf_config_missing_fields() -> None:
    cfg = {k: v for k, v in MIXTRAL_8X7B_CONFIG.items() if k not in ("hidden_size", "vocab_size")}
    with pytest.raises(ConfigError, match="hidden_size"):
        args_from_hf_config(cfg)


def test_params_json_of_a_dense_model_is_rejected() -> None:
    dense = {k: v for k, v in MIXTRAL_8X22B_PARAMS.items() if k != "moe"}
    with pytest.raises(ConfigError, match="no 'moe' section"):
        args_from_params_json(dense)


def test_full_size_parameter_counts() -> None:
    """The published sizes: 46.7B total / 12.9B active (8x7B), 140.6B / 39B (8x22B)."""
    c7 = preset("mixtral-8x7b").num_parameters()
    assert round(c7["total"] / 1e9, 1) == 46.7 and round(c7["active"] / 1e9, 1) == 12.9
    c22 = preset("mixtral-8x22b").num_parameters()
    assert round(c22["total"] / 1e9, 1) == 140.6 and round(c22["active"] / 1e9) == 39
    assert c7["total"] == c7["embeddings"] + c7["attention"] + c7["experts"] + c7["router"] + (2 * 32 + 1) * 4096


def test_kv_bytes_and_gqa() -> None:
    args = preset("mixtral-8x7b")
    assert args.n_rep == 4 and args.kv_bytes_per_token(2) == 2 * 32 * 8 * 128 * 2
    assert preset("tiny").n_rep == 2 and preset("tiny-odd").n_rep == 3 and preset("tiny-odd").num_experts == 6


def test_unknown_preset_lists_known_ones() -> None:
    with pytest.raises(ConfigError, match="mixtral-8x7b"):
        preset("mixtral-9x9b")


def test_one_tokenizer_file_table(tmp_path: Path) -> None:
    """The one table of tokenizer file names: every name it lists gives its version to the loader's lookup, and
    the name the writer uses is the table's first."""
    from mixtral.checkpoint.tokenizer_files import TOKENIZER_FILES, copy_tokenizer, find_tokenizer

    for version, names in TOKENIZER_FILES.items():
        for name in names:
            folder = tmp_path / f"{version}-{name}"
            folder.mkdir()
            (folder / name).write_bytes(b"")
            assert find_tokenizer(folder, 32000) == (version, folder / name)
        out = tmp_path / f"out-{version}"
        out.mkdir()
        assert copy_tokenizer(out, version, source=folder / name).name == names[0]
