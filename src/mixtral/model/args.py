"""ModelArgs: the hyper-parameters of a Mixtral model, validated on construction.

Field names follow Mistral's ``params.json``. It knows nothing about files, weights or devices: the named
presets are in ``model/presets.py``, the translation from and to Hugging Face ``config.json`` and Mistral
``params.json`` in ``model/config_formats.py``; the loader and the model read it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
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


def default_tokenizer_for_vocab(vocab_size: int) -> str:
    """v3 (Mixtral-8x22B-Instruct) has 32768 ids; everything else Mixtral uses v1."""
    return "v3" if vocab_size >= 32768 else "v1"
