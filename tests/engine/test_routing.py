"""Per-token routing from the engine equals the model's own routing of the same tokens.

The reference is ``analysis.routing_capture.capture_routing``: one dense forward of prompt + generated tokens with
``router_logits=[]`` and ``reference.route_topk``. Prompt row j must be the reference's row j; generated row i the
row of the position before token i (the pass whose logits sampled it). Checked for a mixed batch (with requests that
asked for nothing beside them), n > 1, preemption by recompute (also between a prompt's chunks), chunked prefill, the
prefix cache and cumulative outputs while streaming; each test runs with synchronous and async scheduling
(conftest's ``make_engine``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from engine_testing import random_prompts, run_to_completion

from mixtral.analysis.routing_capture import capture_routing
from mixtral.engine.llm_engine import LLMEngine
from mixtral.engine.outputs import RequestOutput
from mixtral.model.mixtral import Transformer
from mixtral.sampling import SamplingParams

WEIGHT_ATOL = 1e-4  # paged vs dense attention in fp32: router probabilities differ by ~1e-6


def routed(**kwargs: Any) -> SamplingParams:
    return SamplingParams(return_routing=True, **kwargs)


def check_routing(model: Transformer, out: RequestOutput, *, prompt: bool) -> None:
    """Every sample's routing (and the prompt's, when asked) equals the reference's rows for its tokens."""
    args = model.args
    p = len(out.prompt_token_ids)
    for sample in out.outputs:
        tokens = sample.token_ids
        assert tokens, "every request here generates"
        experts, weights, _ = capture_routing(model, list(out.prompt_token_ids) + tokens[:-1])  # [P + T - 1, L, k]
        assert sample.routing_experts.shape == (len(tokens), args.n_layers, args.num_experts_per_tok)
        assert sample.routing_weights.shape == sample.routing_experts.shape
        np.testing.assert_array_equal(sample.routing_experts, experts[p - 1:], err_msg=f"sample {sample.index}")
        np.testing.assert_allclose(sample.routing_weights, weights[p - 1:], atol=WEIGHT_ATOL)
        if prompt:
            np.testing.assert_array_equal(out.prompt_routing_experts, experts[:p])
            np.testing.assert_allclose(out.prompt_routing_weights, weights[:p], atol=WEIGHT_ATOL)
    if not prompt:
        assert out.prompt_routing_experts is None and out.prompt_routing_weights is None


