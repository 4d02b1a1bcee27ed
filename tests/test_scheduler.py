"""Scheduler policy on hand-built states, no model: which sequence is preempted when the block
pool runs out, what a step that preempted admits, and when a step is scheduled ahead."""
from __future__ import annotations

from opt_fast import SamplingParams
from opt_fast.engine.block_manager import BlockManager
from opt_fast.engine.scheduler import Scheduler
from opt_fast.engine.sequence import Sequence, SequenceStatus

BLOCK = 4


def running(scheduler: Scheduler, name: str, num_prompt: int, num_output: int, num_cached: int,
            max_tokens: int = 16) -> Sequence:
    """A running sequence of `num_prompt` + `num_output` tokens, the first `num_cached` of them
    in its blocks (as many blocks as those need), appended to `scheduler.running` (newest last)."""
    seq = Sequence(name, 0, [2] + list(range(10, 10 + num_prompt - 1)),
                   SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), seed=0)
    for i in range(num_output):
        seq.append_token(100 + i)
    scheduler.blocks.grow(seq, num_cached)
    seq.num_cached_tokens = num_cached
    seq.status = SequenceStatus.RUNNING
    scheduler.running.append(seq)
    return seq


def names(seqs) -> list[str]:
    return [s.request_id for s in seqs]


def waiting(scheduler: Scheduler, name: str, num_prompt: int) -> Sequence:
    seq = Sequence(name, 0, [2] + list(range(50, 50 + num_prompt - 1)),
                   SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), seed=0)
    scheduler.add(seq)
    return seq


def test_a_decode_out_of_blocks_preempts_the_newest_running_sequence_and_admits_nothing():
    """a's decode needs a new block and the pool is empty: c, the newest, is preempted (not b),
    and waits at the front of the queue. Its two blocks come back, a takes one; the free one
    and the budget left would fit a chunk of c's recompute, but a step that preempted admits
    nobody (it would only be undone next step)."""
    blocks = BlockManager(num_blocks=4, block_size=BLOCK, prefix_caching=False)
    scheduler = Scheduler(blocks, max_num_seqs=4, max_num_batched_tokens=4)
    a = running(scheduler, "a", num_prompt=4, num_output=1, num_cached=4)    # 1 full block: needs another
    b = running(scheduler, "b", num_prompt=2, num_output=1, num_cached=2)    # room in its block
    c = running(scheduler, "c", num_prompt=6, num_output=1, num_cached=6)    # 2 blocks, room in the last
    d = waiting(scheduler, "d", num_prompt=1)
    assert blocks.num_free_blocks == 0

    batch = scheduler.schedule()

    assert names(batch.preempted) == ["c"]
    assert names(batch.decodes) == ["a", "b"] and names(batch.prefills) == []
    assert names(scheduler.running) == ["a", "b"]
    assert names(scheduler.waiting) == ["c", "d"]
    assert c.status is SequenceStatus.WAITING and not c.block_table and c.num_cached_tokens == 0
    assert c.num_tokens == 7 and c.num_scheduled_tokens == 0        # it keeps its output, to recompute
    assert (a.num_scheduled_tokens, b.num_scheduled_tokens) == (1, 1)
    assert len(a.block_table) == 2 and len(b.block_table) == 1
    assert blocks.num_free_blocks == 1                              # room for c's first chunk, unused


def test_a_prompt_chunk_leaves_the_budget_its_younger_decodes_need():
    """p, still computing its prompt, is older than three decodes: its chunk takes the budget
    less one token for each of them (they come after it in the running order), so the step
    holds all three decodes and no more tokens than max_num_batched_tokens."""
    blocks = BlockManager(num_blocks=32, block_size=BLOCK, prefix_caching=False)
    scheduler = Scheduler(blocks, max_num_seqs=4, max_num_batched_tokens=8)
    p = running(scheduler, "p", num_prompt=20, num_output=0, num_cached=4)
    decodes = [running(scheduler, name, num_prompt=2, num_output=1, num_cached=2) for name in "abc"]

    batch = scheduler.schedule()

    assert names(batch.prefills) == ["p"] and names(batch.decodes) == ["a", "b", "c"]
    assert p.num_scheduled_tokens == 8 - 3
    assert sum(s.num_scheduled_tokens for s in [p, *decodes]) == 8


def test_victims_are_taken_newest_first_until_the_chunk_fits():
    """The oldest sequence's prompt chunk needs two more blocks: d then c (the two newest) are
    preempted, b keeps decoding, and the queue holds them back in their old order, c first."""
    blocks = BlockManager(num_blocks=5, block_size=BLOCK, prefix_caching=False)
    scheduler = Scheduler(blocks, max_num_seqs=4, max_num_batched_tokens=64)
    a = running(scheduler, "a", num_prompt=12, num_output=0, num_cached=4)   # 8 prompt tokens to go
    b = running(scheduler, "b", num_prompt=2, num_output=1, num_cached=2)
    c = running(scheduler, "c", num_prompt=2, num_output=1, num_cached=2)
    d = running(scheduler, "d", num_prompt=6, num_output=1, num_cached=6)    # 2 blocks
    assert blocks.num_free_blocks == 0

    batch = scheduler.schedule()

    assert names(batch.preempted) == ["d"]      # d's two blocks are enough: c keeps running
    assert names(batch.prefills) == ["a"] and a.num_scheduled_tokens == 8
    assert names(batch.decodes) == ["b", "c"]
    assert names(scheduler.running) == ["a", "b", "c"] and names(scheduler.waiting) == ["d"]

    blocks = BlockManager(num_blocks=4, block_size=BLOCK, prefix_caching=False)
    scheduler = Scheduler(blocks, max_num_seqs=4, max_num_batched_tokens=64)
    a = running(scheduler, "a", num_prompt=12, num_output=0, num_cached=4)
    b = running(scheduler, "b", num_prompt=2, num_output=1, num_cached=2)
    c = running(scheduler, "c", num_prompt=2, num_output=1, num_cached=2)
    d = running(scheduler, "d", num_prompt=2, num_output=1, num_cached=2)
    assert blocks.num_free_blocks == 0

    batch = scheduler.schedule()

    assert names(batch.preempted) == ["d", "c"]
    assert names(batch.prefills) == ["a"] and a.num_scheduled_tokens == 8
    assert names(batch.decodes) == ["b"]
    assert names(scheduler.running) == ["a", "b"] and names(scheduler.waiting) == ["c", "d"]
    assert blocks.num_free_blocks == 0


def test_no_step_is_scheduled_ahead_for_a_sequence_sure_to_stop_on_the_token_in_flight():
    """schedule_ahead after a step whose token is a sequence's max_tokens-th: None, and nothing
    changes; one token earlier, the next step is scheduled (a decode holding its next slot)."""
    for num_output, expected in ((3, True), (4, False)):     # max_tokens 5; the step in flight draws one more
        blocks = BlockManager(num_blocks=8, block_size=BLOCK, prefix_caching=False)
        scheduler = Scheduler(blocks, max_num_seqs=4, max_num_batched_tokens=64)
        # the step in flight computes the last token, so it counts as cached (schedule_ahead's contract)
        seq = running(scheduler, "a", num_prompt=3, num_output=num_output, num_cached=3 + num_output,
                      max_tokens=5)
        free = blocks.num_free_blocks
        ahead = scheduler.schedule_ahead([seq])
        assert (ahead is not None) is expected, num_output
        if expected:
            assert ahead.decodes == [seq] and seq.num_scheduled_tokens == 1
        else:
            assert blocks.num_free_blocks == free and seq.num_scheduled_tokens == 0
