"""The step's token, position and KV-slot tensors: the per-sequence tensor build (steps with a long prompt)
equals the Python-list build (decode steps) on random ragged batches, chunks mid-prompt included, and chunks
that run past the prompt's cached tensor into generated tokens (a preempted sequence recomputing)."""

from __future__ import annotations

import random
from types import SimpleNamespace

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixtral.engine.model_runner import ModelRunner
from mixtral.engine.sequence import Sequence
from mixtral.sampling import SamplingParams


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), block_size=st.sampled_from([1, 4, 16]), num_seqs=st.integers(1, 5))
def test_vectorized_build_equals_the_lists(seed: int, block_size: int, num_seqs: int) -> None:
    rng = random.Random(seed)
    scheduled = []
    for _ in range(num_seqs):
        total = rng.randint(1, 300)
        start = rng.randint(0, total - 1)  # tokens already cached (a prefix hit or earlier chunks)
        # Decode tokens and long prompt chunks mixed in one step: both halves of the vectorized build.
        n = 1 if rng.random() < 0.4 else rng.randint(1, total - start)
        table = rng.sample(range(2000), -(-total // block_size))
        prompt = rng.randint(1, total)  # tokens past it were generated
        seq = Sequence("r", 0, [rng.randint(0, 99) for _ in range(total)], prompt, SamplingParams(), 0.0)
        seq.block_table = table
        if rng.random() < 0.7:  # as the engine admits it; a bare sequence falls back to the list
            seq.prompt_tensor = torch.tensor(seq.token_ids[:prompt], dtype=torch.int64)
        scheduled.append(SimpleNamespace(seq=seq, start=start, num_new_tokens=n))
    for want_ids in (True, False):
        lists = ModelRunner._step_tokens(scheduled, want_ids, block_size)
        tensors = ModelRunner._step_tokens_vectorized(scheduled, want_ids, block_size)
        for name, a, b in zip(("ids", "positions", "slots"), lists, tensors, strict=True):
            assert b.dtype == torch.int64 and torch.equal(a, b), name
    first = scheduled[0]
    slots = ModelRunner._step_tokens_vectorized(scheduled[:1], False, block_size)[2]
    p = first.start  # slot of the first new token: its block's physical id * block_size + offset
    assert slots[0].item() == first.seq.block_table[p // block_size] * block_size + p % block_size
