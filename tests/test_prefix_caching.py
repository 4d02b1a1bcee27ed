"""Prefix caching: prompts whose leading blocks were computed before reuse those KV blocks.

The block manager's table on its own (which blocks a prompt finds, what evicts them, what must
never match), then the engine: the tokens and logprobs of a reused prefix are those of HF's
forward over the whole sequence, on every tiny shape, on the torch path and on the Triton
kernels (interpreter); prompt logprobs, preemption and leaks.
"""
from __future__ import annotations

import pytest
import torch

from opt_testing import test_device
from opt_fast import LLM, SamplingParams
from opt_fast.engine.block_manager import BlockManager
from opt_fast.engine.sequence import Sequence
from opt_fast.kernels import triton_ops

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def sequence(tokens: list[int]) -> Sequence:
    return Sequence("r", 0, tokens, GREEDY, 0)


def computed(blocks: BlockManager, tokens: list[int]) -> Sequence:
    """A sequence whose every token's K/V a step has just computed."""
    seq = sequence(tokens)
    blocks.grow(seq, len(tokens))
    seq.num_cached_tokens = len(tokens)
    blocks.cache_computed([seq])
    return seq


def reusable(blocks: BlockManager, tokens: list[int]) -> int:
    """Tokens a new sequence of `tokens` would find cached (it lets them go again at once)."""
    probe = sequence(tokens)
    found = blocks.reuse_prefix(probe)
    assert probe.num_cached_tokens == found == len(probe.block_table) * blocks.block_size
    blocks.free(probe)
    return found


def assert_consistent(blocks: BlockManager) -> None:
    """Every entry names a block that records it, and the pool is the blocks nobody holds."""
    for key, block in blocks.cached.items():
        assert blocks.block_keys[block] == key
    assert sum(key is not None for key in blocks.block_keys) == len(blocks.cached)
    assert sorted(blocks.free_blocks) == [b for b in range(blocks.num_blocks) if blocks.ref_counts[b] == 0]


PREFIX = list(range(10, 18)) + list(range(30, 34))      # three full blocks of 4


def test_a_prompt_takes_the_leading_full_blocks_it_shares_and_computes_its_last_token():
    blocks = BlockManager(10, 4)
    first = computed(blocks, PREFIX + [50, 51])             # 3 full blocks and a partial one
    table = list(first.block_table)
    blocks.free(first)
    seq = sequence(PREFIX[:8] + [60, 61, 62])
    assert blocks.reuse_prefix(seq) == 8
    assert list(seq.block_table) == table[:2] and seq.num_cached_tokens == 8
    assert [blocks.ref_counts[b] for b in table] == [1, 1, 0, 0]
    assert blocks.num_free_blocks == 8
    blocks.free(seq)
    assert reusable(blocks, PREFIX + [50, 51]) == 12       # the partial block was never entered
    assert reusable(blocks, PREFIX) == 8                   # its last token is left to compute
    assert reusable(blocks, PREFIX + [70]) == 12
    assert reusable(blocks, [10, 11, 12, 99] + PREFIX[4:]) == 0   # first block differs: no later one
    assert reusable(blocks, PREFIX[4:] + [1, 2, 3, 4, 5]) == 0    # the same block after other tokens
    assert_consistent(blocks)


def test_blocks_that_followed_a_reused_block_never_match_its_new_contents():
    """Block generations: when the pool hands a cached block out again and new tokens fill it,
    the entries of the blocks that followed its old tokens go stale. Keyed by block index alone,
    the lookup below would find the old second block, whose K/V were computed after other tokens."""
    blocks = BlockManager(4, 4)
    old = computed(blocks, [1, 2, 3, 4, 5, 6, 7, 8, 9])     # blocks 0, 1 entered; 2 partial
    head, tail = old.block_table[:2]
    blocks.free(old)
    blocks.free_blocks.move_to_end(tail)                    # the pool: 2, 3, head, tail
    blocks.grow(sequence([0]), 8)                           # takes 2 and 3
    newer = sequence([20, 21, 22, 23])
    blocks.grow(newer, 4)
    assert list(newer.block_table) == [head] and tail in blocks.free_blocks   # head now holds [20..23]
    newer.num_cached_tokens = 4
    blocks.cache_computed([newer])
    assert reusable(blocks, [20, 21, 22, 23, 5, 6, 7, 8, 9]) == 4   # not 8: the tail followed [1..4]
    assert reusable(blocks, [1, 2, 3, 4, 5, 6, 7, 8, 9]) == 0
    assert_consistent(blocks)


