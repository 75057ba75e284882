"""Routing capture costs nothing when no request asks, changes nothing else when one does, and fails alone.

- Steps without a routing request never build a capture (``StepPlan.routing`` is None, so CUDA graphs stay in
  use on a GPU: tests/gpu/test_gpu_routing.py holds that part).
- The engine's cumulative expert counts and every request's tokens are the same with capture on.
- The MoE layer hands the capture the very ids and weights its experts ran with.
- A step that lost a request's routing fails that request alone (never misaligned rows, never the engine).
- The params validate; ``RoutingRows`` hands out views that later appends leave alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from engine_testing import random_prompts, run_to_completion

from mixtral.engine import routing as routing_mod
from mixtral.engine import step_plan
from mixtral.engine.llm_engine import LLMEngine
from mixtral.engine.routing import RoutingRows
from mixtral.kernels.reference import route_topk
from mixtral.model.context import DenseContext
from mixtral.model.mixtral import Transformer
from mixtral.sampling import SamplingParams


def _requests(routing: bool) -> list[tuple[list[int], SamplingParams]]:
    prompts = random_prompts(5, 4, 35, seed=41)
    return [(p, SamplingParams(temperature=0.0 if i % 2 else 0.8, seed=i, max_tokens=6 + i, ignore_eos=True,
                               return_routing=routing and i != 3, return_prompt_routing=routing and i == 1))
            for i, p in enumerate(prompts)]


def test_steps_without_a_routing_request_capture_nothing(make_engine: Callable[..., LLMEngine],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a step without a routing request built a routing capture")

    monkeypatch.setattr(routing_mod.RoutingCapture, "for_step", classmethod(refuse))
    engine = make_engine()
    plans: list[Any] = []
    original = engine.model_runner.launch
    engine.model_runner.launch = lambda plan, *a, **k: (plans.append(plan), original(plan, *a, **k))[1]
    for i, (prompt, params) in enumerate(_requests(routing=False)):
        engine.add_request(f"r{i}", prompt, params)
    done = run_to_completion(engine)
    assert len(done) == 5 and plans
    assert all(plan.routing is None for plan in plans)  # so the runner keeps its graphs
    assert all(o.outputs[0].routing_experts is None for o in done.values())


def test_capture_changes_neither_tokens_nor_expert_counts(make_engine: Callable[..., LLMEngine],
                                                          tiny_model: Transformer) -> None:
    runs = []
    for routing in (False, True):
        engine = make_engine()
        for i, (prompt, params) in enumerate(_requests(routing)):
            engine.add_request(f"r{i}", prompt, params)
        done = run_to_completion(engine)
        runs.append(({rid: out.outputs[0].token_ids for rid, out in done.items()}, engine.expert_counts(), done))
    (plain_tokens, plain_counts, _), (routed_tokens, routed_counts, routed_done) = runs
    assert routed_tokens == plain_tokens
    assert torch.equal(routed_counts, plain_counts) and plain_counts.sum() > 0
    assert routed_done["r0"].outputs[0].routing_experts is not None


def test_the_moe_layer_hands_over_the_ids_its_experts_ran_with(tiny_model: Transformer) -> None:
    class Recorder:
        def __init__(self) -> None:
            self.seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def record(self, layer_idx: int, ids: torch.Tensor, weights: torch.Tensor) -> None:
            self.seen[layer_idx] = (ids, weights)

    tokens = torch.tensor(random_prompts(1, 17, 17, seed=42)[0])
    ctx = DenseContext(1, 17, tokens.device)
    ctx.routing_capture = Recorder()  # type: ignore[attr-defined]
    logits: list[torch.Tensor] = []
    with torch.inference_mode():
        tiny_model.forward_tokens(tokens, ctx, logits)
    assert sorted(ctx.routing_capture.seen) == list(range(tiny_model.args.n_layers))
    for layer, (ids, weights) in ctx.routing_capture.seen.items():
        want_w, want_ids = route_topk(logits[layer], tiny_model.args.num_experts_per_tok)
        assert torch.equal(ids, want_ids) and torch.equal(weights, want_w)


def test_a_lost_capture_fails_that_request_alone(make_engine: Callable[..., LLMEngine],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    real = step_plan.capture_start
    monkeypatch.setattr(step_plan, "capture_start",
                        lambda s: None if s.seq.request_id == "lost" else real(s))
    engine = make_engine()
    prompts = random_prompts(3, 5, 20, seed=43)
    engine.add_request("lost", prompts[0], SamplingParams(temperature=0.0, max_tokens=5, return_routing=True))
    engine.add_request("kept", prompts[1], SamplingParams(temperature=0.0, max_tokens=5, return_routing=True))
    engine.add_request("plain", prompts[2], SamplingParams(temperature=0.0, max_tokens=5))
    done = run_to_completion(engine)
    lost = done["lost"]
    assert lost.outputs[0].finish_reason == "error" and "routing" in lost.error.message
    assert not lost.error.invalid_request and lost.outputs[0].token_ids == []
    assert done["kept"].outputs[0].routing_experts.shape[0] == 5
    assert len(done["plain"].outputs[0].token_ids) == 5


@pytest.mark.parametrize("name", ["return_routing", "return_prompt_routing"])
def test_the_params_take_booleans_only(name: str) -> None:
    with pytest.raises(ValueError, match=f"SamplingParams.{name} must be True or False, got 1"):
        SamplingParams(**{name: 1})
    assert SamplingParams(return_prompt_routing=True).needs_full_prompt
    assert not SamplingParams(return_routing=True).needs_full_prompt


def test_routing_rows_hand_out_views_that_appends_leave_alone() -> None:
    rows = RoutingRows()
    empty_e, empty_w = rows.arrays()
    assert empty_e.shape == (0, 0, 0) and empty_w.dtype == np.float32
    rng = np.random.default_rng(0)
    chunks = [(rng.integers(0, 8, (m, 3, 2)), rng.random((m, 3, 2)).astype(np.float32)) for m in (5, 1, 1, 20, 3)]
    snapshots = []
    for experts, weights in chunks:
        rows.append(experts, weights)
        snapshots.append(rows.arrays())
    all_e = np.concatenate([e for e, _ in chunks])
    all_w = np.concatenate([w for _, w in chunks])
    for experts, weights in snapshots:  # grown twice since the first: earlier views still hold their rows
        n = experts.shape[0]
        np.testing.assert_array_equal(experts, all_e[:n])
        np.testing.assert_array_equal(weights, all_w[:n])
        assert experts.dtype == np.int16 and not experts.flags.writeable
    assert rows.num_rows == 30
