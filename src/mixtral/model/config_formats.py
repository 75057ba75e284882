"""Translation between ``ModelArgs`` and the two on-disk configs: Hugging Face ``config.json`` and Mistral's
``params.json`` (as dicts; ``read_json`` reads one). Which file a model folder holds, and its tokenizer, is the
checkpoint loader's business (``checkpoint/loader.resolve_folder``).

Each reader refuses what cannot describe a Mixtral model with a ``ConfigError`` that names the field (a dense
params.json, scaled RoPE, tied embeddings, a wrong activation, a field of the wrong type); a field written as
null takes its default, as transformers writes unset fields.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mixtral.model.args import ConfigError, ModelArgs, default_tokenizer_for_vocab


# ----------------------------------------------------------------- Hugging Face config.json
def args_from_hf_config(cfg: dict[str, Any], tokenizer: str | None = None) -> ModelArgs:
    """Build from a Hugging Face ``MixtralConfig`` dict (config.json)."""
    model_type = cfg.get("model_type")
    if model_type not in (None, "mixtral"):
        raise ConfigError(f"config.json has model_type={model_type!r}; only 'mixtral' is supported")
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    missing = [k for k in required if k not in cfg]
    if missing:
        raise ConfigError(f"config.json lacks required field(s) {missing}")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"hidden_act={act!r} is not Mixtral's 'silu'")
    if cfg.get("tie_word_embeddings", False):
        raise ConfigError("tie_word_embeddings=true is not a Mixtral model (its lm_head is separate)")
    _check_plain_rope(cfg)
    try:
        return _from_hf_fields(cfg, tokenizer)
    except TypeError as exc:  # e.g. "hidden_size": null
        raise ConfigError(f"config.json has a field of the wrong type: {exc}") from exc


def _from_hf_fields(cfg: dict[str, Any], tokenizer: str | None) -> ModelArgs:
    n_heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
    vocab = cfg["vocab_size"]
    return ModelArgs(
        dim=cfg["hidden_size"],
        n_layers=cfg["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        head_dim=head_dim,
        hidden_dim=cfg["intermediate_size"],
        vocab_size=vocab,
        num_experts=cfg.get("num_local_experts", 8),
        num_experts_per_tok=cfg.get("num_experts_per_tok", 2),
        norm_eps=cfg.get("rms_norm_eps", 1e-5),
        # Mixtral's theta is 1e6; converters that default a missing value to 1e4 are wrong.
        rope_theta=float(_hf_rope_theta(cfg)),
        max_seq_len=cfg.get("max_position_embeddings", 32768),
        sliding_window=cfg.get("sliding_window"),
        router_aux_loss_coef=_unset_default(cfg.get("router_aux_loss_coef"), 0.02),
        bos_id=_unset_default(cfg.get("bos_token_id"), 1),
        eos_id=_unset_default(_first(cfg.get("eos_token_id")), 2),
        tokenizer=tokenizer or default_tokenizer_for_vocab(vocab),
    )


def args_to_hf_config(args: ModelArgs) -> dict[str, Any]:
    """The Hugging Face config.json this model would ship with (transformers can load it)."""
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "hidden_size": args.dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "intermediate_size": args.hidden_dim,
        "vocab_size": args.vocab_size,
        "num_local_experts": args.num_experts,
        "num_experts_per_tok": args.num_experts_per_tok,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "max_position_embeddings": args.max_seq_len,
        "sliding_window": args.sliding_window,
        "router_aux_loss_coef": args.router_aux_loss_coef,
        "bos_token_id": args.bos_id,
        "eos_token_id": args.eos_id,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "attention_dropout": 0.0,
        "output_router_logits": False,
        "torch_dtype": "bfloat16",
    }


# ----------------------------------------------------------------- Mistral params.json
def args_from_params_json(params: dict[str, Any], tokenizer: str | None = None) -> ModelArgs:
    """Build from Mistral's consolidated ``params.json``."""
    required = ("dim", "n_layers", "n_heads", "hidden_dim", "vocab_size")
    missing = [k for k in required if k not in params]
    if missing:
        raise ConfigError(f"params.json lacks required field(s) {missing}")
    moe = params.get("moe")
    if not isinstance(moe, dict):
        raise ConfigError("params.json has no 'moe' section: this is a dense model, not Mixtral")
    try:
        return _from_params_fields(params, moe, tokenizer)
    except TypeError as exc:
        raise ConfigError(f"params.json has a field of the wrong type: {exc}") from exc


