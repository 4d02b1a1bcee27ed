"""Async scheduling: the next decode step is launched before the host has the tokens of the one
in flight (its inputs are those tokens, copied on the device).

On CPU the decode graphs are emulated (a replay re-runs the step into the same static outputs),
so reading a step's outputs after the next replay, or staging a wrong row, changes the results
here as it would on a GPU. Every test compares with the same work scheduled after each step's
results (async_scheduling=False): the same tokens, logprobs, texts and finish reasons, and every
KV block back in the pool at the end.
"""
from __future__ import annotations

import random

import pytest
import torch

from opt_testing import EmulatedGraphs, test_device
from opt_fast import LLM, Engine, SamplingParams

on_cuda = pytest.mark.skipif(test_device() != "cuda", reason="needs a CUDA device")


def prompts(count: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[2] + torch.randint(4, 400, (n,), generator=g).tolist()
            for n in torch.randint(1, 40, (count,), generator=g).tolist()]


def count_launches_ahead(runner) -> list:
    """Wrap `runner.launch_ahead`; the returned list gets an entry per step launched ahead."""
    launched, launch_ahead = [], runner.launch_ahead
    runner.launch_ahead = lambda previous, batch, eos: launched.append(len(previous.seqs)) or launch_ahead(
        previous, batch, eos)
    return launched


def emulated_engine(model_dir, **kwargs) -> Engine:
    return emulate_graphs(Engine(str(model_dir), device="cpu", kernels="torch", **kwargs))


def emulate_graphs(engine: Engine) -> Engine:
    runner = engine.runner
    runner.graphs = EmulatedGraphs(runner)
    runner.graphs.host_i64.fill_(3)       # poisoned: a row the staging forgets shows
    runner.graphs.host_i32.fill_(5)
    runner.graphs.host_f32.fill_(2.5)
    return engine


def assert_same_outputs(want, have) -> None:
    assert have.request_id == want.request_id
    assert len(have.outputs) == len(want.outputs)
    for a, b in zip(want.outputs, have.outputs):
        assert b.token_ids == a.token_ids, want.request_id
        assert (b.finish_reason, b.text) == (a.finish_reason, a.text)
        assert b.cumulative_logprob == pytest.approx(a.cumulative_logprob, abs=1e-4)
        if a.logprobs is not None:
            assert [sorted(d) for d in b.logprobs] == [sorted(d) for d in a.logprobs]
            assert [v for d in b.logprobs for v in d.values()] == pytest.approx(
                [v for d in a.logprobs for v in d.values()], abs=1e-4)


def assert_nothing_held(engine: Engine) -> None:
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    assert not any(engine.blocks.ref_counts)


def mixed_params(batch: list, stops: list[int]) -> list[SamplingParams]:
    """Greedy with logprobs, seeded top-k/top-p draws, two samples, min_tokens; lengths differ,
    and some rows stop on a token (`stops`) part-way, so rows leave while a step is in flight."""
    kinds = [dict(temperature=0, logprobs=2),
             dict(temperature=0.9, top_k=20, top_p=0.9, seed=11),
             dict(temperature=1.0, n=2, seed=3),
             dict(temperature=0, min_tokens=2, logprobs=0)]
    greedy = (0, 3)
    return [SamplingParams(max_tokens=6 + 3 * (i % 5), stop_token_ids=[stops[i]] if i % 4 in greedy else None,
                           **kinds[i % len(kinds)]) for i in range(len(batch))]


