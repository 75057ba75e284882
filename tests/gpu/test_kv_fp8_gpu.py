"""The FP8 KV cache (``kv_cache_dtype="fp8"``) on a GPU: the Triton kernels store and read e4m3 codes inside the
engine's fast path (CUDA graphs, async scheduling, the prefill graphs).

- fp32 models (IEEE dots): greedy tokens with CUDA graphs equal eager ones, on the tiny model and a 4-layer one
  with Mixtral's head_dim 128 and 4 query heads per KV head; per-layer scales other than 1.0 reach the captured
  graphs (graphs equal eager with them, and they change the result);
- the fast path holds to the reference backend with an FP8 cache: teacher-forced, its logprobs sit far closer
  to the reference's FP8 logprobs than FP8 itself moves them from the fp32 cache's;
- the bundled demo model in bf16: the FP8 cache against the bf16 cache, held-out perplexity and greedy
  agreement within bounds (mixtral.bench.kv_quality's figures); a long prompt whose first chunk takes the dense
  prefill graph (which attends over the fresh, unrounded K/V) stays close to the eager path's;
- the same memory budget gives twice the KV blocks.
"""

from __future__ import annotations

import copy
import gc
from typing import Any

import pytest
import torch

from mixtral.engine.llm_engine import LLMEngine
from mixtral.kernels.config import KernelConfig
from mixtral.model.args import ModelArgs
from mixtral.model.mixtral import Transformer, init_random_weights
from mixtral.model.presets import preset
from mixtral.sampling import SamplingParams

pytestmark = pytest.mark.gpu

NUM_REQUESTS, MAX_TOKENS = 24, 32
MID = ModelArgs(dim=1024, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=128, hidden_dim=2048, vocab_size=32768,
                max_seq_len=4096, tokenizer="v3")


def _model(args: ModelArgs, std: float) -> Transformer:
    model = Transformer(args)
    init_random_weights(model, seed=0, std=std)
    return model.eval()


MODELS = {"tiny": lambda: _model(preset("tiny"), 0.1), "mid": lambda: _model(MID, 0.05)}


def _prompts(vocab: int, count: int = NUM_REQUESTS, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(3, 300, (count,), generator=gen).tolist()
    return [torch.randint(1000, vocab, (n,), generator=gen).tolist() for n in lens]


def _engine(model: Transformer, dtype: str = "fp32", **kwargs: Any) -> LLMEngine:
    kwargs.setdefault("max_model_len", 1024)
    kwargs.setdefault("num_kv_blocks", 2048)
    return LLMEngine.from_config(copy.deepcopy(model), device="cuda", dtype=dtype, max_num_seqs=32, seed=0,
                                 **kwargs)


def _generate(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams
              ) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy tokens and each token's logprob (when asked for) of every prompt, run together."""
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    done: dict[str, Any] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0]
    engine.shutdown()
    tokens = [done[str(i)].token_ids for i in range(len(prompts))]
    logprobs = [[lp[t] for lp, t in zip(done[str(i)].logprobs or [], done[str(i)].token_ids, strict=False)]
                for i in range(len(prompts))]
    return tokens, logprobs


def _scored(engine: LLMEngine, seqs: list[list[int]]) -> list[list[float]]:
    """Teacher-forced: the logprob of every token after the first of each sequence (prompt logprobs)."""
    for i, s in enumerate(seqs):
        engine.add_request(str(i), s, SamplingParams(max_tokens=1, prompt_logprobs=0))
    done: dict[str, Any] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    engine.shutdown()
    return [[done[str(i)].prompt_logprobs[j][s[j]] for j in range(1, len(s))] for i, s in enumerate(seqs)]


def _mean_abs(a: list[list[float]], b: list[list[float]]) -> float:
    flat = [abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)]
    return sum(flat) / len(flat)


GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0)


@pytest.mark.parametrize("name", ["tiny", "mid"])
def test_graphs_equal_eager_with_an_fp8_cache(cuda: torch.device, name: str) -> None:
    model = MODELS[name]()
    prompts = _prompts(model.args.vocab_size)
    fast = _engine(model, kv_cache_dtype="fp8")
    assert fast.model_runner.graphs is not None and fast.model_runner.kv_caches[0][0].dtype == torch.float8_e4m3fn
    graphs, _ = _generate(fast, prompts, GREEDY)
    eager, _ = _generate(_engine(model, kv_cache_dtype="fp8", enforce_eager=True, async_scheduling=False),
                         prompts, GREEDY)
    assert graphs == eager


def test_scales_reach_the_captured_graphs(cuda: torch.device) -> None:
    model = MODELS["tiny"]()
    prompts = _prompts(model.args.vocab_size, 8)
    scales = [(0.02, 0.02)] * model.args.n_layers  # the tiny model's |K|, |V| stay below 448 * 0.02
    graphs, lp_graphs = _generate(_engine(model, kv_cache_dtype="fp8", kv_cache_scales=scales), prompts, GREEDY)
    eager, lp_eager = _generate(_engine(model, kv_cache_dtype="fp8", kv_cache_scales=scales, enforce_eager=True),
                                prompts, GREEDY)
    assert graphs == eager
    assert _mean_abs(lp_graphs, lp_eager) < 1e-4
    # The same tokens scored with scales 1.0: different codes, so (slightly) different logprobs.
    ones = _scored(_engine(model, kv_cache_dtype="fp8"), [p + t for p, t in zip(prompts, graphs, strict=True)])
    scaled = _scored(_engine(model, kv_cache_dtype="fp8", kv_cache_scales=scales),
                     [p + t for p, t in zip(prompts, graphs, strict=True)])
    assert _mean_abs(ones, scaled) > 1e-5


