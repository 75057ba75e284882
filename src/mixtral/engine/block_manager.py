"""BlockManager: the paged KV cache's bookkeeping (which physical block holds which tokens), with prefix caching.

The KV cache is ``num_blocks`` blocks of ``block_size`` token slots. A sequence's ``block_table`` lists the
physical blocks holding its tokens in order: token t lives in block ``block_table[t // block_size]`` at
offset ``t % block_size``. Blocks are reference-counted so several sequences can share them (forked samples
of one prompt, and different requests with a common prefix).

Prefix caching: once a block is full and its K/V computed, it gets a hash of its tokens chained with the hash
of the block before it, so equal hashes mean equal prefixes. A freed block keeps its hash and stays findable
until it is reused; free blocks are reused least-recently-freed first, unhashed ones before hashed ones.
Only the tensors' indices live here; the tensors belong to the model runner.

Example (block_size 4): prompt [5 6 7 8 9 10] takes blocks [3, 0]; block 3 holds tokens 5-8 and, once
computed, gets hash h0 = H(None, (5, 6, 7, 8)). A later prompt [5 6 7 8 11] finds h0 and starts with
block 3 (ref count 2) and 4 tokens already computed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from mixtral.engine.sequence import Sequence


class NoFreeBlocksError(RuntimeError):
    """Raised by ``allocate_slots`` callers that did not check ``can_allocate`` first."""


@dataclass
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None


def hash_block(parent_hash: int | None, tokens: tuple[int, ...]) -> int:
    """Content hash of one full block, chained with its prefix."""
    return hash((parent_hash, tokens))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # Blocks with ref_cnt 0, in eviction order (front = reused first).
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[int, int] = {}  # block hash -> block id holding that content
        # Prefix-cache statistics, in tokens.
        self.prefix_queries = 0
        self.prefix_hits = 0

    # ----------------------------------------------------------------- queries
    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (free, including cached-but-unreferenced ones)."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by some sequence."""
        return 1.0 - len(self._free) / self.num_blocks

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _ensure_hashes(self, seq: Sequence, num_full_blocks: int) -> None:
        """Extend ``seq.block_hashes`` to cover its first ``num_full_blocks`` blocks (tokens must exist)."""
        bs = self.block_size
        for i in range(len(seq.block_hashes), num_full_blocks):
            parent = seq.block_hashes[i - 1] if i else None
            seq.block_hashes.append(hash_block(parent, tuple(seq.token_ids[i * bs:(i + 1) * bs])))

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Physical blocks already holding this sequence's leading full blocks (longest cached prefix).

        The last token is never taken from the cache: its logits are needed, so at least one token is computed.
        """
        if not self.enable_prefix_caching:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        self._ensure_hashes(seq, max_blocks)
        hits = []
        for h in seq.block_hashes[:max_blocks]:
            block_id = self._cached.get(h)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def can_allocate(self, seq: Sequence, num_tokens: int, cached_blocks: list[int] | tuple[int, ...] = ()) -> bool:
        """Whether ``seq`` can hold ``num_tokens`` tokens, first taking ``cached_blocks`` (a fresh sequence)."""
        need = -(-num_tokens // self.block_size) - len(seq.block_table)
        if not cached_blocks:  # the common case (every running sequence, every step): no scan
            return need <= len(self._free)
        # Cached blocks that are currently free stop being free once this sequence holds them.
        reclaimed = sum(1 for b in cached_blocks if self.blocks[b].ref_cnt == 0)
        return need - len(cached_blocks) <= len(self._free) - reclaimed

    # ----------------------------------------------------------------- mutations
    def allocate_slots(self, seq: Sequence, num_tokens: int, cached_blocks: list[int] | tuple[int, ...] = ()) -> None:
        """Grow ``seq.block_table`` to hold ``num_tokens`` tokens; a fresh sequence first takes ``cached_blocks``.

        Callers check ``can_allocate`` first. Taking cached blocks marks their tokens as computed.
        """
        table = seq.block_table
        if not cached_blocks:
            # A running sequence's step: no new block 15 times out of 16 (block_size 16, decoding).
            need = -(-num_tokens // self.block_size) - len(table)
            if need <= 0:
                return
            if need <= len(self._free):
                for _ in range(need):
                    table.append(self._pop_free())
                return
        if not self.can_allocate(seq, num_tokens, cached_blocks):
            raise NoFreeBlocksError(
                f"sequence {seq.seq_id} needs {self.blocks_needed(num_tokens)} blocks for {num_tokens} tokens; "
                f"{self.num_free_blocks} free"
            )
        if cached_blocks:
            if seq.block_table:
                raise ValueError("cached blocks can only start a sequence's block table")
            for b in cached_blocks:
                self._take(b)
            seq.block_table = list(cached_blocks)
            seq.num_computed_tokens = len(cached_blocks) * self.block_size
            seq.num_published_blocks = len(cached_blocks)  # they are cache entries already
        for _ in range(self.blocks_needed(num_tokens) - len(seq.block_table)):
            seq.block_table.append(self._pop_free())

    def record_prefix_lookup(self, num_prompt_tokens: int, num_cached_tokens: int) -> None:
        self.prefix_queries += num_prompt_tokens
        self.prefix_hits += num_cached_tokens

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Publish the hashes of ``seq``'s blocks that are full and computed, so later prompts can reuse them."""
        self.cache_full_blocks_of((seq,))

    def cache_full_blocks_of(self, seqs: Iterable[Sequence]) -> None:
        """``cache_full_blocks`` for each of ``seqs`` (the step's running sequences: one call, not one each)."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for seq in seqs:
            # A step launched ahead (async scheduling) computes the K/V of a token the host does not know yet:
            # only blocks whose tokens are all known can be hashed.
            known = min(seq.num_computed_tokens, len(seq.token_ids))
            if known // bs > seq.num_published_blocks:  # most steps fill no block: nothing else to do
                self._publish(seq, min(known // bs, len(seq.block_table)))

    def _publish(self, seq: Sequence, num_full: int) -> None:
        if num_full <= seq.num_published_blocks:
            return
        self._ensure_hashes(seq, num_full)
        for i in range(seq.num_published_blocks, num_full):
            block = self.blocks[seq.block_table[i]]
            if block.block_hash is not None:
                continue
            h = seq.block_hashes[i]
            # Another sequence may have computed the same content meanwhile: keep the first copy findable.
            if h not in self._cached:
                block.block_hash = h
                self._cached[h] = block.block_id
        seq.num_published_blocks = num_full

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Give ``child`` the parent's full prompt blocks (shared, ref-counted). The child recomputes the
        partial last block itself, so no block is ever written by two sequences."""
        num_shared = min(parent.num_computed_tokens, child.num_prompt_tokens) // self.block_size
        child.block_table = list(parent.block_table[:num_shared])
        for b in child.block_table:
            self._take(b)
        child.block_hashes = list(parent.block_hashes[:num_shared])
        child.num_computed_tokens = num_shared * self.block_size
        child.num_published_blocks = min(num_shared, parent.num_published_blocks)

    def free(self, seq: Sequence) -> None:
        """Drop ``seq``'s references. Its tail blocks are freed first so they are evicted before its prefix."""
        for b in reversed(seq.block_table):
            block = self.blocks[b]
            if block.ref_cnt <= 0:
                raise RuntimeError(f"block {b} freed more often than taken (sequence {seq.seq_id})")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[b] = None
                if block.block_hash is None:
                    # Nothing to find in it: reuse it before any cached block.
                    self._free.move_to_end(b, last=False)
        seq.block_table = []
        seq.block_table_epoch += 1
        seq.num_published_blocks = 0

    def reset_prefix_cache(self) -> None:
        """Forget all cached content (blocks in use keep their data)."""
        for block in self.blocks:
            block.block_hash = None
        self._cached.clear()

    # ----------------------------------------------------------------- internals
    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_cnt == 0:
            del self._free[block_id]
        block.ref_cnt += 1

    def _pop_free(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:
            # Evict: its content is about to be overwritten.
            if self._cached.get(block.block_hash) == block_id:
                del self._cached[block.block_hash]
            block.block_hash = None
        block.ref_cnt = 1
        return block_id

    def check_invariants(self) -> None:
        """Raise if the books do not balance (tests call this)."""
        for block in self.blocks:
            if block.ref_cnt < 0:
                raise AssertionError(f"block {block.block_id} has ref_cnt {block.ref_cnt}")
            is_free = block.block_id in self._free
            if (block.ref_cnt == 0) != is_free:
                raise AssertionError(f"block {block.block_id}: ref_cnt {block.ref_cnt} but free={is_free}")
        for h, b in self._cached.items():
            if self.blocks[b].block_hash != h:
                raise AssertionError(f"cache entry {h} points at block {b} holding {self.blocks[b].block_hash}")
