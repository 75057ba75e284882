"""Per-token routing capture on a GPU: ``python -m pytest -m gpu -k routing``.

What the CPU suite cannot show (tests/engine/test_routing*.py hold the alignment rules on the CPU):
- with the Triton kernels, CUDA graphs and async scheduling on, the routing a request gets equals the model's own
  (a dense fp32 forward with IEEE dots, ``analysis.routing_capture``), prompt and generated, beside requests that
  asked for nothing; every request's tokens and the expert counts equal a run where nobody asked;
- the steps without a routing request replay the decode graphs, the steps with one run eagerly (graphs off only
  there), and how much slower such a step is (printed: the lead copies the figures into docs);
- over TP 2 (NCCL, graphs captured with the all-reduces inside, on 2 GPUs): routing equals one GPU's, and the
  eager steps (``STEP_EAGER``) interleave with graph steps on every rank without a hang.
"""

from __future__ import annotations

import copy
import gc
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mixtral.model.args import ModelArgs
from mixtral.model.mixtral import Transformer, init_random_weights

pytestmark = pytest.mark.gpu

MID = ModelArgs(dim=1024, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=128, hidden_dim=2048, vocab_size=32768,
                max_seq_len=4096, tokenizer="v3")
ENGINE = dict(max_model_len=512, max_num_seqs=16, max_num_batched_tokens=256, kv_cache_bytes=256 << 20, seed=0)


def _model() -> Transformer:
    model = Transformer(MID)
    init_random_weights(model, seed=0, std=0.05)
    return model.eval()


ROUTED_TOKENS, PLAIN_TOKENS = 8, 24


def _requests(routing: bool) -> list[tuple[list[int], Any]]:
    """12 greedy requests of 5-200 prompt tokens; with ``routing`` every third asks for routing (prompt too).
    Every third generates ``ROUTED_TOKENS`` and the rest ``PLAIN_TOKENS`` (with or without ``routing``: the same
    work), so once the routed ones finish, the last decode steps have no request that asked: those are the
    steps that must replay the graphs (while a routed request runs, every step it is in runs eagerly)."""
    from mixtral.sampling import SamplingParams

    gen = torch.Generator().manual_seed(61)
    out = []
    for i in range(12):
        prompt = torch.randint(1000, 32768, (int(torch.randint(5, 201, (1,), generator=gen)),), generator=gen)
        asks = routing and i % 3 == 0
        out.append((prompt.tolist(), SamplingParams(temperature=0.0, max_tokens=ROUTED_TOKENS if i % 3 == 0
                                                    else PLAIN_TOKENS, ignore_eos=True, return_routing=asks,
                                                    return_prompt_routing=asks and i % 2 == 0)))
    return out