def test_the_pool_hands_out_blocks_with_nothing_to_reuse_first_then_the_tail_of_the_oldest():
    blocks = BlockManager(6, 4)
    blocks.free(computed(blocks, PREFIX + [50]))             # 3 blocks entered, 1 partial
    blocks.free(computed(blocks, [90, 91, 92, 93, 94]))      # freed later: 1 entered, 1 partial
    holder = sequence([0])
    blocks.grow(holder, 4 * 2)                               # the partial block and the unused one
    assert reusable(blocks, PREFIX + [70]) == 12 and reusable(blocks, [90, 91, 92, 93, 1]) == 4
    blocks.grow(holder, 4 * 3)                               # then the oldest prompt's tail ...
    assert reusable(blocks, PREFIX + [70]) == 8 and reusable(blocks, [90, 91, 92, 93, 1]) == 4
    blocks.grow(holder, 4 * 5)                               # ... and its start
    assert reusable(blocks, PREFIX + [70]) == 0 and reusable(blocks, [90, 91, 92, 93, 1]) == 4
    blocks.grow(holder, 4 * 6)
    assert not blocks.cached
    blocks.free(holder)
    assert blocks.num_free_blocks == 6 and not any(blocks.ref_counts)
    assert_consistent(blocks)


def test_the_same_prefix_computed_twice_in_one_step_keeps_one_entry_and_leaks_nothing():
    blocks = BlockManager(12, 4)
    a, b = sequence(PREFIX + [1]), sequence(PREFIX + [2])
    for seq in (a, b):
        blocks.grow(seq, 13)
        seq.num_cached_tokens = 13
    blocks.cache_computed([a, b])
    assert sorted(blocks.cached.values()) == sorted(a.block_table[:3])
    c = sequence(PREFIX + [3])
    assert blocks.reuse_prefix(c) == 12 and c.block_table == a.block_table[:3]
    c.num_cached_tokens = 12
    blocks.grow(c, 16)                                       # c goes on past the shared prefix
    c.append_token(4)
    c.append_token(5)
    c.append_token(6)
    c.num_cached_tokens = 16
    blocks.cache_computed([c])
    blocks.free(a)
    assert reusable(blocks, PREFIX + [3, 4, 5, 6, 7]) == 16
    for seq in (b, c):
        blocks.free(seq)
    assert blocks.num_free_blocks == 12 and not any(blocks.ref_counts)
    assert_consistent(blocks)


def test_nothing_is_reused_with_prefix_caching_off():
    blocks = BlockManager(8, 4, prefix_caching=False)
    blocks.free(computed(blocks, PREFIX + [1]))
    assert not blocks.cached and reusable(blocks, PREFIX + [1]) == 0


# ---- the engine ------------------------------------------------------------------------------

def shared_prefix_prompts() -> tuple[list[int], list[list[int]]]:
    """A 37-token prompt (two full blocks of 16 and 5 tokens), and later prompts that share
    all of it, part of it, or nothing."""
    g = torch.Generator().manual_seed(5)
    head = [2] + torch.randint(4, 400, (36,), generator=g).tolist()
    tail = lambda n: torch.randint(4, 400, (n,), generator=g).tolist()   # noqa: E731
    later = [head, head + tail(1), head[:32] + tail(9), head[:20] + tail(3), [2] + tail(40)]
    return head, later