def test_fast_path_holds_to_the_reference_backend(cuda: torch.device) -> None:
    """Teacher-forced on the fast path's own greedy output: |fast - reference| (both FP8) must be a small part of
    |FP8 - fp32 cache| (both reference), the effect FP8 itself has."""
    model = MODELS["tiny"]()
    prompts = _prompts(model.args.vocab_size, 12)
    tokens, _ = _generate(_engine(model, kv_cache_dtype="fp8"), prompts, GREEDY)
    seqs = [p + t for p, t in zip(prompts, tokens, strict=True)]
    ref = KernelConfig(backend="reference")
    fast_fp8 = _scored(_engine(model, kv_cache_dtype="fp8"), seqs)
    ref_fp8 = _scored(_engine(model, kv_cache_dtype="fp8", kernels=ref, enforce_eager=True), seqs)
    ref_fp32 = _scored(_engine(model, kernels=ref, enforce_eager=True), seqs)
    kernel_gap, fp8_effect = _mean_abs(fast_fp8, ref_fp8), _mean_abs(ref_fp8, ref_fp32)
    print(f"\nmean |logprob difference|: fast vs reference (FP8) {kernel_gap:.2e}, FP8 vs fp32 cache {fp8_effect:.2e}")
    assert fp8_effect > 1e-4  # the cache does round
    assert kernel_gap < 0.1 * fp8_effect


@pytest.fixture(scope="module")
def demo_bf16(cuda: torch.device) -> Transformer:
    from mixtral.checkpoint.loader import load_model

    return load_model("demo", cuda, torch.bfloat16, progress=False).eval()


def test_demo_model_fp8_against_bf16_cache(demo_bf16: Transformer) -> None:
    """mixtral.bench.kv_quality's figures on the GPU (docs/QUANTIZATION.md has the CPU run): the chats'
    perplexity within 1%, greedy outputs identical on most chat prompts and parting only at close calls."""
    from mixtral.bench.kv_quality import agreement, engine_figures, held_out

    docs, prompts = held_out(64)
    base = engine_figures(demo_bf16, docs, prompts, 32, device="cuda", dtype="bf16")
    fp8 = engine_figures(demo_bf16, docs, prompts, 32, device="cuda", dtype="bf16", kv_cache_dtype="fp8")
    change = fp8["perplexity"]["chats"] / base["perplexity"]["chats"] - 1
    chats = agreement(base, fp8, "chats")
    print(f"\ndemo bf16 on the GPU, FP8 vs bf16 KV: chats perplexity {change:+.2%}, prose "
          f"{fp8['perplexity']['prose'] / base['perplexity']['prose'] - 1:+.2%}; chat prompts identical "
          f"{chats['identical']:.0%}, median lead where parted {chats['median_lead_where_parted']:.2f} nats")
    assert abs(change) < 0.01
    assert chats["identical"] >= 0.6
    assert chats["median_lead_where_parted"] < 1.0


def test_dense_prefill_graph_close_to_eager_with_fp8(demo_bf16: Transformer) -> None:
    """A 1500-token prompt with 1024-token chunks: its first chunk replays the dense prefill graph (attending
    over the fresh K/V, unrounded), the second reads the FP8 cache; eagerly both read the cache. The prompt's
    logprobs stay within the FP8 cache's own effect."""
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(1000, 32768, (1500,), generator=gen).tolist()
    kw = dict(max_model_len=2048, num_kv_blocks=256, max_num_batched_tokens=1024, kv_cache_dtype="fp8")
    fast = _engine(demo_bf16, "bf16", **kw)
    assert fast.model_runner.fresh_prefill_graph is not None
    graphs = _scored(fast, [prompt])
    eager = _scored(_engine(demo_bf16, "bf16", enforce_eager=True, **kw), [prompt])
    bf16 = _scored(_engine(demo_bf16, "bf16", enforce_eager=True, max_model_len=2048, num_kv_blocks=256,
                           max_num_batched_tokens=1024), [prompt])
    gap, effect = _mean_abs(graphs, eager), _mean_abs(eager, bf16)
    print(f"\nmean |logprob difference|: dense-graph vs eager (FP8) {gap:.3e}, FP8 vs bf16 cache {effect:.3e}")
    assert gap <= 1.5 * effect + 1e-3


def test_the_same_budget_holds_twice_the_blocks(cuda: torch.device) -> None:
    model = MODELS["mid"]()
    blocks = {}
    for dt in ("auto", "fp8"):
        engine = LLMEngine.from_config(copy.deepcopy(model), device="cuda", dtype="bf16", max_model_len=4096,
                                       gpu_memory_utilization=0.5, kv_cache_dtype=dt, enforce_eager=True)
        blocks[dt] = engine.block_manager.num_blocks
        engine.shutdown()
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    assert abs(blocks["fp8"] / blocks["auto"] - 2) < 0.02, blocks