def spy_launches(engine: LLMEngine) -> list[tuple[Any, bool, list[bool]]]:
    """(plan, launched ahead, whether each scheduled chunk samples) of every launch."""
    seen: list[tuple[Any, bool, list[bool]]] = []
    original = engine.model_runner.launch

    def spy(plan: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append((plan, kwargs.get("input_ids") is not None, [s.samples for s in plan.scheduled]))
        return original(plan, *args, **kwargs)

    engine.model_runner.launch = spy  # type: ignore[method-assign]
    return seen


def test_mixed_batch_routing_equals_the_reference(make_engine: Callable[..., LLMEngine], tiny_model: Transformer,
                                                  request: pytest.FixtureRequest) -> None:
    prompts = random_prompts(6, 5, 40, seed=31)
    params = [
        routed(temperature=0.0, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True),  # asks for nothing
        routed(temperature=0.9, seed=4, max_tokens=9, return_prompt_routing=True, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=3, return_prompt_routing=True),  # prompt only
        routed(temperature=0.0, max_tokens=10, stop_token_ids=[prompts[0][0]], logprobs=2),
        SamplingParams(temperature=0.7, seed=9, max_tokens=11, ignore_eos=True),
    ]
    engine = make_engine()
    launches = spy_launches(engine)
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(f"r{i}", prompt, p)
    done = run_to_completion(engine)
    for i, p in enumerate(params):
        out = done[f"r{i}"]
        if p.return_routing:
            check_routing(tiny_model, out, prompt=p.return_prompt_routing)
        else:
            assert out.outputs[0].routing_experts is None and out.outputs[0].routing_weights is None
        if p.return_prompt_routing and not p.return_routing:
            experts, _, _ = capture_routing(tiny_model, prompts[i])
            np.testing.assert_array_equal(out.prompt_routing_experts, experts)
        elif not p.return_prompt_routing:
            assert out.prompt_routing_experts is None
    # The same requests without routing give the same tokens: capture changes nothing else.
    plain = make_engine()
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        plain.add_request(f"r{i}", prompt, SamplingParams(**{**p.to_dict(), "return_routing": False,
                                                              "return_prompt_routing": False}))
    plain_done = run_to_completion(plain)
    assert {r: o.outputs[0].token_ids for r, o in plain_done.items()} == \
        {r: o.outputs[0].token_ids for r, o in done.items()}
    if request.node.callspec.params["make_engine"]:  # async: steps launched ahead captured routing too
        assert any(ahead and plan.routing is not None for plan, ahead, _ in launches)


def test_batched_equals_alone(make_engine: Callable[..., LLMEngine]) -> None:
    prompts = random_prompts(5, 4, 30, seed=32)
    alone = []
    for prompt in prompts[:2]:
        engine = make_engine()
        engine.add_request("a", prompt, routed(temperature=0.0, max_tokens=8, return_prompt_routing=True))
        alone.append(run_to_completion(engine)["a"])
    batched = make_engine()
    for i, prompt in enumerate(prompts):
        batched.add_request(f"b{i}", prompt, routed(temperature=0.0, max_tokens=8, return_prompt_routing=True))
    together = run_to_completion(batched)
    for i, want in enumerate(alone):
        got = together[f"b{i}"]
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        np.testing.assert_array_equal(got.outputs[0].routing_experts, want.outputs[0].routing_experts)
        np.testing.assert_allclose(got.outputs[0].routing_weights, want.outputs[0].routing_weights, atol=WEIGHT_ATOL)
        np.testing.assert_array_equal(got.prompt_routing_experts, want.prompt_routing_experts)


def test_n_samples_each_get_their_own_rows(make_engine: Callable[..., LLMEngine], tiny_model: Transformer) -> None:
    prompt = random_prompts(1, 20, 20, seed=33)[0]
    engine = make_engine()
    engine.add_request("n", prompt, routed(n=3, temperature=1.0, seed=11, max_tokens=7, ignore_eos=True,
                                           return_prompt_routing=True))
    out = run_to_completion(engine)["n"]
    assert len(out.outputs) == 3 and len({tuple(o.token_ids) for o in out.outputs}) > 1
    check_routing(tiny_model, out, prompt=True)
    # Every sample's first token came from the prompt's last position.
    firsts = [o.routing_experts[0] for o in out.outputs]
    assert all((f == out.prompt_routing_experts[-1]).all() for f in firsts)


def test_preemption_keeps_rows_aligned(make_engine: Callable[..., LLMEngine], tiny_model: Transformer) -> None:
    prompts = random_prompts(8, 3, 40, seed=34)
    # 24 blocks of 4 tokens: the requests together need far more, so some are preempted and recomputed.
    engine = make_engine(num_kv_blocks=24, block_size=4)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, routed(temperature=0.0, max_tokens=4 + (5 * i) % 17, ignore_eos=True,
                                                   return_prompt_routing=i % 2 == 0))
    done = run_to_completion(engine, lambda e: e.block_manager.check_invariants())
    assert engine.get_stats().num_preemptions > 0, "the tiny KV budget should have forced preemption"
    for i in range(len(prompts)):
        check_routing(tiny_model, done[f"r{i}"], prompt=i % 2 == 0)


def test_preemption_in_the_middle_of_a_chunked_prompt(make_engine: Callable[..., LLMEngine],
                                                      tiny_model: Transformer) -> None:
    """A prompt preempted after some of its chunks: the recompute records only the positions it lacks."""
    prompts = random_prompts(8, 20, 40, seed=34)
    engine = make_engine(num_kv_blocks=24, block_size=4, max_num_batched_tokens=8)
    partial = []
    preempt = engine.scheduler._preempt

    def spy(seq: Any) -> None:
        if seq.prompt_routing is not None and 0 < seq.prompt_routing.num_rows < seq.num_prompt_tokens:
            partial.append(seq.request_id)
        preempt(seq)

    engine.scheduler._preempt = spy  # type: ignore[method-assign]
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, routed(temperature=0.0, max_tokens=4 + (5 * i) % 17, ignore_eos=True,
                                                   return_prompt_routing=True))
    done = run_to_completion(engine, lambda e: e.block_manager.check_invariants())
    assert partial, "no prompt was preempted between its chunks"
    for i in range(len(prompts)):
        check_routing(tiny_model, done[f"r{i}"], prompt=True)


