"""Tensor and expert parallelism on real GPUs (NCCL) against one GPU: ``python -m pytest -m gpu -k distributed``.

Each test is marked ``gpus(2)`` (``test_tp2_x_ep2_on_four_gpus``: ``gpus(4)``): on a machine with fewer CUDA GPUs
tests/gpu/conftest.py deselects it at collection (never a skip, never a failure of the machine). A model that
fits one GPU (Mixtral's attention and MoE layout scaled down: head_dim 128, GQA 4, 8 experts top-2) is written
as a checkpoint once; then for TP 2 and EP 2:

- fp32 (IEEE dots): the dense forward's logits within 1e-4 (relative) of one GPU's, and greedy tokens identical
  over 24 mixed requests through the engine, whose decode steps replay CUDA graphs captured on every rank with
  the NCCL all-reduces inside, with async scheduling feeding each step the previous step's ids by an NCCL
  broadcast;
- bf16: next-token distributions close (mean KL < 1e-2, top-1 agreeing on 95% of positions): the all-reduce
  sums partial outputs rounded to bf16, so argmaxes near a tie may differ.

The engine is built as users build it: ``LLMEngine.from_config(..., tensor_parallel_size=2)``.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.gpu

LAYOUTS = {"tp2": {"tensor_parallel_size": 2}, "ep2": {"tensor_parallel_size": 2, "enable_expert_parallel": True}}
ENGINE = dict(max_model_len=512, max_num_seqs=16, max_num_batched_tokens=256, kv_cache_bytes=256 << 20,
              enable_prefix_caching=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fp32 HF checkpoint of a mid-sized Mixtral (v3 tokenizer), written once."""
    from mixtral.checkpoint.writer import save_checkpoint
    from mixtral.model.args import ModelArgs
    from mixtral.model.mixtral import Transformer, init_random_weights

    os.environ["TRITON_F32_DEFAULT"] = "ieee"  # fp32 tl.dot in IEEE precision (workers inherit it)
    args = ModelArgs(dim=1024, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=128, hidden_dim=2048,
                     vocab_size=32768, max_seq_len=4096, tokenizer="v3")
    model = Transformer(args)
    init_random_weights(model, seed=0, std=0.05)
    return save_checkpoint(model, args, tmp_path_factory.mktemp("tp_gpu"), "hf")


