"""The GGUF reader against llama.cpp itself: a tiny Mixtral GGUF (fp32 weights, written as llama.cpp's converter
does), loaded into our fp32 model through ``GGUFCheckpoint``, gives llama.cpp's logits. This checks what the
weight-by-weight tests cannot: that our reading of the layout (q/k row interleaving, expert order, router,
norms, RoPE theta, config keys) is the one llama.cpp runs. Needs ``llama-cpp-python`` (the ``peers`` extra, a
~4.5 min source build): marked ``peers``, deselected by default; ``pip install -e '.[peers]' && python -m pytest
-m peers`` runs it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf_testing import load_float_model, write_gguf

from mixtral.model.args import ModelArgs

pytestmark = pytest.mark.peers

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96, vocab_size=32000,
                 num_experts=4, max_seq_len=512, tokenizer="v1")


def llama_cpp_logits(path: Path, tokens: list[int]) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=128, n_threads=1, logits_all=True, verbose=False)
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)  # [T, V]
    finally:
        llm.close()


TOKENS = [1, 22557, 1526, 28725, 910, 460, 368, 28804]  # <s> Hello world, how are you?


def test_our_logits_equal_llama_cpp_on_the_same_gguf(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write_gguf(path, ARGS, lambda name: "F32", merged=True, seed=7)
    ours = load_float_model(path)(torch.tensor([TOKENS]))[0].detach().numpy()  # [T, V]
    theirs = llama_cpp_logits(path, TOKENS)
    scale = np.abs(theirs).max()
    assert np.abs(ours - theirs).max() < 2e-3 * scale
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


def test_per_expert_file_is_the_same_model(tmp_path: Path) -> None:
    """Current llama.cpp reads only merged experts; an older per-expert file of the same weights must give our
    model exactly the merged file's logits (so it too equals llama.cpp's)."""
    write_gguf(tmp_path / "merged.gguf", ARGS, lambda name: "F32", merged=True, seed=7)
    write_gguf(tmp_path / "old.gguf", ARGS, lambda name: "F32", merged=False, seed=7)
    ids = torch.tensor([TOKENS])
    merged = load_float_model(tmp_path / "merged.gguf")(ids)
    old = load_float_model(tmp_path / "old.gguf")(ids)
    assert torch.equal(merged, old)
