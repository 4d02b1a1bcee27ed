"""Which sequences run each step, and how many tokens each computes. Policy only, no tensors.

Continuous batching with chunked prefill: every step first gives each running decode its one
token, then spends what is left of the token budget on prompt chunks, oldest sequence first, so
a long prompt is split over several steps instead of stalling the decodes. When the cache runs
out of blocks the newest running sequence is preempted: its blocks are freed and it waits at
the front of the queue to be recomputed (prompt + output so far), so it loses nothing.
"""
from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    # Each sequence computes seq.num_scheduled_tokens tokens from seq.num_cached_tokens on.
    prefills: list[Sequence] = field(default_factory=list)   # prompt (or recompute) chunks
    decodes: list[Sequence] = field(default_factory=list)    # one token each
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.prefills and not self.decodes

    @property
    def sampled(self) -> list[Sequence]:
        """The sequences that draw a token this step: finished prefills, then every decode."""
        return [s for s in self.prefills if s.samples_this_step] + self.decodes


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({max_num_batched_tokens}) must be at least "
                             f"max_num_seqs ({max_num_seqs}), so every running decode fits a step")
        self.blocks = block_manager
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []     # oldest first

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        for seq in self.running:
            seq.num_scheduled_tokens = 0
        # Running sequences, oldest first. Decodes keep their token of the budget even when a
        # prefill chunk comes before them; a victim is always the newest not yet visited.
        pending = deque(self.running)
        decodes_left = sum(1 for s in pending if s.num_tokens - s.num_cached_tokens == 1)
        kept: list[Sequence] = []
        block_size = self.blocks.block_size
        while pending:
            seq = pending.popleft()
            remaining = seq.num_tokens - seq.num_cached_tokens
            decode = remaining == 1
            decodes_left -= decode
            if decode and seq.num_tokens <= len(seq.block_table) * block_size:
                seq.num_scheduled_tokens = 1  # the common case: room left in its last block
                batch.decodes.append(seq)
                budget -= 1
                kept.append(seq)
                continue
            chunk = 1 if decode else min(remaining, budget - decodes_left)
            if chunk <= 0:
                kept.append(seq)              # a prompt chunk waits for budget, keeping its blocks
                continue
            while not self.blocks.can_grow(seq, seq.num_cached_tokens + chunk) and pending:
                victim = pending.pop()
                decodes_left -= victim.num_tokens - victim.num_cached_tokens == 1
                self._preempt(victim, batch)
            fitted = self._fit(seq, chunk, decode)
            if fitted <= 0 and self._release_waiting_blocks():
                # Waiting forks held blocks it needs (their shared prompt): without this, it
                # would preempt itself, come back and stop at the same place, forever.
                fitted = self._fit(seq, chunk, decode)
            if fitted <= 0:
                self._preempt(seq, batch)
                continue
            self._schedule(seq, fitted, batch)
            budget -= fitted
            kept.append(seq)
        self.running = kept
        self._admit(batch, budget)
        return batch

    def _admit(self, batch: ScheduledBatch, budget: int, ahead: bool = False) -> None:
        """Then waiting sequences while the budget, the sequence cap and the free blocks allow;
        none after a preemption this step, which would only be undone next step. `ahead`
        (schedule_ahead): each joins the batch as a prefill row, whatever it has left to
        compute, since the decode rows are the step in flight's, in its order."""
        while (self.waiting and not batch.preempted and budget > 0
               and len(self.running) < self.max_num_seqs):
            seq = self.waiting[0]
            # Blocks computed before (prefix cache); not for prompt logprobs, which need the
            # logits of every prompt token.
            reused = 0 if seq.block_table or seq.prompt_logprobs is not None else self.blocks.reuse_prefix(seq)
            chunk = min(seq.num_tokens - seq.num_cached_tokens, budget)
            if not self.blocks.can_grow(seq, seq.num_cached_tokens + chunk):
                if reused:
                    self.blocks.free(seq)     # back to the pool, still cached, while it waits
                if self.running or not self._release_waiting_blocks():
                    break
                continue
            self.waiting.popleft()
            if not seq.num_output_tokens:
                seq.num_prompt_tokens_reused = reused
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if ahead:
                self.blocks.grow(seq, seq.num_cached_tokens + chunk)
                seq.num_scheduled_tokens = chunk
                batch.prefills.append(seq)
            else:
                self._schedule(seq, chunk, batch)
            budget -= chunk

    def schedule_ahead(self, seqs: list[Sequence]) -> ScheduledBatch | None:
        """Schedule the step after the one in flight, before its tokens are known, if its decodes
        are the ones `schedule` would then build: the same sequences, each computing the token in
        flight (in `seqs`' order, the order of that step's rows). So `seqs` must be every running
        sequence, none sure to stop on that token (max_tokens) nor with samples to fork, and the
        free blocks must hold every new token (no preemption). Waiting sequences join as prefill
        rows where the budget, the cap and the free blocks allow, as `schedule` admits them.
        Gives each its slots; None (and nothing changed) where the next step must be scheduled
        after this one's results."""
        # as sets: a step that finished prefills samples them first, `running` lists them last
        if len(seqs) != len(self.running) or set(seqs) != set(self.running):
            return None
        if any(s.forks or s.num_output_tokens + 1 >= s.params.max_tokens for s in seqs):
            return None
        # each holds its tokens so far, cached (num_cached_tokens counts the step in flight)
        needed = sum(self.blocks.blocks_needed(s, s.num_cached_tokens + 1) for s in seqs)
        if needed > self.blocks.num_free_blocks:
            return None
        batch = ScheduledBatch(decodes=list(seqs))
        for seq in seqs:
            self.blocks.grow(seq, seq.num_cached_tokens + 1)
            seq.num_scheduled_tokens = 1
        self._admit(batch, self.max_num_batched_tokens - len(seqs), ahead=True)
        return batch

    def _release_waiting_blocks(self) -> bool:
        """Let waiting forks' blocks (their shared prompt) go, so a running sequence that has run
        out of victims can still grow, and the head of the queue always fits an idle cache; the
        forks recompute their prompt instead. Only if a block would come free: while the forks'
        parent runs it holds the same blocks, and dropping the forks' share would only make them
        compute their prompt again. Returns whether blocks were let go."""
        holders = [s for s in self.waiting if s.block_table]
        held = Counter(block for s in holders for block in s.block_table)
        if not any(self.blocks.ref_counts[block] == count for block, count in held.items()):
            return False
        for seq in holders:
            self.blocks.free(seq)
        return True

    def _fit(self, seq: Sequence, chunk: int, decode: bool) -> int:
        """The tokens of `chunk` that `seq` can compute now: a decode its one token or none, a
        prompt chunk as much as its blocks plus every free one hold."""
        if decode:
            return chunk if self.blocks.can_grow(seq, seq.num_cached_tokens + chunk) else 0
        return min(chunk, self._capacity(seq))

    def _capacity(self, seq: Sequence) -> int:
        """Tokens `seq` can compute with its blocks plus every free one."""
        blocks = len(seq.block_table) + self.blocks.num_free_blocks
        return blocks * self.blocks.block_size - seq.num_cached_tokens

    def _schedule(self, seq: Sequence, chunk: int, batch: ScheduledBatch) -> None:
        self.blocks.grow(seq, seq.num_cached_tokens + chunk)
        seq.num_scheduled_tokens = chunk
        decode = seq.num_tokens - seq.num_cached_tokens == 1
        (batch.decodes if decode else batch.prefills).append(seq)

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.blocks.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_scheduled_tokens = 0
        self.waiting.appendleft(seq)
        batch.preempted.append(seq)

    def fork(self, parent: Sequence) -> None:
        """Queue `parent`'s other samples, once its prompt is cached: each shares the prompt's
        full blocks, and computes only the rest of the prompt (at least its last token) itself."""
        shared = (parent.num_prompt_tokens - 1) // self.blocks.block_size
        for child in reversed(parent.forks):
            self.blocks.share(parent, child, shared)
            self.waiting.appendleft(child)
        parent.forks = []

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retire `seq` (running, waiting, or a fork not yet queued) and return its blocks."""
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        self.blocks.free(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
