"""Per-token routing over a tensor-parallel group equals routing in one process.

Every rank routes the same summed hidden states alike, so rank 0 captures for the group. A step holding a routing
request reaches the workers as ``STEP_EAGER`` (every rank runs it without CUDA graphs, so the all-reduces pair up).
Run over TP 2 on gloo (CPU), with chunked prefill and with async scheduling (steps launched ahead).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tp_testing import run_requests

from mixtral.checkpoint.loader import load_model
from mixtral.distributed.engine import engine_over
from mixtral.distributed.executor import DistributedExecutor
from mixtral.distributed.protocol import Command, StepMessage
from mixtral.engine.config import EngineConfig
from mixtral.engine.llm_engine import LLMEngine
from mixtral.sampling import SamplingParams
from mixtral.tokenizer import Tokenizer


def routed_requests() -> list[tuple[list[int], SamplingParams]]:
    gen = torch.Generator().manual_seed(51)
    out = []
    for i in range(5):
        prompt = torch.randint(10, 32768, (int(torch.randint(5, 60, (1,), generator=gen)),), generator=gen).tolist()
        out.append((prompt, SamplingParams(temperature=0.0 if i % 2 else 0.9, seed=i, max_tokens=4 + 2 * i,
                                           ignore_eos=True, n=2 if i == 3 else 1, return_routing=i != 2,
                                           return_prompt_routing=i in (0, 3))))
    return out


@pytest.mark.parametrize("executor", ["tp2"], indirect=True)
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_routing_over_tp_equals_one_process(executor: DistributedExecutor, tiny_hf_checkpoint: Path,
                                            async_scheduling: bool) -> None:
    config = dict(max_model_len=160, max_num_seqs=8, max_num_batched_tokens=32, num_kv_blocks=256, block_size=16,
                  async_scheduling=async_scheduling)
    single = LLMEngine(load_model(str(tiny_hf_checkpoint)), EngineConfig(**config), Tokenizer.from_version("v3"))
    want = run_requests(single, routed_requests())
    got = run_requests(engine_over(executor, LLMEngine, **config), routed_requests())
    for rid, w in want.items():
        g = got[rid]
        if w.prompt_routing_experts is not None:
            np.testing.assert_array_equal(g.prompt_routing_experts, w.prompt_routing_experts)
            np.testing.assert_allclose(g.prompt_routing_weights, w.prompt_routing_weights, atol=1e-4)
        else:
            assert g.prompt_routing_experts is None
        for gs, ws in zip(g.outputs, w.outputs, strict=True):
            assert gs.token_ids == ws.token_ids
            if ws.routing_experts is None:
                assert gs.routing_experts is None
                continue
            assert gs.routing_experts.shape[0] == len(gs.token_ids)
            np.testing.assert_array_equal(gs.routing_experts, ws.routing_experts)
            np.testing.assert_allclose(gs.routing_weights, ws.routing_weights, atol=1e-4)


def test_an_eager_step_goes_out_as_step_eager() -> None:
    plain = StepMessage(seqs=[(7, 0, 9, 1, 1)], token_ids=[torch.tensor([5])], blocks=[42])
    eager = StepMessage(seqs=[(7, 0, 9, 1, 1)], token_ids=[torch.tensor([5])], blocks=[42], eager=True)
    assert plain.encode()[0] == Command.STEP and eager.encode()[0] == Command.STEP_EAGER
    assert torch.equal(plain.encode()[1:], eager.encode()[1:])  # the same layout
    assert StepMessage.decode(eager.encode()).eager and not StepMessage.decode(plain.encode()).eager