def test_steps_launched_ahead_give_the_tokens_of_steps_scheduled_after_the_results(tiny_model_dir):
    batch = prompts(11, seed=1)       # padded to the graph of 16 rows
    # stop tokens that occur part-way through the rows' greedy outputs
    free_run = LLM(str(tiny_model_dir), device="cpu", kernels="torch").generate(
        batch, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    stops = [out.outputs[0].token_ids[3] for out in free_run]
    params = mixed_params(batch, stops)
    results = {}
    for async_scheduling in (False, True):
        llm = LLM(str(tiny_model_dir), device="cpu", kernels="torch", max_num_seqs=16,
                  async_scheduling=async_scheduling)
        engine = emulate_graphs(llm.engine)
        launched = count_launches_ahead(engine.runner)
        results[async_scheduling] = llm.generate(batch, params, use_tqdm=False)
        assert bool(launched) == async_scheduling
        assert_nothing_held(engine)
    assert sum(o.outputs[0].finish_reason == "stop" for o in results[False]) >= 3
    for want, have in zip(results[False], results[True]):
        assert_same_outputs(want, have)


def async_engine(model_dir, path: str, **kwargs) -> Engine:
    """A CPU engine whose decode steps run on emulated graphs (path "graphs") or eagerly
    ("eager": no graphs, as with enforce_eager on a GPU); both launch steps ahead."""
    if path == "graphs":
        return emulated_engine(model_dir, **kwargs)
    return Engine(str(model_dir), device="cpu", kernels="torch", **kwargs)


@pytest.mark.parametrize("path", ["graphs", "eager"])
@pytest.mark.parametrize("kind", ["penalty", "min_tokens", "penalty_on_logprobs"])
def test_penalties_and_bans_apply_to_steps_launched_ahead(tiny_model_dir, kind, path):
    """The graph's own draw ignores penalties and bans; a step launched ahead redraws eagerly
    with them (an eager step launched ahead draws with them at once). Its seen ids end with
    the token in flight (filled on the device), its min_tokens bans count that token, and
    FlagAI's penalty on log-probabilities applies as it would."""
    batch = prompts(3, seed=2)
    params = {
        "penalty": SamplingParams(temperature=0, repetition_penalty=1.5, max_tokens=12, ignore_eos=True),
        # half the tiny vocabulary banned for each row's first min_tokens (3, 5, 7: while one
        # row's ban ends, the others' still make the step redraw), then those ids stop a row
        "min_tokens": [SamplingParams(temperature=0, min_tokens=3 + 2 * i, stop_token_ids=list(range(4, 200)),
                                      max_tokens=12, ignore_eos=True) for i in range(3)],
        "penalty_on_logprobs": SamplingParams(temperature=0.9, top_k=30, top_p=0.9, repetition_penalty=3.0,
                                              penalty_on_logprobs=True, banned_token_ids=[3], seed=4,
                                              max_tokens=12, ignore_eos=True),
    }[kind]
    # On the graphs path both runs redraw the same way, so a plain eager run (no graphs, nothing
    # ahead) is the reference too: a redraw that skipped the penalty would agree with itself.
    runs = [(path, False), (path, True)] + ([("eager", False)] if path == "graphs" else [])
    outs = {}
    for run_path, async_scheduling in runs:
        engine = async_engine(tiny_model_dir, run_path, async_scheduling=async_scheduling)
        launched = count_launches_ahead(engine.runner)
        for i, prompt in enumerate(batch):
            engine.add_request(str(i), prompt, params[i] if isinstance(params, list) else params)
        outs[run_path, async_scheduling] = run = {}
        while engine.has_unfinished_requests():
            run.update((o.request_id, o) for o in engine.step() if o.finished)
        assert bool(launched) == async_scheduling
        assert_nothing_held(engine)
    for i in map(str, range(len(batch))):
        for other in runs[1:]:
            assert_same_outputs(outs[runs[0]][i], outs[other][i])
    ahead = outs[path, True]
    if kind == "min_tokens":
        assert all(len(ahead[str(i)].outputs[0].token_ids) >= 3 + 2 * i for i in range(3))
        assert sum(o.outputs[0].finish_reason == "stop" for o in ahead.values()) >= 2


def _random_workload(model_dir, seed: int, async_scheduling: bool, path: str = "graphs"):
    """Requests added and aborted at random calls of `step` (the same calls in both modes), on
    a small pool (preemption) with a short queue. Returns (final outputs, aborted ids, steps
    launched ahead). After every step the pool agrees with the ref counts."""
    rng = random.Random(seed)
    engine = async_engine(model_dir, path, block_size=rng.choice([4, 8]), num_kv_blocks=rng.randint(40, 90),
                          max_num_seqs=rng.randint(2, 8), async_scheduling=async_scheduling,
                          enable_prefix_caching=rng.random() < 0.5)
    launched = count_launches_ahead(engine.runner)
    blocks, finals, aborted, added = engine.blocks, {}, set(), []
    for call in range(120):
        if rng.random() < 0.3:
            prompt = [2] + [rng.randint(4, 399) for _ in range(rng.randint(1, 30))]
            kind = rng.random()
            params = SamplingParams(
                max_tokens=rng.randint(1, 24), n=rng.choice([1, 1, 1, 2]),
                temperature=0 if kind < 0.5 else 0.8, seed=call if kind < 0.8 else None,
                top_k=rng.choice([0, 5]), logprobs=rng.choice([None, None, 1]),
                stop_token_ids=[rng.randint(4, 399) for _ in range(rng.randint(0, 40))],
                repetition_penalty=1.3 if rng.random() < 0.15 else 1.0)
            engine.add_request(str(call), prompt, params)
            added.append(str(call))
        if added and rng.random() < 0.05:
            victim = rng.choice(added)
            if engine.abort_request(victim) is not None:
                aborted.add(victim)
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
        assert sum(1 for count in blocks.ref_counts if count == 0) == blocks.num_free_blocks, call
    for _ in range(2000):
        if not engine.has_unfinished_requests():
            break
        finals.update((o.request_id, o) for o in engine.step() if o.finished)
    assert not engine.has_unfinished_requests()
    assert_nothing_held(engine)
    assert set(finals) | aborted == set(added)
    return finals, aborted, len(launched)


@pytest.mark.parametrize("path,seeds", [("graphs", range(0, 4)), ("graphs", range(4, 8)), ("eager", range(8, 12))])
def test_random_workloads_give_every_request_the_same_outputs(tiny_model_dir, path, seeds):
    ahead = 0
    for seed in seeds:
        want, aborted_sync, _ = _random_workload(tiny_model_dir, seed, async_scheduling=False, path=path)
        have, aborted_async, launched = _random_workload(tiny_model_dir, seed, async_scheduling=True, path=path)
        ahead += launched
        for request_id in set(want) - aborted_sync - aborted_async:
            assert_same_outputs(want[request_id], have[request_id])
    assert ahead > 50


def engine_with_a_step_in_flight(model_dir, num_requests: int, seed: int, max_tokens: int, **kwargs):
    """(engine, its count of steps launched ahead): greedy requests stepped until a step is
    launched ahead of the results for the `num_requests`-th time."""
    engine = emulated_engine(model_dir, async_scheduling=True, **kwargs)
    launched = count_launches_ahead(engine.runner)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for i, prompt in enumerate(prompts(num_requests, seed=seed)):
        engine.add_request(str(i), prompt, params)
    while len(launched) < num_requests:
        engine.step()
    assert engine._ahead is not None
    return engine, params


def test_a_request_aborted_while_its_next_step_is_in_flight_reports_nothing_more(tiny_model_dir):
    engine, _ = engine_with_a_step_in_flight(tiny_model_dir, 3, seed=4, max_tokens=12)
    final = engine.abort_request("1")
    assert final.finished and final.outputs[0].finish_reason == "abort"
    tokens = len(final.outputs[0].token_ids)
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert "1" not in {o.request_id for o in outs}
    assert {o.request_id for o in outs if o.finished} == {"0", "2"}
    assert all(len(o.outputs[0].token_ids) == 12 for o in outs if o.finished)
    assert 0 < tokens < 12
    assert_nothing_held(engine)


def test_blocks_filled_by_steps_launched_ahead_enter_the_prefix_cache(tiny_model_dir):
    """A block whose last token a step launched ahead computed is entered under its full
    tokens once they reach the host: a follow-up prompt (a chat turn: prompt, answer, more)
    reuses every full block, as it does without async scheduling."""
    first = prompts(1, seed=6)[0][:5]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    reused, follow_ups = {}, {}
    for async_scheduling in (False, True):
        llm = LLM(str(tiny_model_dir), device="cpu", kernels="torch", block_size=4,
                  async_scheduling=async_scheduling)
        launched = count_launches_ahead(emulate_graphs(llm.engine).runner)
        answer = llm.generate([first], params, use_tqdm=False)[0].outputs[0].token_ids
        assert bool(launched) == async_scheduling
        follow_up = first + answer + [9, 10, 11]
        follow_ups[async_scheduling] = llm.generate([follow_up], params, use_tqdm=False)[0]
        reused[async_scheduling] = follow_ups[async_scheduling].num_cached_tokens
    # 45 tokens computed (the last drawn token never is): 11 full blocks of 4
    assert reused == {False: 44, True: 44}
    assert_same_outputs(follow_ups[False], follow_ups[True])


def test_a_request_added_while_a_step_is_in_flight_is_admitted_at_the_next_step(tiny_model_dir):
    engine, params = engine_with_a_step_in_flight(tiny_model_dir, 2, seed=7, max_tokens=30, max_num_seqs=4)
    engine.add_request("late", prompts(1, seed=8)[0], params)
    # the step in flight was launched before "late" came: the one launched ahead of its
    # results admits it, and its first token comes with that step, at the second call
    first_seen = [call for call in range(1, 5) if "late" in {o.request_id for o in engine.step()}]
    assert first_seen[0] == 2
    while engine.has_unfinished_requests():
        engine.step()
    assert_nothing_held(engine)


@pytest.mark.parametrize("path", ["graphs", "eager"])
def test_prompts_that_arrive_meanwhile_join_the_step_launched_ahead(tiny_model_dir, path):
    """Requests added while decodes are in flight are admitted into the next step launched
    ahead (as prompt rows, beside the decodes whose inputs are the tokens in flight; a prompt
    of BOS alone too, and one reusing a cached prefix), with the outputs of scheduling after
    each step's results."""
    params = SamplingParams(temperature=0, max_tokens=9, ignore_eos=True, logprobs=1)
    early, late = prompts(2, seed=31), prompts(3, seed=32)
    late[1] = [2]
    late[2] = early[0][:9] + late[2]
    results = {}
    for async_scheduling in (False, True):
        engine = async_engine(tiny_model_dir, path, async_scheduling=async_scheduling, max_num_seqs=8, block_size=4)
        admitted = []
        launch_ahead = engine.runner.launch_ahead
        engine.runner.launch_ahead = lambda previous, batch, eos: admitted.extend(
            s.request_id for s in batch.prefills) or launch_ahead(previous, batch, eos)
        for i, prompt in enumerate(early):
            engine.add_request(f"early{i}", prompt, params)
        finals = {}
        for step in range(200):
            if step == 3:
                for i, prompt in enumerate(late):
                    engine.add_request(f"late{i}", prompt, params)
            finals.update((o.request_id, o) for o in engine.step() if o.finished)
            if not engine.has_unfinished_requests():
                break
        assert_nothing_held(engine)
        assert sorted(admitted) == (["late0", "late1", "late2"] if async_scheduling else [])
        results[async_scheduling] = finals
    assert set(results[True]) == set(results[False]) == {"early0", "early1", "late0", "late1", "late2"}
    assert results[True]["late2"].num_cached_tokens == results[False]["late2"].num_cached_tokens == 8
    for request_id in results[False]:
        assert_same_outputs(results[False][request_id], results[True][request_id])


def _random_ids(n: int, seed: int) -> list[int]:
    return torch.randint(4, 400, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _run_calls(model_dir, path: str, async_scheduling: bool, calls: dict, aborts: dict | None = None, **kwargs):
    """(final outputs, request ids admitted into steps launched ahead); `calls` maps a step()
    call's index to the requests added just before it, `aborts` to the request ids aborted
    before those are added."""
    engine = async_engine(model_dir, path, async_scheduling=async_scheduling, **kwargs)
    admitted, launch_ahead = [], engine.runner.launch_ahead
    engine.runner.launch_ahead = lambda previous, batch, eos: admitted.extend(
        s.request_id for s in batch.prefills) or launch_ahead(previous, batch, eos)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    finals = {}
    for call in range(200):
        for request_id in (aborts or {}).get(call, ()):
            assert engine.abort_request(request_id).finished
        for request_id, prompt in calls.get(call, ()):
            engine.add_request(request_id, prompt, params)
        if call > max(calls) and not engine.has_unfinished_requests():
            break
        finals.update((o.request_id, o) for o in engine.step() if o.finished)
    assert_nothing_held(engine)
    return finals, admitted


def _run_both_ways(model_dir, path: str, calls: dict, **kwargs) -> tuple[dict, dict]:
    """_run_calls synchronously and with async scheduling: ({async: finals}, {async: admitted})."""
    results, admitted = {}, {}
    for async_scheduling in (False, True):
        results[async_scheduling], admitted[async_scheduling] = _run_calls(model_dir, path, async_scheduling,
                                                                           calls, **kwargs)
    return results, admitted


def assert_both_ways_reuse(results: dict, request_id: str, tokens: int, compared=None) -> None:
    """`request_id` reused `tokens` prompt tokens from the prefix cache both ways, and the
    requests `compared` (default: all) got the same outputs both ways."""
    assert results[False][request_id].num_cached_tokens == tokens
    assert results[True][request_id].num_cached_tokens == tokens
    for other in results[False] if compared is None else compared:
        assert_same_outputs(results[False][other], results[True][other])


@pytest.mark.parametrize("path", ["graphs", "eager"])
def test_a_prompt_waiting_for_budget_reuses_the_prefix_the_step_in_flight_computed(tiny_model_dir, path):
    """"first" (32 tokens) takes the whole token budget of step 0; "second" shares its first
    block (16 tokens) and is admitted at step 1 either way: synchronously after step 0's blocks
    entered the cache, launched ahead before step 0's results, which enters them first (both
    reuse 16 tokens). Found by review: they once entered the cache only after the results."""
    shared = [2] + _random_ids(15, 1)
    calls = {0: [("first", shared + _random_ids(16, 2)), ("second", shared + _random_ids(10, 3))]}
    results, admitted = _run_both_ways(tiny_model_dir, path, calls, max_num_seqs=8, max_num_batched_tokens=32)
    assert admitted == {False: [], True: ["second"]}
    assert_both_ways_reuse(results, "second", 16)


@pytest.mark.parametrize("path", ["graphs", "eager"])
def test_a_prompt_arriving_after_its_prefix_reuses_it_while_that_step_is_in_flight(tiny_model_dir, path):
    """"a" arrives while decodes are in flight, "b" (a's first 23 tokens, then another) one call
    later: each joins a step launched ahead, b's while a's prompt is in flight. Synchronously, b
    reuses a's five full blocks of 4; launched ahead it must too."""
    base = [2] + _random_ids(22, 4)
    calls = {0: [("decoding", [2] + _random_ids(5, 5))], 2: [("a", base + [7])], 3: [("b", base + [8])]}
    results, admitted = _run_both_ways(tiny_model_dir, path, calls, max_num_seqs=8, block_size=4)
    assert admitted == {False: [], True: ["a", "b"]}
    assert_both_ways_reuse(results, "b", 20)


@pytest.mark.parametrize("path", ["graphs", "eager"])
def test_a_prompt_aborted_while_its_step_is_in_flight_leaves_its_prefix_cached(tiny_model_dir, path):
    """"a" joins the step launched ahead and is aborted before that step's results; "b" (a's
    first 23 tokens, then another) arrives next. Synchronously a's step completed before the
    abort and b reuses its five full blocks of 4; launched ahead too, as the step in flight fills
    them all the same (a review found them lost: freed before they entered the cache)."""
    base = [2] + _random_ids(22, 6)
    calls = {0: [("decoding", [2] + _random_ids(5, 7))], 2: [("a", base + [7])], 4: [("b", base + [8])]}
    results, admitted = _run_both_ways(tiny_model_dir, path, calls, aborts={3: ["a"]}, max_num_seqs=8,
                                       block_size=4)
    for async_scheduling in (False, True):
        assert ("a" in admitted[async_scheduling]) == async_scheduling   # the case under test: a's step in flight
        assert "a" not in results[async_scheduling]
    assert_both_ways_reuse(results, "b", 20, compared=["b"])


def test_a_step_in_flight_whose_requests_all_ended_holds_up_nothing(tiny_model_dir):
    engine, params = engine_with_a_step_in_flight(tiny_model_dir, 2, seed=9, max_tokens=30)
    for request_id in ("0", "1"):
        engine.abort_request(request_id)
    assert not engine.has_unfinished_requests()
    engine.add_request("next", prompts(1, seed=10)[0], params)
    assert [o.request_id for o in engine.step()] == ["next"]     # its prompt, at once
    while engine.has_unfinished_requests():
        engine.step()
    assert_nothing_held(engine)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_step_interrupted_before_its_results_loses_nothing(tiny_model_dir, async_scheduling):
    """KeyboardInterrupt (or a device error) while a step's results are awaited, with the next
    step launched ahead: stepping on gives every request the tokens of an uninterrupted run."""
    batch = prompts(3, seed=11)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)
    finals = {}
    for interrupt_at in (None, 5):
        engine = emulated_engine(tiny_model_dir, async_scheduling=async_scheduling)
        collect, calls, interrupts = engine.runner.collect, [], []

        def interrupted(pending):
            calls.append(1)
            if len(calls) == interrupt_at:
                raise KeyboardInterrupt
            return collect(pending)
        engine.runner.collect = interrupted
        for i, prompt in enumerate(batch):
            engine.add_request(str(i), prompt, params)
        finals[interrupt_at] = {}
        for _ in range(100):        # bounded: a sequence that lost count of a token never ends
            if not engine.has_unfinished_requests():
                break
            try:
                finals[interrupt_at].update((o.request_id, o) for o in engine.step() if o.finished)
            except KeyboardInterrupt:
                assert interrupt_at and engine._ahead is None
                interrupts.append(interrupt_at)
        assert interrupts == ([interrupt_at] if interrupt_at else [])
        assert_nothing_held(engine)
    for i in map(str, range(len(batch))):
        assert_same_outputs(finals[None][i], finals[5][i])


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_an_interrupt_while_a_graph_batch_is_staged_loses_nothing(tiny_model_dir, async_scheduling):
    """KeyboardInterrupt while the decode graphs' host buffers are refilled for a new batch (here
    as its block tables are about to be written; a real Ctrl-C can land anywhere in that window):
    the next step must refill them all, not replay half-written tables (poisoned: block 5) as
    if the batch were staged. Found by running the suite under OPT_FAST_TEST_ASYNC=1; the
    synchronous path had it too."""
    batch = prompts(2, seed=3)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=1)
    finals = {}
    for interrupt in (False, True):
        engine = emulated_engine(tiny_model_dir, async_scheduling=async_scheduling, block_size=4, max_num_seqs=4)
        graphs, refills = engine.runner.graphs, []
        refill_tables = graphs._refill_tables

        def interrupted(seqs, n):
            refills.append(len(seqs))
            if interrupt and len(refills) == 1:     # the first graph batch: both decodes
                raise KeyboardInterrupt
            return refill_tables(seqs, n)
        graphs._refill_tables = interrupted
        for i, prompt in enumerate(batch):
            engine.add_request(str(i), prompt, params)
        finals[interrupt] = {}
        for _ in range(100):
            if not engine.has_unfinished_requests():
                break
            try:
                finals[interrupt].update((o.request_id, o) for o in engine.step() if o.finished)
            except KeyboardInterrupt:
                assert interrupt and engine._ahead is None
        assert interrupt is (len(refills) > 1 and refills[0] == refills[1])   # restaged after it
        assert_nothing_held(engine)
    for i in map(str, range(len(batch))):
        assert_same_outputs(finals[False][i], finals[True][i])


