"""The whole engine on a GPU: the fast path (Triton kernels, CUDA graphs, async scheduling) against the
PyTorch reference path, over mixed batches.

24 requests of 3-300 prompt tokens, 32 new tokens each, run together (max_num_seqs 32), so steps mix prompt
chunks with decode rows and batch sizes move up and down the graph ladder. Two random-weight models: ``tiny``
and a 4-layer one with Mixtral's head_dim 128, 4 query heads per KV head and 8 experts top-2.

- fp32 (IEEE dots): greedy tokens of the fast path equal the reference backend's (eager, synchronous steps)
  on every request; also with PDL off; graphs equal eager; async scheduling equals synchronous, greedy and
  for seeded sampling with stop tokens; the expert-utilisation counts equal the reference's.
- bf16: kernels round differently, so greedy paths part at near-ties; instead, each generated token's logprob
  as the fast path reports it is held to the fp32 reference (teacher-forced on the same tokens), and must be
  no further from it than the bf16 reference path's own logprob.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
from collections.abc import Callable
from typing import Any

import pytest
import torch

from mixtral.engine.llm_engine import LLMEngine
from mixtral.model.mixtral import Transformer
from mixtral.sampling import SamplingParams

pytestmark = pytest.mark.gpu

NUM_REQUESTS, MAX_TOKENS = 24, 32


@dataclasses.dataclass
class Run:
    tokens: list[list[int]]  # per request, the generated ids
    logprobs: list[list[float]]  # per request, each generated token's logprob (when asked for)
    graph_sizes: list[int]  # decode batch sizes the engine captured graphs for
    expert_counts: torch.Tensor  # [L, E] tokens routed to each expert


def prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    lens = torch.randint(3, 300, (NUM_REQUESTS,), generator=gen).tolist()
    return [torch.randint(1000, vocab, (n,), generator=gen).tolist() for n in lens]


class Runs:
    """One model's engine runs, each made on first use and kept for the module's tests."""

    def __init__(self, base: Transformer, kernel_choice: Callable[..., Any]) -> None:
        self.base = base
        self.kernel_choice = kernel_choice
        self.prompts = prompts(base.args.vocab_size)
        self._done: dict[str, Run] = {}
        self.variants: dict[str, dict[str, Any]] = {
            "reference": dict(backend="reference", eager=True, async_scheduling=False),
            "fast": {},
            "eager": dict(eager=True),
            "sync": dict(async_scheduling=False),
            "pdl_off": dict(pdl=False),
            "sampled_async": dict(sampled=True),
            "sampled_sync": dict(sampled=True, async_scheduling=False),
            "bf16_fast": dict(dtype="bf16", logprobs=True),
        }

    def __getitem__(self, name: str) -> Run:
        if name not in self._done:
            self._done[name] = self._run(**self.variants[name])
        return self._done[name]

    def _run(self, backend: str = "auto", dtype: str = "fp32", eager: bool = False, async_scheduling: bool = True,
             sampled: bool = False, pdl: bool = True, logprobs: bool = False) -> Run:
        model = copy.deepcopy(self.base)
        with self.kernel_choice(backend=backend, pdl=pdl) as kernels:
            engine = LLMEngine.from_config(model, device="cuda", dtype=dtype, max_model_len=1024, max_num_seqs=32,
                                           num_kv_blocks=2048, enforce_eager=eager, seed=0,
                                           async_scheduling=async_scheduling, kernels=kernels)
            assert engine.model_runner.model.kernels.config == kernels
            for i, p in enumerate(self.prompts):
                params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                                        logprobs=1 if logprobs else None)
                if sampled:  # seeded random rows, varied lengths and a stop token: rows finish at different steps
                    params = SamplingParams(temperature=0.8, top_p=0.95, seed=i, max_tokens=MAX_TOKENS - i % 7,
                                            stop_token_ids=[1000 + i], ignore_eos=True)
                engine.add_request(str(i), p, params)
            outs: dict[str, tuple[list[int], list[float]]] = {}
            while engine.has_unfinished_requests():
                for o in engine.step():
                    if o.finished:
                        c = o.outputs[0]
                        lps = [lp[t] for lp, t in zip(c.logprobs, c.token_ids, strict=True)] if c.logprobs else []
                        outs[o.request_id] = (list(c.token_ids), lps)
            graphs = engine.model_runner.graphs
            sizes = sorted(graphs.graphs) if graphs is not None else []
            counts = engine.expert_counts()
            engine.shutdown()
        del engine, graphs, model
        torch.cuda.empty_cache()
        ordered = [outs[str(i)] for i in range(len(self.prompts))]
        return Run([t for t, _ in ordered], [lp for _, lp in ordered], sizes, counts)


@pytest.fixture(scope="module", params=["tiny", "mid"])
def runs(request: pytest.FixtureRequest, cuda: torch.device, build_model, kernel_choice, tiny_args,
         mid_args) -> Runs:
    args, std = (tiny_args, 0.1) if request.param == "tiny" else (mid_args, 0.05)
    return Runs(build_model(args, std), kernel_choice)


def differing(a: Run, b: Run) -> list[int]:
    return [i for i, (x, y) in enumerate(zip(a.tokens, b.tokens, strict=True)) if x != y]


def test_fp32_fast_path_equals_reference(runs: Runs) -> None:
    fast, ref = runs["fast"], runs["reference"]
    assert all(len(t) == MAX_TOKENS for t in fast.tokens)
    assert not differing(fast, ref), f"requests whose tokens differ: {differing(fast, ref)}"


def test_fp32_pdl_off_equals_reference(runs: Runs) -> None:
    assert not differing(runs["pdl_off"], runs["reference"])


def test_fp32_cuda_graphs_equal_eager(runs: Runs) -> None:
    fast, eager = runs["fast"], runs["eager"]
    assert fast.graph_sizes and not eager.graph_sizes, (fast.graph_sizes, eager.graph_sizes)
    assert not differing(fast, eager)


def test_fp32_async_scheduling_equals_sync(runs: Runs) -> None:
    assert not differing(runs["fast"], runs["sync"])


def test_seeded_sampling_async_equals_sync(runs: Runs) -> None:
    a, s = runs["sampled_async"], runs["sampled_sync"]
    assert not differing(a, s)
    assert len({len(t) for t in s.tokens}) > 1, "stop tokens and lengths should end rows at different steps"


def test_expert_counts_equal_reference(runs: Runs) -> None:
    """Same tokens, same routing: the fused router's counts (graph padding rows masked) equal the reference's."""
    sync, ref = runs["sync"], runs["reference"]
    assert int(ref.expert_counts.sum()) > 0
    assert torch.equal(sync.expert_counts, ref.expert_counts)


@torch.inference_mode()
def teacher_forced(model: Transformer, prompts: list[list[int]], outputs: list[list[int]]) -> list[list[float]]:
    """Each generated token's logprob under ``model``, given the prompt and the tokens before it."""
    result = []
    for p, out in zip(prompts, outputs, strict=True):
        ids = torch.tensor([p + out], device=model.device)
        logprobs = torch.log_softmax(model(ids)[0].float(), dim=-1)  # [T, V]
        rows = torch.arange(len(p) - 1, len(p) + len(out) - 1, device=model.device)
        result.append(logprobs[rows, torch.tensor(out, device=model.device)].tolist())
    return result


def test_bf16_logprobs_no_worse_than_reference_path(runs: Runs, kernel_choice) -> None:
    fast = runs["bf16_fast"]
    assert fast.graph_sizes and all(len(lp) == MAX_TOKENS for lp in fast.logprobs)
    truth_model = copy.deepcopy(runs.base).to("cuda")
    with kernel_choice(truth_model, backend="reference"):
        truth = teacher_forced(truth_model, runs.prompts, fast.tokens)
        ref16 = teacher_forced(truth_model.to(torch.bfloat16), runs.prompts, fast.tokens)

    def mean_gap(a: list[list[float]]) -> float:
        return statistics.fmean(abs(x - y) for row_a, row_t in zip(a, truth, strict=True)
                                for x, y in zip(row_a, row_t, strict=True))

    fast_gap, ref_gap = mean_gap(fast.logprobs), mean_gap(ref16)
    assert fast_gap <= 1.5 * ref_gap + 0.01, f"fast path {fast_gap:.4f} nats from fp32, reference {ref_gap:.4f}"
