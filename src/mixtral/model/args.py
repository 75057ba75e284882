"""ModelArgs: the hyper-parameters of a Mixtral model, validated on construction.

Mirrors both on-disk configs (Hugging Face ``config.json`` and Mistral ``params.json``) and holds the
named presets. It knows nothing about weights or devices; the loader and the model read it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Tokenizer versions this project knows; the value is what `mixtral.tokenizer` accepts.
TOKENIZER_VERSIONS = ("v1", "v3")


class ConfigError(ValueError):
    """A model configuration that cannot describe a Mixtral model."""


@dataclass(frozen=True)
class ModelArgs:
    """Shapes and numerics of one Mixtral model. Field names follow Mistral's ``params.json``."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int  # one expert's FFN width (HF: intermediate_size)
    vocab_size: int
    num_experts: int = 8
    num_experts_per_tok: int = 2
    norm_eps: float = 1e-5
    rope_theta: float = 1e6
    max_seq_len: int = 32768
    # None = full attention. Early 8x7B configs said 4096, which is wrong for Mixtral (see MIXTRAL_NOTES).
    sliding_window: int | None = None
    router_aux_loss_coef: float = 0.02
    bos_id: int = 1
    eos_id: int = 2
    # Which mistral-common tokenizer encodes this model's prompts ("v1" or "v3").
    tokenizer: str = "v1"

    def __post_init__(self) -> None:
        positive = ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "vocab_size",
                    "num_experts", "num_experts_per_tok", "max_seq_len")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads}) for GQA"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.num_experts_per_tok > self.num_experts:
            raise ConfigError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_experts ({self.num_experts})"
            )
        if not self.norm_eps > 0:
            raise ConfigError(f"norm_eps must be > 0, got {self.norm_eps!r}")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta must be > 0, got {self.rope_theta!r}")
        if isinstance(self.router_aux_loss_coef, bool) or not (
            isinstance(self.router_aux_loss_coef, (int, float)) and self.router_aux_loss_coef >= 0
        ):
            raise ConfigError(f"router_aux_loss_coef must be a number >= 0, got {self.router_aux_loss_coef!r}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"sliding_window must be a positive integer or None, got {self.sliding_window!r}")
        if self.tokenizer not in TOKENIZER_VERSIONS:
            raise ConfigError(f"tokenizer must be one of {TOKENIZER_VERSIONS}, got {self.tokenizer!r}")
        for name in ("bos_id", "eos_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ConfigError(f"{name}={getattr(self, name)} is outside the vocabulary (size {self.vocab_size})")

    # ----------------------------------------------------------------- derived sizes
    @property
    def n_rep(self) -> int:
        """Query heads per KV head (GQA group size)."""
        return self.n_heads // self.n_kv_heads

    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim

    def num_parameters(self) -> dict[str, int]:
        """Parameter counts: total, active per token (top-k experts), and the parts."""
        embed = self.vocab_size * self.dim
        attn = self.dim * (self.q_size + 2 * self.kv_size) + self.q_size * self.dim
        expert = 3 * self.dim * self.hidden_dim
        router = self.dim * self.num_experts
        norms = 2 * self.dim
        per_layer = attn + router + norms + self.num_experts * expert
        total = 2 * embed + self.n_layers * per_layer + self.dim
        active = total - self.n_layers * (self.num_experts - self.num_experts_per_tok) * expert
        return {
            "total": total,
            "active": active,
            "embeddings": 2 * embed,
            "attention": self.n_layers * attn,
            "experts": self.n_layers * self.num_experts * expert,
            "router": self.n_layers * router,
        }

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """Bytes of K and V cache one token takes over all layers."""
        return 2 * self.n_layers * self.kv_size * dtype_bytes

    def replace(self, **changes: Any) -> ModelArgs:
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------- Hugging Face config.json
    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], tokenizer: str | None = None) -> ModelArgs:
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
            return cls._from_hf_fields(cfg, tokenizer)
        except TypeError as exc:  # e.g. "hidden_size": null
            raise ConfigError(f"config.json has a field of the wrong type: {exc}") from exc

    @classmethod
    def _from_hf_fields(cls, cfg: dict[str, Any], tokenizer: str | None) -> ModelArgs:
        n_heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
        vocab = cfg["vocab_size"]
        return cls(
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

    def to_hf_config(self) -> dict[str, Any]:
        """The Hugging Face config.json this model would ship with (transformers can load it)."""
        return {
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.hidden_dim,
            "vocab_size": self.vocab_size,
            "num_local_experts": self.num_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_seq_len,
            "sliding_window": self.sliding_window,
            "router_aux_loss_coef": self.router_aux_loss_coef,
            "bos_token_id": self.bos_id,
            "eos_token_id": self.eos_id,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "attention_dropout": 0.0,
            "output_router_logits": False,
            "torch_dtype": "bfloat16",
        }

    # ----------------------------------------------------------------- Mistral params.json
    @classmethod
    def from_params_json(cls, params: dict[str, Any], tokenizer: str | None = None) -> ModelArgs:
        """Build from Mistral's consolidated ``params.json``."""
        required = ("dim", "n_layers", "n_heads", "hidden_dim", "vocab_size")
        missing = [k for k in required if k not in params]
        if missing:
            raise ConfigError(f"params.json lacks required field(s) {missing}")
        moe = params.get("moe")
        if not isinstance(moe, dict):
            raise ConfigError("params.json has no 'moe' section: this is a dense model, not Mixtral")
        try:
            return cls._from_params_fields(params, moe, tokenizer)
        except TypeError as exc:
            raise ConfigError(f"params.json has a field of the wrong type: {exc}") from exc

    @classmethod
    def _from_params_fields(cls, params: dict[str, Any], moe: dict[str, Any], tokenizer: str | None) -> ModelArgs:
        n_heads = params["n_heads"]
        vocab = params["vocab_size"]
        return cls(
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

    def to_params_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "dim": self.dim,
            "n_layers": self.n_layers,
            "head_dim": self.head_dim,
            "hidden_dim": self.hidden_dim,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "norm_eps": self.norm_eps,
            "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta,
            "max_seq_len": self.max_seq_len,
            "moe": {"num_experts": self.num_experts, "num_experts_per_tok": self.num_experts_per_tok},
            # Not a field of Mistral's own params.json; kept so 8x22B's 0.001 survives a round trip.
            "router_aux_loss_coef": self.router_aux_loss_coef,
        }
        if self.sliding_window is not None:
            out["sliding_window"] = self.sliding_window
        return out

    @classmethod
    def from_folder(cls, folder: str | Path) -> ModelArgs:
        """Read config.json (preferred) or params.json from a model folder."""
        folder = Path(folder)
        tok = tokenizer_version_in_folder(folder)
        if (folder / "config.json").is_file():
            return cls.from_hf_config(_read_json(folder / "config.json"), tokenizer=tok)
        if (folder / "params.json").is_file():
            return cls.from_params_json(_read_json(folder / "params.json"), tokenizer=tok)
        raise ConfigError(f"{folder} has neither config.json nor params.json")


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


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def default_tokenizer_for_vocab(vocab_size: int) -> str:
    """v3 (Mixtral-8x22B-Instruct) has 32768 ids; everything else Mixtral uses v1."""
    return "v3" if vocab_size >= 32768 else "v1"


# File names of the tokenizers inside a model folder, by version.
TOKENIZER_FILES = {
    "v3": ("tokenizer.model.v3", "mistral_instruct_tokenizer_240323.model.v3"),
    "v1": ("tokenizer.model.v1",),
}


def tokenizer_version_in_folder(folder: Path) -> str | None:
    """Which tokenizer the folder ships, by the mistral-common file it holds (None if none, or only a bare
    ``tokenizer.model``, whose version the vocabulary size then decides)."""
    for version, names in TOKENIZER_FILES.items():
        if any((folder / n).is_file() for n in names):
            return version
    return None


_TINY = dict(
    dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128, num_experts=8,
    num_experts_per_tok=2, max_seq_len=2048,
)

PRESETS: dict[str, ModelArgs] = {
    "mixtral-8x7b": ModelArgs(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, hidden_dim=14336, vocab_size=32000,
        max_seq_len=32768, router_aux_loss_coef=0.02, tokenizer="v1",
    ),
    "mixtral-8x22b": ModelArgs(
        dim=6144, n_layers=56, n_heads=48, n_kv_heads=8, head_dim=128, hidden_dim=16384, vocab_size=32000,
        max_seq_len=65536, router_aux_loss_coef=0.001, tokenizer="v1",
    ),
    "mixtral-8x22b-instruct": ModelArgs(
        dim=6144, n_layers=56, n_heads=48, n_kv_heads=8, head_dim=128, hidden_dim=16384, vocab_size=32768,
        max_seq_len=65536, router_aux_loss_coef=0.001, tokenizer="v3",
    ),
    # Tiny shapes for tests and CPU runs, with the real tokenizers' vocabularies.
    "tiny": ModelArgs(**_TINY, vocab_size=32768, tokenizer="v3"),
    "tiny-v1": ModelArgs(**_TINY, vocab_size=32000, tokenizer="v1"),
    # Odd sizes, 6 experts, top-2, no GQA grouping beyond 3: catches shape assumptions.
    "tiny-odd": ModelArgs(
        dim=48, n_layers=3, n_heads=6, n_kv_heads=2, head_dim=8, hidden_dim=72, num_experts=6,
        num_experts_per_tok=2, vocab_size=32768, max_seq_len=1024, tokenizer="v3",
    ),
}
PRESETS["mixtral-8x7b-instruct"] = PRESETS["mixtral-8x7b"]


def preset(name: str) -> ModelArgs:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}") from None