def hf_check(hf_model, vocab: int, out, tolerance: float) -> None:
    """Greedy tokens and their logprobs equal HF's forward over the prompt and the output."""
    prompt, tokens = out.prompt_token_ids, out.outputs[0].token_ids
    with torch.no_grad():
        logits = hf_model(input_ids=torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1].float()
    reference = torch.log_softmax(logits[:, :vocab], dim=-1)
    assert tokens == reference.argmax(-1).tolist()
    got = [entry[token] for entry, token in zip(out.outputs[0].logprobs, tokens)]
    assert got == pytest.approx(reference.gather(1, torch.tensor(tokens)[:, None])[:, 0].tolist(), abs=tolerance)


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_reused_prefixes_give_hf_tokens_and_logprobs(hf_checkpoint, kernels):
    """A first request computes a prompt; the next ones share some, all or none of its blocks,
    and a follow-up continues its output (blocks filled by decode steps). Each reports how much it
    reused, and its greedy tokens and logprobs are HF's; no block is held at the end."""
    if kernels == "triton" and triton_ops().missing():
        pytest.skip(f"Triton kernels not built yet: {triton_ops().missing()}")
    shape, ckpt, hf_model = hf_checkpoint
    llm = LLM(str(ckpt), dtype="float32", device=test_device(), kernels=kernels, block_size=16)
    vocab = llm.get_tokenizer().vocab_size
    params = SamplingParams(temperature=0, max_tokens=24 if kernels == "torch" else 4, ignore_eos=True, logprobs=0)
    head, later = shared_prefix_prompts()
    first = llm.generate([head], params, use_tqdm=False)[0]
    follow_up = head + first.outputs[0].token_ids + [7, 7]
    outs = llm.generate(later + [follow_up], params, use_tqdm=False)
    decoded = (len(head) + params.max_tokens - 1) // 16 * 16   # full blocks whose K/V were computed
    assert [first.num_cached_tokens] + [o.num_cached_tokens for o in outs] == [0, 32, 32, 32, 16, 0, decoded]
    for out in [first] + outs:     # the tolerances of test_parity_hf and test_parity_triton
        hf_check(hf_model, vocab, out, 1e-4 if kernels == "torch" else 2e-3)
    blocks = llm.engine.blocks
    assert blocks.num_free_blocks == blocks.num_blocks and not any(blocks.ref_counts), shape
    # (the switch is the engine's, whatever the kernels: the torch ones keep the interpreter out)
    off = LLM(str(ckpt), dtype="float32", device=test_device(), kernels="torch", enable_prefix_caching=False)
    off.generate([head], params, use_tqdm=False)
    assert [o.num_cached_tokens for o in off.generate(later, params, use_tqdm=False)] == [0] * len(later)


def test_prompt_logprobs_requests_compute_their_whole_prompt(hf_checkpoint):
    """prompt_logprobs need the logits of every prompt token, so such a request reuses nothing
    and still reports an entry for each."""
    shape, ckpt, hf_model = hf_checkpoint
    llm = LLM(str(ckpt), dtype="float32", device=test_device(), kernels="torch")
    head, _ = shared_prefix_prompts()
    llm.generate([head], GREEDY, use_tqdm=False)
    out = llm.generate([head], SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)[0]
    assert out.num_cached_tokens == 0
    with torch.no_grad():
        logits = hf_model(input_ids=torch.tensor([head])).logits[0].float()
    reference = torch.log_softmax(logits[:, :llm.get_tokenizer().vocab_size], dim=-1)
    got = [out.prompt_logprobs[i][head[i]] for i in range(1, len(head))]
    assert got == pytest.approx([reference[i - 1, head[i]].item() for i in range(1, len(head))], abs=1e-4)


def test_a_forked_sample_keeps_the_entries_of_the_blocks_it_shares():
    """The samples of an n > 1 request share their parent's prompt blocks. When the parent's
    first block was computed beside an identical one (which became the entry) that has since
    been handed out again, the sample's own chain differs from the parent's: entering the shared
    blocks again along it would leave their first entries in the table with no block recording
    them, to be handed out after the blocks hold other tokens."""
    blocks = BlockManager(8, 4)
    first, parent = sequence(PREFIX[:4] + [100]), sequence(PREFIX[:8] + [200])
    for seq in (first, parent):
        blocks.grow(seq, len(seq.token_ids))
        seq.num_cached_tokens = len(seq.token_ids)
    blocks.cache_computed([first, parent])             # first's block 0 is the entry for PREFIX[:4]
    child = Sequence("r", 1, parent.token_ids, GREEDY, 1)
    blocks.share(parent, child, 2)
    head = first.block_table[0]
    blocks.free(first)
    blocks.free_blocks.move_to_end(head, last=False)
    holder = sequence([0])
    blocks.grow(holder, 1)                              # the entry's block goes to other tokens
    assert list(holder.block_table) == [head]
    blocks.grow(child, 9)
    child.num_cached_tokens = 9
    blocks.cache_computed([child])
    assert_consistent(blocks)
    for seq in (parent, child, holder):
        blocks.free(seq)
    assert_consistent(blocks)
    assert blocks.num_free_blocks == 8


