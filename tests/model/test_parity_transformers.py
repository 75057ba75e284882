"""Our model, loaded from files our writer produced, against transformers' MixtralForCausalLM on the same files.

fp32: max |logit difference| <= 1e-4 on two configs: `tiny` (4 query heads per 2 KV heads, 8 experts) and
`tiny-odd` (6 heads per 2 KV heads, 6 experts, odd widths, 3 layers).
bf16: routing is discrete and bf16 rounding flips near-tie expert choices, so single logits can differ a
lot; the stated tolerance is on distributions: mean |difference| <= 3% of mean |logit|, mean per-position
cosine >= 0.995, and the same argmax on >= 90% of positions.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from mixtral.checkpoint.loader import load_model
from mixtral.checkpoint.writer import save_checkpoint
from mixtral.model.mixtral import Transformer, init_random_weights
from mixtral.model.presets import preset

FP32_TOL = 1e-4
BF16_REL_MEAN_TOL = 0.03
BF16_COSINE_MIN = 0.995
BF16_ARGMAX_AGREE = 0.90


@pytest.fixture(scope="module", params=["tiny", "tiny-odd"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    args = preset(request.param)
    model = Transformer(args)
    init_random_weights(model, seed=3, std=0.1)  # larger than the default std: routing is far from uniform
    # A small shard limit makes the transformers side read a sharded checkpoint through its index too.
    return save_checkpoint(model, args, tmp_path_factory.mktemp(request.param), "hf", max_shard_bytes=4 * 2**20)


def _reference(folder: Path, dtype: torch.dtype):
    ref, info = transformers.MixtralForCausalLM.from_pretrained(folder, dtype=dtype, output_loading_info=True)
    # Every tensor we wrote must land in transformers' model, with none left over or missing.
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return ref.eval()


def _input_ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 29), generator=torch.Generator().manual_seed(11))  # [B, T]


def test_fp32_logits_match_transformers(checkpoint: Path) -> None:
    ours = load_model(checkpoint, dtype=torch.float32)
    ref = _reference(checkpoint, torch.float32)
    ids = _input_ids(ours.args.vocab_size)
    with torch.no_grad():
        got = ours(ids)  # [B, T, V]
        want = ref(ids).logits
    assert got.shape == want.shape == (*ids.shape, ours.args.vocab_size)
    assert want.abs().max() > 1.0  # logits are not trivially small
    assert (got - want).abs().max().item() <= FP32_TOL


def test_bf16_logits_match_transformers_within_stated_tolerance(checkpoint: Path) -> None:
    ours = load_model(checkpoint, dtype="bf16")
    assert ours.dtype == torch.bfloat16
    ref = _reference(checkpoint, torch.bfloat16)
    ids = _input_ids(ours.args.vocab_size)
    with torch.no_grad():
        got = ours(ids).float()
        want = ref(ids).logits.float()
    rel_mean = ((got - want).abs().mean() / want.abs().mean()).item()
    cosine = torch.nn.functional.cosine_similarity(got, want, dim=-1).mean().item()  # over [B, T]
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    assert rel_mean <= BF16_REL_MEAN_TOL, rel_mean
    assert cosine >= BF16_COSINE_MIN, cosine
    assert agree >= BF16_ARGMAX_AGREE, agree
