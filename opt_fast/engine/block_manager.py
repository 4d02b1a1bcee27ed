"""Fixed-size KV blocks handed out from a free list, reference-counted so that the samples of an
`n > 1` request share their prompt's blocks instead of copying them."""
from __future__ import annotations

from collections import deque

from ..config import ceil_div
from .sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.ref_counts = [0] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks `seq` must gain to hold `num_tokens` tokens."""
        return max(0, ceil_div(num_tokens, self.block_size) - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= len(self.free_blocks)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Give `seq` enough blocks for `num_tokens` tokens (callers check can_grow first)."""
        for _ in range(self.blocks_needed(seq, num_tokens)):
            block = self.free_blocks.popleft()
            self.ref_counts[block] = 1
            seq.block_table.append(block)

    def share(self, source: Sequence, target: Sequence, num_blocks: int) -> None:
        """`target` starts with the first `num_blocks` (full, never rewritten) blocks of `source`
        and their cached tokens."""
        assert not target.block_table, "only a sequence without blocks can share"
        shared = source.block_table[:num_blocks]
        for block in shared:
            self.ref_counts[block] += 1
        target.block_table = list(shared)
        target.num_cached_tokens = num_blocks * self.block_size

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s hold on its blocks; a block returns to the pool when nobody holds it."""
        for block in seq.block_table:
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks.append(block)
        seq.block_table = []
        seq.num_cached_tokens = 0