def _requests() -> list[tuple[list[int], Any]]:
    """24 requests: prompts of 5 to 300 tokens (a third share a 64-token prefix), greedy, lengths 8 to 40."""
    from mixtral.sampling import SamplingParams

    gen = torch.Generator().manual_seed(22)
    prefix = torch.randint(1000, 32768, (64,), generator=gen).tolist()
    out = []
    for i in range(24):
        n = int(torch.randint(5, 301, (1,), generator=gen))
        prompt = torch.randint(1000, 32768, (n,), generator=gen).tolist()
        if i % 3 == 0:
            prompt = prefix + prompt[:40]
        out.append((prompt, SamplingParams(temperature=0.0, max_tokens=8 + i * 32 // 24, ignore_eos=True)))
    return out


def _generate(engine: Any) -> dict[str, list[int]]:
    for i, (prompt, params) in enumerate(_requests()):
        engine.add_request(f"r{i}", prompt, params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
    return done


def _free(*objs: Any) -> None:
    """Stop engines (and their tensor-parallel groups) and give their memory back."""
    for obj in objs:
        for target in (obj, getattr(obj, "model_runner", None)):
            shutdown = getattr(target, "shutdown", None)
            if shutdown is not None:
                shutdown()
    del objs
    gc.collect()
    torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def one_gpu_fp32(checkpoint: Path) -> dict[str, Any]:
    """One GPU's greedy tokens and logits (fp32), computed once."""
    from mixtral.checkpoint.loader import load_model
    from mixtral.engine.llm_engine import LLMEngine

    engine = LLMEngine.from_config(str(checkpoint), device="cuda", dtype="fp32", **ENGINE)
    tokens = _generate(engine)
    _free(engine)
    model = load_model(str(checkpoint), device="cuda", dtype="fp32")
    ids = torch.randint(1000, 32768, (2, 200), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.inference_mode():
        logits = model(ids).float().cpu()
    _free(model)
    return {"tokens": tokens, "ids": ids.cpu(), "logits": logits}


@pytest.fixture(params=list(LAYOUTS))
def layout(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    yield LAYOUTS[request.param]
    gc.collect()
    torch.cuda.empty_cache()


@pytest.mark.gpus(2)
def test_fp32_logits_and_greedy_tokens_equal_one_gpu(checkpoint: Path, one_gpu_fp32: dict[str, Any],
                                                     layout: dict[str, Any]) -> None:
    from mixtral.engine.llm_engine import LLMEngine

    engine = LLMEngine.from_config(str(checkpoint), device="cuda", dtype="fp32", **ENGINE, **layout)
    try:
        runner = engine.model_runner
        assert runner.local.graphs is not None, "decode steps must replay CUDA graphs (with the all-reduces inside)"
        got = _generate(engine)
        assert got == one_gpu_fp32["tokens"]
        logits = runner.executor.forward(one_gpu_fp32["ids"].cuda()).float().cpu()
        want = one_gpu_fp32["logits"]
        rel = ((logits - want).norm() / want.norm()).item()
        assert rel < 1e-4, rel
    finally:
        _free(engine)


@pytest.mark.gpus(2)
def test_bf16_distributions_close_to_one_gpu(checkpoint: Path, layout: dict[str, Any]) -> None:
    from mixtral.checkpoint.loader import load_model
    from mixtral.engine.llm_engine import LLMEngine

    ids = torch.randint(1000, 32768, (4, 128), generator=torch.Generator().manual_seed(2))
    model = load_model(str(checkpoint), device="cuda", dtype="bf16")
    with torch.inference_mode():
        want = model(ids.cuda()).float().log_softmax(-1).cpu()  # [B, T, V]
    _free(model)
    engine = LLMEngine.from_config(str(checkpoint), device="cuda", dtype="bf16", **ENGINE, **layout)
    try:
        got = engine.model_runner.executor.forward(ids.cuda()).float().log_softmax(-1).cpu()
    finally:
        _free(engine)
    kl = (want.exp() * (want - got)).sum(-1)  # [B, T]
    agree = (want.argmax(-1) == got.argmax(-1)).float().mean().item()
    assert kl.mean().item() < 1e-2 and agree >= 0.95, (kl.mean().item(), agree)


@pytest.mark.gpus(4)
def test_tp2_x_ep2_on_four_gpus(checkpoint: Path, one_gpu_fp32: dict[str, Any]) -> None:
    """Attention over 4 ranks (each of the 2 KV heads on 2 of them), experts in 2 groups split on F over 2."""
    from mixtral.engine.llm_engine import LLMEngine

    engine = LLMEngine.from_config(str(checkpoint), device="cuda", dtype="fp32", **ENGINE, tensor_parallel_size=4,
                                   expert_parallel_size=2)
    try:
        assert _generate(engine) == one_gpu_fp32["tokens"]
    finally:
        _free(engine)


@pytest.mark.gpus(2)
def test_all_reduce_time_per_step_is_measured(checkpoint: Path) -> None:
    """What `mixtral bench gpu --tensor-parallel-size 2` reports beside the decode figures."""
    from mixtral.bench.parallel import gpu_report
    from mixtral.engine.llm_engine import LLMEngine

    engine = LLMEngine.from_config(str(checkpoint), device="cuda", dtype="bf16", **ENGINE, tensor_parallel_size=2)
    try:
        report = gpu_report(engine, [1, 64], context=128, prefill_len=2048, bandwidth=3e12,
                            decode_tok_s={1: 1000.0, 64: 20000.0})
    finally:
        _free(engine)
    rows = {r["batch"]: r for r in report["decode"]}
    assert 0 < rows[1]["all_reduce_ms_per_step"] < 5, report  # 8 NCCL all-reduces of [1, 1024] bf16
    assert report["all_reduce_us"][2048] > report["all_reduce_us"][1]