def _from_params_fields(params: dict[str, Any], moe: dict[str, Any], tokenizer: str | None) -> ModelArgs:
    n_heads = params["n_heads"]
    vocab = params["vocab_size"]
    return ModelArgs(
        dim=params["dim"],
        n_layers=params["n_layers"],
        n_heads=n_heads,
        n_kv_heads=params.get("n_kv_heads") or n_heads,
        head_dim=params.get("head_dim") or params["dim"] // n_heads,
        hidden_dim=params["hidden_dim"],
        vocab_size=vocab,
        num_experts=moe.get("num_experts", 8),
        num_experts_per_tok=moe.get("num_experts_per_tok", 2),
        norm_eps=params.get("norm_eps", 1e-5),
        rope_theta=float(_unset_default(params.get("rope_theta"), 1e6)),
        max_seq_len=params.get("max_seq_len", 32768),
        sliding_window=params.get("sliding_window"),
        router_aux_loss_coef=_unset_default(params.get("router_aux_loss_coef"), 0.02),
        tokenizer=tokenizer or default_tokenizer_for_vocab(vocab),
    )


def args_to_params_json(args: ModelArgs) -> dict[str, Any]:
    out: dict[str, Any] = {
        "dim": args.dim,
        "n_layers": args.n_layers,
        "head_dim": args.head_dim,
        "hidden_dim": args.hidden_dim,
        "n_heads": args.n_heads,
        "n_kv_heads": args.n_kv_heads,
        "norm_eps": args.norm_eps,
        "vocab_size": args.vocab_size,
        "rope_theta": args.rope_theta,
        "max_seq_len": args.max_seq_len,
        "moe": {"num_experts": args.num_experts, "num_experts_per_tok": args.num_experts_per_tok},
        # Not a field of Mistral's own params.json; kept so 8x22B's 0.001 survives a round trip.
        "router_aux_loss_coef": args.router_aux_loss_coef,
    }
    if args.sliding_window is not None:
        out["sliding_window"] = args.sliding_window
    return out


def _first(value: Any) -> Any:
    """The first of a list of ids (HF configs may list several end-of-sequence ids), or the value itself."""
    if isinstance(value, list):
        if not value:
            raise ConfigError("config.json has an empty eos_token_id list")
        return value[0]
    return value


def _unset_default(value: Any, default: Any) -> Any:
    """``default`` when a config field is null (transformers writes unset fields as null)."""
    return default if value is None else value


def _check_plain_rope(cfg: dict[str, Any]) -> None:
    """Mixtral uses plain RoPE; a config asking for scaled RoPE (linear, dynamic, YaRN, ...) would be silently
    computed wrong, so it is refused. transformers 5 writes ``rope_parameters`` with ``rope_type: default``."""
    for key in ("rope_scaling", "rope_parameters"):
        rope = cfg.get(key)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            raise ConfigError(f"config.json: {key} must be an object or null, got {rope!r}")
        kind = rope.get("rope_type", rope.get("type"))
        if kind not in (None, "default"):
            raise ConfigError(
                f"config.json: {key} asks for {kind!r} RoPE scaling ({rope}); Mixtral uses plain RoPE and "
                "scaled RoPE is not implemented"
            )


def _hf_rope_theta(cfg: dict[str, Any]) -> float:
    if "rope_theta" in cfg and cfg["rope_theta"] is not None:
        return cfg["rope_theta"]
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if isinstance(rope, dict) and rope.get("rope_theta") is not None:
        return rope["rope_theta"]
    return 1e6


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; ConfigError when it is not valid JSON or not an object."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data