def test_chunked_prefill_captures_each_prompt_position_once(make_engine: Callable[..., LLMEngine],
                                                            tiny_model: Transformer) -> None:
    prompts = random_prompts(3, 50, 90, seed=35)
    engine = make_engine(max_num_batched_tokens=16, block_size=8)
    launches = spy_launches(engine)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, routed(temperature=0.0, max_tokens=5, return_prompt_routing=i != 1,
                                                   ignore_eos=True))
    done = run_to_completion(engine)
    for i in range(len(prompts)):
        check_routing(tiny_model, done[f"r{i}"], prompt=i != 1)
    # A prompt chunk that samples nothing keeps rows only for prompt routing: request 1's middle chunks none.
    r1 = [plan.routing[j] for plan, _, samples in launches for j, s in enumerate(plan.scheduled)
          if plan.routing is not None and s.seq.request_id == "r1" and not samples[j]]
    assert r1 and all(first is None for first in r1)


def test_prompt_routing_computes_a_cached_prompt(make_engine: Callable[..., LLMEngine],
                                                 tiny_model: Transformer) -> None:
    prompt = random_prompts(1, 48, 48, seed=36)[0]
    engine = make_engine(block_size=8)
    engine.add_request("warm", prompt, SamplingParams(temperature=0.0, max_tokens=2))
    run_to_completion(engine)
    engine.add_request("generated", prompt, routed(temperature=0.0, max_tokens=6, ignore_eos=True))
    generated = run_to_completion(engine)["generated"]
    assert generated.num_cached_tokens == 40  # generated-only routing keeps the cache: the last token is computed
    check_routing(tiny_model, generated, prompt=False)
    engine.add_request("prompt", prompt, routed(temperature=0.0, max_tokens=6, return_prompt_routing=True,
                                                ignore_eos=True))
    with_prompt = run_to_completion(engine)["prompt"]
    assert with_prompt.num_cached_tokens == 0  # every position computed, so every position has routing
    check_routing(tiny_model, with_prompt, prompt=True)


def test_streamed_outputs_grow_row_for_row(make_engine: Callable[..., LLMEngine]) -> None:
    prompts = random_prompts(3, 10, 30, seed=37)
    engine = make_engine()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"s{i}", prompt, routed(n=2 if i == 1 else 1, temperature=0.8, seed=i, max_tokens=9,
                                                   ignore_eos=True, return_prompt_routing=i == 2))
    first_seen: dict[tuple[str, int], tuple[np.ndarray, list[int]]] = {}
    final: dict[str, RequestOutput] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            for o in out.outputs:
                assert o.routing_experts.shape[0] == len(o.token_ids)  # a row for every token, as it arrives
                assert o.routing_weights.shape[0] == len(o.token_ids)
                if o.token_ids:
                    first_seen.setdefault((out.request_id, o.index), (o.routing_experts, list(o.token_ids)))
            if out.request_id == "s2" and out.outputs[0].token_ids:
                assert out.prompt_routing_experts.shape[0] == len(prompts[2])
            if out.finished:
                final[out.request_id] = out
    # Rows handed out earlier never change (outputs share the buffers, not copies of them).
    for (rid, index), (early, tokens) in first_seen.items():
        late = final[rid].outputs[index]
        assert late.token_ids[:len(tokens)] == tokens
        np.testing.assert_array_equal(early, late.routing_experts[:len(early)])
        assert not early.flags.writeable


def test_an_aborted_request_keeps_a_row_per_token(make_engine: Callable[..., LLMEngine]) -> None:
    engine = make_engine()
    prompt = random_prompts(1, 12, 12, seed=38)[0]
    engine.add_request("a", prompt, routed(temperature=0.0, max_tokens=50, ignore_eos=True))
    for _ in range(4):
        engine.step()
    (out,) = engine.abort_request("a")
    sample = out.outputs[0]
    assert sample.finish_reason == "abort" and sample.token_ids
    assert sample.routing_experts.shape[0] == len(sample.token_ids)