def _shadowed_engine_trial(model_dir, seed: int) -> None:
    """A random workload on a small pool, the model replaced by a stub that records, for every
    KV slot written, the tokens it was computed for. After each step every position a sequence
    counts as cached must hold exactly its own tokens up to there, the table and the pool agree
    with the ref counts, and at the end nothing is held. Requests are aborted and the cache is
    reset now and then."""
    import hashlib
    import random
    from opt_fast import Engine
    from opt_fast.engine.model_runner import PendingStep, StepResult
    rng = random.Random(seed)
    bs = rng.choice([2, 4, 8])
    num_blocks, max_seqs = rng.randint(6, 30), rng.randint(1, 6)
    eng = Engine(str(model_dir), device="cpu", kernels="torch", block_size=bs, num_kv_blocks=num_blocks,
                 max_num_seqs=max_seqs, max_num_batched_tokens=rng.randint(max_seqs, 40),
                 max_model_len=min(256, num_blocks * bs))
    blocks, scheduler = eng.blocks, eng.scheduler
    written = {}                                        # (block, offset) -> the tokens up to it

    def draw(token_ids):
        # a token that depends on the whole sequence, mostly from a few ids (so prefixes recur)
        return StepResult(4 + int(hashlib.md5(repr(token_ids).encode()).hexdigest()[:8], 16)
                          % (5 if rng.random() < 0.9 else 300), -0.5)

    def write_prefills(batch):
        for seq in batch.prefills:
            for p in range(seq.num_cached_tokens, seq.num_cached_tokens + seq.num_scheduled_tokens):
                written[seq.block_table[p // bs], p % bs] = tuple(seq.token_ids[:p + 1])
        return [draw(s.token_ids) for s in batch.prefills if s.samples_this_step]

    def launch(batch, eos):
        results = write_prefills(batch)
        for seq in batch.decodes:
            p = seq.num_cached_tokens
            written[seq.block_table[p // bs], p % bs] = tuple(seq.token_ids[:p + 1])
        return PendingStep(batch.sampled, to_host=results + [draw(s.token_ids) for s in batch.decodes])

    def launch_ahead(previous, batch, eos):
        # async scheduling: the step after `previous`, launched before its tokens reach the host.
        # Its decodes (previous's rows) each compute the token in flight, at the slot its step in
        # flight left it (num_cached_tokens already counts that step), and draw the one after
        # it; prompts admitted meanwhile are computed as in `launch`.
        results = write_prefills(batch)
        for seq, in_flight in zip(batch.decodes, previous.to_host):
            token_ids, p = seq.token_ids + [in_flight.token], seq.num_cached_tokens
            written[seq.block_table[p // bs], p % bs] = tuple(token_ids)
            results.append(draw(token_ids))
        return PendingStep(batch.sampled, to_host=results)

    eng.runner.launch, eng.runner.launch_ahead = launch, launch_ahead
    eng.runner.collect = lambda pending: pending.to_host

    def check(when):
        assert_consistent(blocks)
        holders = scheduler.running + list(scheduler.waiting)
        held = [0] * num_blocks
        for seq in holders:
            for block in seq.block_table:
                held[block] += 1
        assert held == blocks.ref_counts, when
        for seq in holders:
            for p in range(seq.num_cached_tokens):
                assert written.get((seq.block_table[p // bs], p % bs)) == tuple(seq.token_ids[:p + 1]), (when, p)

    prefixes = [[2] + [rng.randint(4, 300) for _ in range(rng.randint(1, 3 * bs))] for _ in range(3)]
    live = set()
    for step in range(300):
        if rng.random() < 0.4:
            base = rng.choice(prefixes)
            prompt = base[:rng.randint(1, len(base))] + [rng.randint(4, 300) for _ in range(rng.randint(0, 2 * bs))]
            params = SamplingParams(temperature=0, max_tokens=rng.randint(1, 3 * bs), ignore_eos=True,
                                    n=rng.choice([1, 1, 2, 3]), prompt_logprobs=1 if rng.random() < 0.1 else None)
            if len(prompt) + params.max_tokens <= num_blocks * bs:
                eng.add_request(str(step), prompt, params)
                live.add(str(step))
        if live and rng.random() < 0.05:
            victim = rng.choice(sorted(live))
            eng.abort_request(victim)
            live.discard(victim)
        if rng.random() < 0.02:
            eng.reset_prefix_cache()                    # with blocks held and entered
        live -= {out.request_id for out in eng.step() if out.finished}
        check(step)
    for _ in range(5000):
        if not eng.has_unfinished_requests():
            break
        eng.step()
        check("drain")
    assert not eng.has_unfinished_requests()
    assert blocks.num_free_blocks == num_blocks and not any(blocks.ref_counts)


@pytest.mark.parametrize("seeds", [range(0, 12), range(12, 24)])
def test_random_workloads_never_hand_a_sequence_kv_of_other_tokens(tiny_model_dir, seeds):
    for seed in seeds:
        _shadowed_engine_trial(tiny_model_dir, seed)


def test_prompts_cached_but_for_their_last_token_join_as_decodes_on_the_graph_path(tiny_model_dir):
    """Prompts of 33 tokens whose first 32 are cached have one token left: they are admitted as
    decodes, so a step of only them runs the decode graph (captures emulated on CPU). Their
    tokens and logprobs are those of computing the prompts in full."""
    from opt_testing import EmulatedGraphs
    head, _ = shared_prefix_prompts()
    batch = [head[:32] + [tail] for tail in (5, 77, 301)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0)
    plain = LLM(str(tiny_model_dir), device="cpu", kernels="torch", enable_prefix_caching=False)
    expected = plain.generate(batch, params, use_tqdm=False)
    graphed = LLM(str(tiny_model_dir), device="cpu", kernels="torch", max_num_seqs=8)
    runner = graphed.engine.runner
    runner.graphs = EmulatedGraphs(runner)
    runner.graphs.host_i64.fill_(3)                  # poisoned: a row the refill forgets shows
    runner.graphs.host_i32.fill_(5)
    graphed.generate([head], params, use_tqdm=False)
    replays = runner.graphs.replays
    steps = []
    schedule = graphed.engine.scheduler.schedule
    graphed.engine.scheduler.schedule = lambda: steps.append(schedule()) or steps[-1]
    got = graphed.generate(batch, params, use_tqdm=False)
    assert not steps[0].prefills and len(steps[0].decodes) == 3      # admitted as decodes
    assert runner.graphs.replays - replays == params.max_tokens
    for want, have in zip(expected, got):
        assert have.num_cached_tokens == 32
        assert have.outputs[0].token_ids == want.outputs[0].token_ids
        assert [next(iter(d.values())) for d in have.outputs[0].logprobs] == pytest.approx(
            [next(iter(d.values())) for d in want.outputs[0].logprobs], abs=1e-5)


def test_reset_prefix_cache_makes_later_prompts_compute_everything(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), device="cpu", kernels="torch")
    head, _ = shared_prefix_prompts()
    assert [o.num_cached_tokens for o in (llm.generate([head], GREEDY, use_tqdm=False)[0],
                                          llm.generate([head], GREEDY, use_tqdm=False)[0])] == [0, 32]
    llm.reset_prefix_cache()
    assert not llm.engine.blocks.cached
    again = llm.generate([head], GREEDY, use_tqdm=False)[0]
    assert again.num_cached_tokens == 0
    assert llm.generate([head], GREEDY, use_tqdm=False)[0].num_cached_tokens == 32
    blocks = llm.engine.blocks
    assert_consistent(blocks)
    assert blocks.num_free_blocks == blocks.num_blocks
