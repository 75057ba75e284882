"""The named model presets: the released Mixtral shapes, a 1.6B one for CPU benchmarks, and tiny ones for tests
and CPU runs.

A preset is a ``ModelArgs``; ``mixtral init``, the loader (random weights) and the benchmarks build models from
them by name.
"""

from __future__ import annotations

from mixtral.model.args import ConfigError, ModelArgs

# Shapes shared by the tiny presets.
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
    # 1.6B parameters in Mixtral's layout (8 experts, top-2, GQA 4:1, 128-wide heads), 3.2 GB in bf16: big enough
    # that a CPU decode step is bound by weight reads rather than per-op overhead, small enough for a laptop
    # (`mixtral bench throughput --compare --model cpu-1.6b`).
    "cpu-1.6b": ModelArgs(
        dim=2048, n_layers=4, n_heads=16, n_kv_heads=4, head_dim=128, hidden_dim=7168, num_experts=8,
        num_experts_per_tok=2, vocab_size=32768, max_seq_len=4096, tokenizer="v3",
    ),
    # Odd sizes, 6 experts, top-2, no GQA grouping beyond 3: catches shape assumptions.
    "tiny-odd": ModelArgs(
        dim=48, n_layers=3, n_heads=6, n_kv_heads=2, head_dim=8, hidden_dim=72, num_experts=6,
        num_experts_per_tok=2, vocab_size=32768, max_seq_len=1024, tokenizer="v3",
    ),
}
PRESETS["mixtral-8x7b-instruct"] = PRESETS["mixtral-8x7b"]


def preset(name: str) -> ModelArgs:
    """The preset called ``name``; ConfigError listing the known ones otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}") from None