def _run(engine: Any, requests: list[tuple[list[int], Any]]) -> dict[str, Any]:
    for i, (prompt, params) in enumerate(requests):
        engine.add_request(f"r{i}", prompt, params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


def _agreement(got: np.ndarray, want: np.ndarray) -> float:
    """Share of (token, layer) rows whose top-k ids agree (a dense forward and the paged kernels differ by ~1e-6
    in fp32: only an exact near-tie may swap)."""
    return float((got == want).all(-1).mean())


def _graph_spy(engine: Any) -> dict[str, int]:
    """Count decode-graph replays and eager forwards, by whether the step captured routing."""
    runner = engine.model_runner
    counts = {"graph_plain": 0, "graph_routing": 0, "launch_routing": 0}
    graphs = runner.graphs
    assert graphs is not None, "decode steps must replay CUDA graphs here"
    state = {"routing": False}
    original_run, original_launch = graphs.run, runner.launch

    def run(*args: Any, **kwargs: Any) -> Any:
        counts["graph_routing" if state["routing"] else "graph_plain"] += 1
        return original_run(*args, **kwargs)

    def launch(plan: Any, *args: Any, **kwargs: Any) -> Any:
        state["routing"] = plan.routing is not None
        counts["launch_routing"] += state["routing"]
        return original_launch(plan, *args, **kwargs)

    graphs.run = run
    runner.launch = launch
    return counts


def test_routing_on_a_gpu_equals_the_models_and_keeps_graphs_for_the_rest(cuda: torch.device) -> None:
    from mixtral.analysis.routing_capture import capture_routing
    from mixtral.engine.llm_engine import LLMEngine

    base = _model()
    plain_engine = LLMEngine.from_config(copy.deepcopy(base), device="cuda", dtype="fp32", **ENGINE)
    plain = _run(plain_engine, _requests(routing=False))
    plain_counts = plain_engine.expert_counts()
    del plain_engine
    gc.collect()

    engine = LLMEngine.from_config(copy.deepcopy(base), device="cuda", dtype="fp32", **ENGINE)
    spy = _graph_spy(engine)
    requests = _requests(routing=True)
    done = _run(engine, requests)
    assert spy["launch_routing"] > 0 and spy["graph_routing"] == 0, spy  # routing steps ran eagerly
    # The decode steps after the routed requests finished kept their graphs: PLAIN_TOKENS - ROUTED_TOKENS = 16 of
    # them, fewer by the steps the chunked prefills stagger the requests' starts (half is a generous floor).
    assert spy["graph_plain"] >= (PLAIN_TOKENS - ROUTED_TOKENS) // 2, spy
    assert {r: o.outputs[0].token_ids for r, o in done.items()} == {r: o.outputs[0].token_ids for r, o in plain.items()}
    assert torch.equal(engine.expert_counts(), plain_counts)
    model = engine.model
    for i, (prompt, params) in enumerate(requests):
        out = done[f"r{i}"]
        sample = out.outputs[0]
        if not params.return_routing:
            assert sample.routing_experts is None
            continue
        experts, weights, _ = capture_routing(model, prompt + sample.token_ids[:-1])  # [P + T - 1, L, k]
        p = len(prompt)
        assert sample.routing_experts.shape == (ROUTED_TOKENS, MID.n_layers, MID.num_experts_per_tok)
        assert _agreement(sample.routing_experts, experts[p - 1:]) >= 0.99
        same = (sample.routing_experts == experts[p - 1:]).all(-1)  # [T, L]
        np.testing.assert_allclose(sample.routing_weights[same], weights[p - 1:][same], atol=1e-4)
        if params.return_prompt_routing:
            assert _agreement(out.prompt_routing_experts, experts[:p]) >= 0.99


def test_the_cost_of_a_routing_step_is_measured(cuda: torch.device) -> None:
    """Decode step time of 8 sequences: nobody asks (graphs), one asks (eager), printed for docs."""
    from mixtral.engine.llm_engine import LLMEngine
    from mixtral.sampling import SamplingParams

    engine = LLMEngine.from_config(_model(), device="cuda", dtype="bf16", async_scheduling=True, **ENGINE)
    prompts = [list(range(1000 + 50 * i, 1064 + 50 * i)) for i in range(8)]

    def per_step(routing: bool) -> float:
        for i, prompt in enumerate(prompts):
            params = SamplingParams(temperature=0.0, max_tokens=96, ignore_eos=True, return_routing=routing and i == 0)
            engine.add_request(f"{routing}{i}", prompt, params)
        for _ in range(8):  # prefill and warm-up
            engine.step()
        torch.cuda.synchronize()
        t0, steps = time.perf_counter(), 0
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / steps

    off, on = per_step(False), per_step(True)
    print(f"\ndecode step, 8 sequences, mid model bf16: routing off {off * 1e3:.3f} ms (graphs), "
          f"one request with routing {on * 1e3:.3f} ms (eager + capture): x{on / off:.2f}")
    assert off > 0 and on > 0


@pytest.mark.gpus(2)  # deselected on a machine with one GPU (tests/gpu/conftest.py)
def test_tp2_routing_equals_one_gpu(tmp_path: Path) -> None:
    from mixtral.checkpoint.writer import save_checkpoint
    from mixtral.engine.llm_engine import LLMEngine

    os.environ["TRITON_F32_DEFAULT"] = "ieee"  # the workers inherit it
    checkpoint = save_checkpoint(_model(), MID, tmp_path, "hf")
    one = LLMEngine.from_config(str(checkpoint), device="cuda", dtype="fp32", **ENGINE)
    want = _run(one, _requests(routing=True))
    del one
    gc.collect()
    torch.cuda.empty_cache()
    engine = LLMEngine.from_config(str(checkpoint), device="cuda", dtype="fp32", tensor_parallel_size=2, **ENGINE)
    try:
        assert engine.model_runner.local.graphs is not None
        got = _run(engine, _requests(routing=True))  # plain and eager steps interleave: a mismatch would hang
    finally:
        engine.shutdown()
    for rid, w in want.items():
        g = got[rid]
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        if w.outputs[0].routing_experts is None:
            assert g.outputs[0].routing_experts is None
            continue
        assert _agreement(g.outputs[0].routing_experts, w.outputs[0].routing_experts) >= 0.99
        if w.prompt_routing_experts is not None:
            assert _agreement(g.prompt_routing_experts, w.prompt_routing_experts) >= 0.99