def test_the_step_after_a_prompt_finishes_beside_decodes_is_launched_ahead(tiny_model_dir):
    """A step that finishes a prompt samples it before the running decodes, while the scheduler
    lists it after them: the same sequences in another order, so the next step still goes ahead."""
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    results = {}
    for async_scheduling in (False, True):
        engine = emulated_engine(tiny_model_dir, async_scheduling=async_scheduling, max_num_seqs=4)
        launched = count_launches_ahead(engine.runner)
        first, late = prompts(2, seed=21)
        engine.add_request("first", first, params)
        for _ in range(3):
            engine.step()
        engine.add_request("late", late, params)
        finals, launched_at_prompt_end = {}, None
        while engine.has_unfinished_requests():
            before = len(launched)
            outputs = engine.step()
            if launched_at_prompt_end is None and any(o.request_id == "late" for o in outputs):
                launched_at_prompt_end = launched[before:]     # the step that ended late's prompt
            finals.update((o.request_id, o) for o in outputs if o.finished)
        assert_nothing_held(engine)
        assert launched_at_prompt_end == ([2] if async_scheduling else [])
        results[async_scheduling] = finals
    for request_id in ("first", "late"):
        assert_same_outputs(results[False][request_id], results[True][request_id])


def test_no_step_is_launched_ahead_for_a_request_sure_to_stop_on_the_token_in_flight(tiny_model_dir):
    """One greedy request with max_tokens=5 on the emulated graphs: its prompt step and 4 decode
    steps. The steps of tokens 2..5 are launched ahead of the previous step's results, and none
    after the step that draws token 5 (max_tokens reached: its token would only be dropped)."""
    engine = emulated_engine(tiny_model_dir, async_scheduling=True)
    launched = count_launches_ahead(engine.runner)
    engine.add_request("r", prompts(1, seed=13)[0], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    finals, calls = [], 0
    while engine.has_unfinished_requests():
        calls += 1
        finals += [o for o in engine.step() if o.finished]
        assert calls <= 5
    assert launched == [1, 1, 1, 1]
    assert engine._ahead is None
    assert len(finals) == 1 and len(finals[0].outputs[0].token_ids) == 5
    assert finals[0].outputs[0].finish_reason == "length"
    assert_nothing_held(engine)


def test_async_engine_clients_stream_the_same_results(tiny_model_dir):
    """AsyncEngine steps on its worker thread and applies adds and aborts between steps, with a
    step in flight: clients get LLM.generate's results; one that leaves early aborts its request."""
    import asyncio
    from opt_fast.async_engine import AsyncEngine
    batch = prompts(4, seed=12)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    expected = LLM(str(tiny_model_dir), device="cpu", kernels="torch").generate(batch, params, use_tqdm=False)
    engine = emulated_engine(tiny_model_dir, async_scheduling=True)
    launched = count_launches_ahead(engine.runner)
    aeng = AsyncEngine.from_engine(engine)

    async def client(prompt, leave_after=None):
        outs = []
        async for out in aeng.generate(prompt, params):
            outs.append(out)
            if len(outs) == leave_after:
                break
        return outs

    async def main():
        return await asyncio.gather(*(client(p, 3 if i == 1 else None) for i, p in enumerate(batch)))

    streams = asyncio.run(asyncio.wait_for(main(), timeout=120))
    assert launched and len(streams[1]) == 3
    for i, (outs, want) in enumerate(zip(streams, expected)):
        if i != 1:
            assert outs[-1].finished
            assert outs[-1].outputs[0].token_ids == want.outputs[0].token_ids
            assert outs[-1].outputs[0].text == want.outputs[0].text
    assert not engine.has_unfinished_requests()
    assert_nothing_held(engine)


def test_async_scheduling_is_checked_and_reaches_the_engine(tiny_model_dir):
    with pytest.raises(ValueError, match="async_scheduling"):
        LLM(str(tiny_model_dir), device="cpu", async_scheduling="yes")
    assert LLM(str(tiny_model_dir), device="cpu", async_scheduling=True).engine.cfg.async_scheduling


@on_cuda
def test_cuda_graph_steps_launched_ahead_give_the_same_tokens(tiny_model_dir):
    batch = prompts(13, seed=5)
    free_run = LLM(str(tiny_model_dir), dtype="float32").generate(
        batch, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    params = mixed_params(batch, [out.outputs[0].token_ids[3] for out in free_run])
    results = {}
    for async_scheduling in (False, True):
        llm = LLM(str(tiny_model_dir), dtype="float32", max_num_seqs=32, async_scheduling=async_scheduling)
        launched = count_launches_ahead(llm.engine.runner)
        results[async_scheduling] = llm.generate(batch, params, use_tqdm=False)
        assert bool(launched) == async_scheduling
        assert_nothing_held(llm.engine)
    for want, have in zip(results[False], results[True]):
        assert_same_outputs(want, have)
