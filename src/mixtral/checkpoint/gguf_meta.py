"""A GGUF file's metadata -> ModelArgs and the mistral-common tokenizer it was made with.

llama.cpp writes Mixtral as architecture ``llama`` with ``llama.expert_count`` / ``llama.expert_used_count``;
the hyper-parameters are ``{arch}.embedding_length``, ``block_count``, ``feed_forward_length``,
``attention.head_count``, ``attention.head_count_kv``, ``attention.layer_norm_rms_epsilon``,
``rope.freq_base``, ``rope.dimension_count``, ``context_length``; the vocabulary is ``tokenizer.ggml.tokens``
(sentencepiece pieces, ``tokenizer.ggml.model`` = "llama"), with ``bos_token_id`` / ``eos_token_id``.

The tokenizer is not rebuilt from the token list: the list must equal, piece for piece, one of the
tokenizers mistral-common ships (v1 for Mixtral-8x7B, v3 for 8x22B-Instruct), and that file is used. A file
whose vocabulary matches neither fails with the first differing id. Not here: tensors (gguf_file.py).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from mixtral.checkpoint.errors import CheckpointError
from mixtral.checkpoint.tokenizer_files import packaged_tokenizer
from mixtral.model.args import TOKENIZER_VERSIONS, ConfigError, ModelArgs

MIXTRAL_ROPE_THETA = 1e6  # used when the file has no rope.freq_base (llama.cpp itself would assume 1e4: wrong)


def _f32(x: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-5 is stored as 9.99999975e-06)."""
    return float(np.format_float_positional(np.float32(x), unique=True, trim="-"))


def _need(meta: dict[str, Any], key: str, path: Path) -> Any:
    if key not in meta:
        raise CheckpointError(f"{path} lacks the GGUF metadata key {key!r}; cannot build a Mixtral config")
    return meta[key]


def args_from_metadata(meta: dict[str, Any], path: Path, tokenizer: str) -> ModelArgs:
    """ModelArgs from GGUF key/values (``meta``: key -> value), or a CheckpointError naming what is missing."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path} is a GGUF of architecture {arch!r}; Mixtral files are 'llama' with experts")
    if "llama.expert_count" not in meta:
        raise CheckpointError(f"{path} is a dense llama GGUF (no llama.expert_count); only Mixtral is supported")
    dim = int(_need(meta, "llama.embedding_length", path))
    n_heads = int(_need(meta, "llama.attention.head_count", path))
    tokens = _need(meta, "tokenizer.ggml.tokens", path)
    head_dim = int(meta.get("llama.rope.dimension_count") or meta.get("llama.attention.key_length") or dim // n_heads)
    try:
        return ModelArgs(
            dim=dim,
            n_layers=int(_need(meta, "llama.block_count", path)),
            n_heads=n_heads,
            n_kv_heads=int(meta.get("llama.attention.head_count_kv", n_heads)),
            head_dim=head_dim,
            hidden_dim=int(_need(meta, "llama.feed_forward_length", path)),
            vocab_size=len(tokens),
            num_experts=int(meta["llama.expert_count"]),
            num_experts_per_tok=int(_need(meta, "llama.expert_used_count", path)),
            norm_eps=_f32(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=_f32(meta.get("llama.rope.freq_base", MIXTRAL_ROPE_THETA)),
            max_seq_len=int(meta.get("llama.context_length", 32768)),
            bos_id=int(meta.get("tokenizer.ggml.bos_token_id", 1)),
            eos_id=int(meta.get("tokenizer.ggml.eos_token_id", 2)),
            tokenizer=tokenizer,
        )
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: its GGUF metadata does not describe a Mixtral model: {exc}") from exc


@functools.lru_cache(maxsize=len(TOKENIZER_VERSIONS))
def packaged_pieces(version: str) -> tuple[str, ...]:
    """The pieces of mistral-common's ``version`` tokenizer, by id."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(packaged_tokenizer(version)))
    return tuple(sp.id_to_piece(i) for i in range(sp.get_piece_size()))


def match_tokenizer(meta: dict[str, Any], path: Path) -> str:
    """The mistral-common tokenizer version whose pieces are exactly the file's tokens; a CheckpointError
    naming the closest version's first differing id otherwise."""
    model = meta.get("tokenizer.ggml.model")
    if model != "llama":
        raise CheckpointError(f"{path} has tokenizer.ggml.model={model!r}; Mixtral's sentencepiece tokenizers are "
                              "'llama'")
    tokens = tuple(_need(meta, "tokenizer.ggml.tokens", path))
    mismatches = []
    for version in TOKENIZER_VERSIONS:
        pieces = packaged_pieces(version)
        if tokens == pieces:
            return version
        common = min(len(tokens), len(pieces))
        first = next((i for i in range(common) if tokens[i] != pieces[i]), common)
        mismatches.append((first, version, len(pieces)))
    first, version, size = max(mismatches)
    got = repr(tokens[first]) if first < len(tokens) else "the end of the list"
    want = repr(packaged_pieces(version)[first]) if first < size else "the end of the list"
    raise CheckpointError(
        f"{path}: its vocabulary ({len(tokens)} tokens) is neither mistral-common's v1 nor v3 tokenizer; closest is "
        f"{version} ({size} tokens), which first differs at id {first}: file has {got}, {version} has {want}"
    )
