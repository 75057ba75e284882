"""BlockTables (the model runner's incremental block-table rows) always equal the sequences' own tables."""

from __future__ import annotations

import random

import torch

from mixtral.engine.block_tables import BlockTables
from mixtral.engine.sequence import Sequence
from mixtral.sampling import SamplingParams


def _seq() -> Sequence:
    return Sequence("r", 0, [1, 2], 2, SamplingParams(), 0.0)


def test_rows_follow_growth_reallocation_release_and_row_growth() -> None:
    rng = random.Random(0)
    tables = BlockTables(max_blocks_per_seq=12, device=torch.device("cpu"), initial_rows=2)
    live = [_seq() for _ in range(3)]
    for _ in range(200):
        op = rng.random()
        seq = rng.choice(live)
        if op < 0.5 and len(seq.block_table) < 12:
            seq.block_table.append(rng.randrange(1000))  # a decode step crossed into a new block
        elif op < 0.6:
            seq.block_table = [rng.randrange(1000) for _ in range(rng.randrange(1, 6))]  # preempted, recomputed
            seq.block_table_epoch += 1
        elif op < 0.7:
            tables.release(seq.seq_id)  # finished; a new sequence takes its place
            live.remove(seq)
            live.append(_seq())
        elif op < 0.75:
            live.append(_seq())
        batch = rng.sample(live, k=rng.randrange(1, len(live) + 1))
        got = tables.gather(batch)  # [S, 12]
        assert got.shape == (len(batch), 12) and got.dtype == torch.int32
        for row, s in zip(got.tolist(), batch, strict=True):
            assert row[: len(s.block_table)] == s.block_table
