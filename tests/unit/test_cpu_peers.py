"""The CPU peers of ``mixtral bench throughput`` really run the model: their greedy tokens equal our model's on
the same weights (transformers on the HF checkpoint; llama.cpp, where installed, on a GGUF of them), and
batching sequences does not change them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from mixtral.bench.cpu_peers import PeerRun, peer_version, run_llama_cpp, run_transformers
from mixtral.checkpoint.loader import load_model
from mixtral.model.args import ModelArgs
from mixtral.model.mixtral import Transformer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "checkpoint"))
from gguf_testing import load_float_model, write_gguf

PROMPTS = [[1, 22557, 1526, 28725], [1, 910, 460, 368, 28804, 7]]


def greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """Our model's greedy continuation, full recomputation each step (the dense forward)."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_peer_run_figures() -> None:
    run = PeerRun("x", "1", 2, prefill_s=0.5, decode_s=1.5, tokens=[[1, 2, 3], [4, 5, 6]])
    assert run.output_tokens == 6
    assert run.output_tok_s == pytest.approx(3.0)
    assert run.decode_tok_s == pytest.approx(4 / 1.5)
    assert peer_version("transformers") is not None and peer_version("no_such_peer_pkg") is None


def test_transformers_peer_generates_our_greedy_tokens(tiny_hf_checkpoint: Path, single_torch_thread: None) -> None:
    ours = load_model(tiny_hf_checkpoint, "cpu", torch.float32)
    want = [greedy(ours, p, 5) for p in PROMPTS]
    for batch in (1, 2):
        run = run_transformers(tiny_hf_checkpoint, PROMPTS, 5, batch=batch, dtype="float32", threads=1)
        assert run.peer == "transformers" and run.batch == batch
        assert run.tokens == want
        assert run.output_tokens == 10 and run.prefill_s > 0 and run.decode_s > 0


@pytest.mark.peers  # needs the peers extra (llama-cpp-python): deselected by default, `pytest -m peers`
def test_llama_cpp_peer_generates_our_greedy_tokens(tmp_path: Path) -> None:
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96, vocab_size=32000,
                     num_experts=4, max_seq_len=512, tokenizer="v1")
    path = tmp_path / "tiny.gguf"
    write_gguf(path, args, lambda name: "F32", seed=11)
    ours = load_float_model(path)
    want = [greedy(ours, p, 4) for p in PROMPTS]
    single = run_llama_cpp(path, PROMPTS, 4, batch=1, threads=1)
    batched = run_llama_cpp(path, PROMPTS, 4, batch=2, threads=1)
    assert single.tokens == batched.tokens == want
    assert batched.peer == "llama.cpp" and batched.output_tok_s > 0
