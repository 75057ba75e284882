"""BlockManager: worked examples, and hypothesis state-machine tests of allocate / append / fork / free / evict.

The model of the state machine is the set of live sequences and their tokens. After every operation:
ref counts equal the number of block tables holding each block; free + referenced blocks = all blocks;
every cached hash points at a block whose content (the tokens of some sequence that computed it) matches;
a prefix lookup never returns blocks whose tokens differ from the looking sequence's.
"""

from __future__ import annotations

from collections import Counter

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from mixtral.engine.block_manager import BlockManager, NoFreeBlocksError
from mixtral.engine.sequence import Sequence
from mixtral.sampling import SamplingParams

BS = 4


def _seq(tokens: list[int], prompt_len: int | None = None) -> Sequence:
    return Sequence("r", 0, list(tokens), prompt_len or len(tokens), SamplingParams(), 0.0)


def _compute(bm: BlockManager, seq: Sequence, upto: int) -> None:
    """Pretend the model computed ``seq``'s tokens up to ``upto`` (slots must be allocated)."""
    bm.allocate_slots(seq, upto)
    seq.num_computed_tokens = upto
    bm.cache_full_blocks(seq)


def test_docstring_example_prefix_reuse() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = _seq([5, 6, 7, 8, 9, 10])
    _compute(bm, a, 6)
    assert len(a.block_table) == 2
    b = _seq([5, 6, 7, 8, 11])
    hits = bm.find_cached_prefix(b)
    assert hits == a.block_table[:1]
    bm.allocate_slots(b, 5, hits)
    assert b.num_computed_tokens == 4 and b.block_table[0] == a.block_table[0]
    assert bm.blocks[a.block_table[0]].ref_cnt == 2
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 8
    bm.check_invariants()


def test_last_token_is_never_served_from_cache() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = _seq(list(range(20, 28)))  # exactly two full blocks
    _compute(bm, a, 8)
    again = _seq(list(range(20, 28)))
    assert len(bm.find_cached_prefix(again)) == 1  # the block holding the last token is recomputed
    bm.free(a)


def test_freed_cached_blocks_are_evicted_least_recently_freed_first() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    a, b = _seq([1, 2, 3]), _seq([4, 5, 6])
    _compute(bm, a, 3)  # 2 blocks; block of [1, 2] cached
    _compute(bm, b, 3)
    bm.free(a)
    bm.free(b)
    # Unhashed partial blocks are reused first, then a's cached block (freed before b's).
    c = _seq([7, 8, 9, 10, 11, 12, 13])
    bm.allocate_slots(c, 6)  # 3 blocks
    assert bm.find_cached_prefix(_seq([1, 2, 0])) == []
    assert len(bm.find_cached_prefix(_seq([4, 5, 0]))) == 1
    bm.free(c)


def test_allocation_beyond_capacity_is_refused_without_side_effects() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    s = _seq(list(range(12)))
    assert not bm.can_allocate(s, 12)
    try:
        bm.allocate_slots(s, 12)
    except NoFreeBlocksError as exc:
        assert "needs 3 blocks" in str(exc)
    else:
        raise AssertionError("expected NoFreeBlocksError")
    assert s.block_table == [] and bm.num_free_blocks == 2


def test_fork_shares_full_prompt_blocks_only() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = _seq(list(range(30, 40)))  # 10 tokens: 2 full blocks + 2
    _compute(bm, parent, 10)
    child = _seq(list(range(30, 40)))
    bm.fork(parent, child)
    assert child.block_table == parent.block_table[:2] and child.num_computed_tokens == 8
    assert [bm.blocks[b].ref_cnt for b in parent.block_table] == [2, 2, 1]
    bm.free(parent)
    assert [bm.blocks[b].ref_cnt for b in child.block_table] == [1, 1]
    bm.free(child)
    bm.check_invariants()


class BlockManagerMachine(RuleBasedStateMachine):
    """Random interleavings of new sequences (with shared prefixes), growth, forks and frees."""

    def __init__(self) -> None:
        super().__init__()
        self.bm = BlockManager(num_blocks=12, block_size=BS)
        self.live: list[Sequence] = []
        # Content of every block as last computed: block id -> tokens (for checking cache answers).
        self.content: dict[int, tuple[int, ...]] = {}

    def _record(self, seq: Sequence) -> None:
        for i, b in enumerate(seq.block_table[: seq.num_computed_tokens // BS]):
            self.content[b] = tuple(seq.token_ids[: (i + 1) * BS])

    @rule(prefix=st.sampled_from([(), (1, 2, 3, 4), (1, 2, 3, 4, 5, 6, 7, 8), (9, 9, 9, 9)]),
          tail=st.lists(st.integers(0, 3), min_size=1, max_size=9))
    def add_sequence(self, prefix: tuple[int, ...], tail: list[int]) -> None:
        seq = _seq(list(prefix) + tail)
        hits = self.bm.find_cached_prefix(seq)
        for i, b in enumerate(hits):
            # A hit must hold exactly this sequence's tokens up to the end of that block.
            assert self.content[b] == tuple(seq.token_ids[: (i + 1) * BS])
        if not self.bm.can_allocate(seq, seq.num_tokens, hits):
            return
        self.bm.allocate_slots(seq, seq.num_tokens, hits)
        assert seq.num_computed_tokens == len(hits) * BS
        seq.num_computed_tokens = seq.num_tokens
        self.bm.cache_full_blocks(seq)
        self._record(seq)
        self.live.append(seq)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), count=st.integers(1, 6))
    def append_tokens(self, data: st.DataObject, count: int) -> None:
        seq = data.draw(st.sampled_from(self.live))
        new_tokens = data.draw(st.lists(st.integers(0, 3), min_size=count, max_size=count))
        target = seq.num_tokens + count
        if not self.bm.can_allocate(seq, target):
            return
        seq.token_ids += new_tokens
        self.bm.allocate_slots(seq, target)
        seq.num_computed_tokens = target
        self.bm.cache_full_blocks(seq)
        self._record(seq)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        parent = data.draw(st.sampled_from(self.live))
        child = _seq(parent.token_ids, parent.num_prompt_tokens)
        self.bm.fork(parent, child)
        assert child.num_computed_tokens % BS == 0
        if not self.bm.can_allocate(child, child.num_tokens):
            self.bm.free(child)
            return
        self.bm.allocate_slots(child, child.num_tokens)
        child.num_computed_tokens = child.num_tokens
        self.bm.cache_full_blocks(child)
        self._record(child)
        self.live.append(child)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(self.live))
        self.live.remove(seq)
        self.bm.free(seq)
        assert seq.block_table == []

    @invariant()
    def books_balance(self) -> None:
        self.bm.check_invariants()
        held = Counter(b for s in self.live for b in s.block_table)
        for block in self.bm.blocks:
            assert block.ref_cnt == held.get(block.block_id, 0)
        assert self.bm.num_free_blocks == self.bm.num_blocks - len(held)
        for s in self.live:
            assert len(s.block_table) == self.bm.blocks_needed(s.num_tokens)

    @invariant()
    def cache_entries_hold_their_content(self) -> None:
        for block in self.bm.blocks:
            if block.block_hash is not None:
                assert block.block_id in self.content

    def teardown(self) -> None:
        for seq in self.live:
            self.bm.free(seq)
        assert self.bm.num_free_blocks == self.bm.num_blocks


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
