"""A random walk over sequences' block tables, for the ``BlockTables`` tests on CPU (tests/engine) and on the GPU
(tests/gpu): a plain module at the top of tests/, which the root conftest puts on ``sys.path``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from mixtral.engine.block_tables import BlockTables
from mixtral.engine.sequence import Sequence
from mixtral.sampling import SamplingParams


def _sequence() -> Sequence:
    return Sequence("r", 0, [1], 1, SamplingParams(), 0.0)


def random_table_batches(tables: BlockTables, rng: random.Random, steps: int, *, seqs: int, max_blocks: int,
                         block_ids: int, grow: int, reset: int) -> Iterator[list[Sequence]]:
    """``steps`` times: edit one of the live sequences (start with ``seqs``) at random, then yield a random
    batch of them for the caller to gather and check. The edits: grow a table below ``max_blocks`` by 1 to
    ``grow`` blocks (ids below ``block_ids``), replace one with 1 to ``reset`` blocks (a new epoch), release a
    sequence from ``tables`` and start another in its place, start one more."""
    live = [_sequence() for _ in range(seqs)]
    for _ in range(steps):
        seq = rng.choice(live)
        op = rng.random()
        if op < 0.5 and len(seq.block_table) < max_blocks:
            seq.block_table += [rng.randrange(block_ids) for _ in range(rng.randrange(1, grow + 1))]
        elif op < 0.6:
            seq.block_table = [rng.randrange(block_ids) for _ in range(rng.randrange(1, reset + 1))]
            seq.block_table_epoch += 1
        elif op < 0.7:
            tables.release(seq.seq_id)
            live.remove(seq)
            live.append(_sequence())
        elif op < 0.8:
            live.append(_sequence())
        yield rng.sample(live, k=rng.randrange(1, len(live) + 1))
