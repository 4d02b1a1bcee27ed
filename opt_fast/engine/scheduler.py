"""Which sequences run each step: decodes for the running ones, then new prefills that fit.

Policy only, no tensors. When the cache runs out of blocks the newest running sequence is
preempted: its blocks are freed and it waits at the front of the queue to be recomputed
(prompt + output so far in one prefill), so it loses nothing.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    prefills: list[Sequence] = field(default_factory=list)   # whole sequences, all their tokens
    decodes: list[Sequence] = field(default_factory=list)    # one new token each
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.prefills and not self.decodes


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = block_manager
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        # Decodes first, oldest first: the token just sampled needs a slot.
        kept: list[Sequence] = []
        running = list(self.running)
        while running:
            seq = running.pop(0)
            while not self.blocks.can_grow(seq, seq.num_tokens) and running:
                self._preempt(running.pop(), batch)
            if not self.blocks.can_grow(seq, seq.num_tokens):
                self._preempt(seq, batch)
                break
            self.blocks.grow(seq, seq.num_tokens)
            kept.append(seq)
        self.running = kept
        batch.decodes = list(kept)
        # Then whole prefills while the token budget, the sequence cap and the free blocks allow.
        budget = self.max_num_batched_tokens - len(batch.decodes)
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_tokens > budget or not self.blocks.can_grow(seq, seq.num_tokens):
                break
            self.waiting.popleft()
            self.blocks.grow(seq, seq.num_tokens)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.prefills.append(seq)
            budget -= seq.num_tokens
        return batch

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.blocks.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        batch.preempted.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retire `seq` (running or waiting) and return its blocks."""
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        self.blocks.free(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
