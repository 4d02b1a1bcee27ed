"""Fixed-size KV blocks handed out from a free pool, reference-counted so that sequences whose
leading tokens are the same share the blocks that hold them.

Two kinds of sharing. The samples of an `n > 1` request share their prompt's blocks (`share`).
With prefix caching, every full block a step has computed is also entered in a table keyed by
(the block before it, the tokens in it); a new or preempted sequence starts from the longest run
of its leading blocks found there (`reuse_prefix`) and computes only the rest. Requests with a
common system prompt or few-shot preamble compute it once, and a preempted sequence gets back
whatever of its blocks nobody has taken since.

Why the table cannot hand out a wrong block: a key holds the block's tokens themselves (dict
lookups compare them, so a hash collision only costs a comparison), and it names the block before
it by (index, generation). A block's generation goes up each time the pool hands it out anew, so
the keys of blocks that followed its old contents can never match again.

A freed block keeps its entry until the pool hands it out again. The pool gives out blocks never
entered first, then the least recently freed; a sequence's blocks are freed tail first, so the
start of a prompt, the part other requests share, stays cached longest.

Only full blocks are shared, and a full block is never written again. The attention kernels
rely on it: they store a step's new keys and values in the same launch that reads other
sequences' blocks, so a block being written must belong to its sequence alone.
"""
from __future__ import annotations

from array import array
from collections import OrderedDict

from ..config import ceil_div
from .sequence import NO_BLOCK, Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # next out first
        self.ref_counts = [0] * num_blocks
        self.generations = [0] * num_blocks
        self.cached: dict[tuple, int] = {}                        # (parent, tokens) -> block
        self.block_keys: list[tuple | None] = [None] * num_blocks  # each block's entry in `cached`

    @property
    def num_free_blocks(self) -> int:
        """Blocks nobody holds, cached ones included (handing one out drops its entry)."""
        return len(self.free_blocks)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks `seq` must gain to hold `num_tokens` tokens."""
        return max(0, ceil_div(num_tokens, self.block_size) - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= len(self.free_blocks)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Give `seq` enough blocks for `num_tokens` tokens (callers check can_grow first)."""
        for _ in range(self.blocks_needed(seq, num_tokens)):
            block, _ = self.free_blocks.popitem(last=False)
            key = self.block_keys[block]
            if key is not None:                 # its old contents are about to be overwritten
                del self.cached[key]
                self.block_keys[block] = None
            self.generations[block] += 1
            self.ref_counts[block] = 1
            seq.block_table.append(block)

    def _hold(self, seq: Sequence, blocks: list[int]) -> None:
        """`seq` (holding no blocks) starts with `blocks`, already computed."""
        assert not seq.block_table, "only a sequence without blocks can take computed ones"
        for block in blocks:
            if self.ref_counts[block] == 0:
                del self.free_blocks[block]
            self.ref_counts[block] += 1
        seq.block_table = array("i", blocks)
        seq.num_cached_tokens = len(blocks) * self.block_size

    def share(self, source: Sequence, target: Sequence, num_blocks: int) -> None:
        """`target` starts with the first `num_blocks` (full, never rewritten) blocks of `source`
        and their cached tokens."""
        self._hold(target, source.block_table[:num_blocks])

    def reuse_prefix(self, seq: Sequence) -> int:
        """Give `seq` (holding no blocks) the longest run of its leading full blocks that the
        cache holds, leaving at least its last token to compute (its logits are needed).
        Returns the tokens it need not compute."""
        if not self.prefix_caching:
            return 0
        bs, tokens = self.block_size, seq.token_ids
        parent, found = NO_BLOCK, []
        for start in range(0, (len(tokens) - 1) // bs * bs, bs):
            block = self.cached.get((parent, tuple(tokens[start:start + bs])))
            if block is None:
                break
            found.append(block)
            parent = (block, self.generations[block])
        if found:
            self._hold(seq, found)
            seq.num_keyed_blocks, seq.prefix_parent = len(found), parent
        return len(found) * bs

    def cache_computed(self, seqs: list[Sequence]) -> None:
        """Enter the blocks of `seqs` that this step's tokens filled into the prefix cache (call
        once their num_cached_tokens count this step; a step launched ahead of this one's
        results, whose input tokens the host does not have yet, is left for its own call).
        Where the cache already holds a block with the same prefix, that one stays the entry
        and this sequence's later blocks chain to it. A block already entered (shared by `share` with the sequence that computed it)
        keeps its entry: entered again along this sequence's chain, which can differ from the
        first one's, its first entry would stay in the table with nobody to remove it, and
        outlive the block's contents."""
        if not self.prefix_caching:
            return
        bs, cached, keys, generations = self.block_size, self.cached, self.block_keys, self.generations
        for seq in seqs:
            full = min(seq.num_cached_tokens, seq.num_tokens) // bs
            if full <= seq.num_keyed_blocks:    # most decode steps: no block filled
                continue
            parent, tokens = seq.prefix_parent, seq.token_ids
            for i in range(seq.num_keyed_blocks, full):
                block = owner = seq.block_table[i]
                if keys[block] is None:
                    key = (parent, tuple(tokens[i * bs:(i + 1) * bs]))
                    owner = cached.setdefault(key, block)
                    if owner == block:
                        keys[block] = key
                parent = (owner, generations[owner])
            seq.num_keyed_blocks, seq.prefix_parent = full, parent

    def reset_cache(self) -> None:
        """Forget every entry: no later prompt reuses a block computed before now. Blocks still
        held stay with their sequences (whose later blocks are then entered under chains no
        lookup reaches, which costs nothing but the entries)."""
        self.cached.clear()
        self.block_keys = [None] * self.num_blocks

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s hold on its blocks; a block returns to the pool when nobody holds it,
        keeping its cache entry until it is handed out again."""
        for block in reversed(seq.block_table):        # tail first: the prompt's start is evicted last
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
                if self.block_keys[block] is None:      # nothing to reuse: hand it out first
                    self.free_blocks.move_to_end(block, last=False)
        seq.block_table = array("i")
        seq.num_cached_tokens = 0
        seq.num_keyed_blocks, seq.prefix_parent = 0, NO_BLOCK
