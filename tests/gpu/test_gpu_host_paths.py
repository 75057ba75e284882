"""The engine's host-side fast paths on a GPU: block-table updates scattered on the device, and steps launched
ahead that mix decoding sequences (fed by the previous step's sampled ids, never on the host) with admitted
prompts and prompt chunks (fed by the host).

- ``BlockTables`` on CUDA: after random growth, recomputation (a new epoch), release and row-table growth, every
  gathered row equals the sequence's own table.
- 40 requests behind 8 seats with a 48-token step budget (prompts of 3-120 tokens, so chunks and admissions
  happen all through the run), greedy fp32: async scheduling gives the synchronous engine's tokens for every
  request, and the steps it launches ahead carry prompt tokens.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from typing import Any

import pytest
import torch
from block_table_testing import random_table_batches

from mixtral.engine.block_tables import BlockTables
from mixtral.engine.llm_engine import LLMEngine
from mixtral.model.args import ModelArgs
from mixtral.model.mixtral import Transformer
from mixtral.sampling import SamplingParams

pytestmark = pytest.mark.gpu


def test_block_tables_on_cuda_follow_the_sequences(cuda: torch.device) -> None:
    rng = random.Random(3)
    tables = BlockTables(max_blocks_per_seq=64, device=cuda, initial_rows=2)
    for batch in random_table_batches(tables, rng, 300, seqs=4, max_blocks=64, block_ids=10_000, grow=2, reset=19):
        got = tables.gather(batch)  # [S, 64] int32 on the device
        assert got.device.type == "cuda" and got.dtype == torch.int32
        for row, s in zip(got.cpu().tolist(), batch, strict=True):
            assert row[: len(s.block_table)] == s.block_table


def _run(model: Transformer, async_scheduling: bool, prompts: list[list[int]]) -> tuple[dict[str, list[int]], int]:
    engine = LLMEngine.from_config(model, device="cuda", dtype="fp32", max_model_len=256, max_num_seqs=8,
                                   max_num_batched_tokens=48, num_kv_blocks=512, block_size=16, seed=0,
                                   async_scheduling=async_scheduling)
    prompt_steps_ahead = 0
    original = engine.model_runner.launch

    def launch(plan: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal prompt_steps_ahead
        if kwargs.get("input_rows") is not None and min(kwargs["input_rows"]) < 0:
            prompt_steps_ahead += 1
        return original(plan, *args, **kwargs)

    engine.model_runner.launch = launch  # type: ignore[method-assign]
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(temperature=0.0, max_tokens=6 + i % 11, ignore_eos=True))
    out: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                out[o.request_id] = list(o.outputs[0].token_ids)
    engine.block_manager.check_invariants()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    engine.shutdown()
    return out, prompt_steps_ahead


def test_admissions_launched_ahead_equal_synchronous_steps(cuda: torch.device, tiny_args: ModelArgs,
                                                           build_model: Callable[..., Transformer]) -> None:
    model = build_model(tiny_args, 0.1)
    gen = torch.Generator().manual_seed(5)
    lens = torch.randint(3, 120, (40,), generator=gen).tolist()
    prompts = [torch.randint(1000, tiny_args.vocab_size, (n,), generator=gen).tolist() for n in lens]
    want, _ = _run(copy.deepcopy(model), False, prompts)
    got, prompt_steps_ahead = _run(copy.deepcopy(model), True, prompts)
    assert got == want
    assert prompt_steps_ahead >= 10  # admissions and chunks went ahead of the tokens they follow
