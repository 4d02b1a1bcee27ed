"""The first engine: scheduling, paged cache, stopping, seeds and bad input, on a tiny random OPT."""
from __future__ import annotations

import pytest
import torch

from opt_testing import eager_on_cuda, edit_logits, favour, on_launch, record_preemptions, test_device
from opt_fast import Engine, LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 40, (count,), generator=g).tolist()
    return [[2] + torch.randint(4, 400, (n,), generator=g).tolist() for n in lengths]


def run_alone(model_dir, prompt, params):
    llm = LLM(str(model_dir), device=test_device(), kernels="torch")
    return llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(str(tiny_model_dir), device=test_device(), kernels="torch")


def drain(engine: Engine) -> dict:
    final = {}
    for _ in range(10_000):
        if not engine.has_unfinished_requests():
            return final
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    raise AssertionError("engine did not finish")


def test_mixed_prefill_and_decode_step_equals_separate_runs(tiny_model_dir):
    engine = Engine(str(tiny_model_dir), device=test_device(), kernels="torch")
    batches = []
    on_launch(engine.runner, lambda batch, ahead: batches.append((len(batch.prefills), len(batch.decodes))))
    a, b = prompts(2, seed=1)
    engine.add_request("a", a, GREEDY)
    engine.step()
    engine.add_request("b", b, GREEDY)
    final = drain(engine)
    assert (1, 1) in batches, batches      # one step really mixed a prefill with a decode
    for name, prompt in (("a", a), ("b", b)):
        assert final[name].outputs[0].token_ids == run_alone(tiny_model_dir, prompt, GREEDY).token_ids


def test_preemption_loses_nothing_and_leaks_no_blocks(tiny_model_dir):
    """A pool too small for every sequence: preempted sequences resume where they were (their
    streamed tokens only grow, their text and cumulative logprob stay those of their tokens),
    end as they would have unpreempted, and every block comes back."""
    batch = prompts(12, seed=2)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)
    # 12 sequences of up to 52 tokens need up to 48 blocks of 16; 14 forces preemption.
    engine = Engine(str(tiny_model_dir), device=test_device(), kernels="torch", num_kv_blocks=14)
    preempted = record_preemptions(engine)
    for i, p in enumerate(batch):
        engine.add_request(str(i), p, params)
    streamed: dict[str, list] = {str(i): [] for i in range(len(batch))}
    while engine.has_unfinished_requests():
        for out in engine.step():
            streamed[out.request_id].append(list(out.outputs[0].token_ids))
            final = out.outputs[0]
            if out.finished:
                assert final.text == engine.tokenizer.decode(final.token_ids)
                chosen = sum(step[token] for step, token in zip(final.logprobs, final.token_ids))
                assert final.cumulative_logprob == pytest.approx(chosen, abs=1e-4)
    assert preempted, "the pool was meant to be too small to hold every sequence"
    assert engine.blocks.num_free_blocks == 14
    reference = LLM(str(tiny_model_dir), device=test_device(), kernels="torch").generate(batch, params, use_tqdm=False)
    for i, ref in enumerate(reference):
        steps = streamed[str(i)]
        assert all(later[:len(earlier)] == earlier and len(later) == len(earlier) + 1
                   for earlier, later in zip(steps, steps[1:])), f"request {i} restarted"
        assert steps[-1] == ref.outputs[0].token_ids


def test_batch_results_equal_each_prompt_alone(llm, tiny_model_dir):
    batch = prompts(6, seed=3)
    outs = llm.generate(batch, GREEDY, use_tqdm=False)
    for prompt, out in zip(batch, outs):
        assert out.prompt_token_ids == prompt
        assert out.outputs[0].token_ids == run_alone(tiny_model_dir, prompt, GREEDY).token_ids


def test_seed_gives_same_tokens_whatever_the_batch(llm):
    params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=10, seed=1234, ignore_eos=True)
    target = prompts(1, seed=4)[0]
    alone = llm.generate([target], params, use_tqdm=False)[0].outputs[0].token_ids
    others = prompts(5, seed=5)
    mixed = llm.generate(others[:2] + [target] + others[2:],
                         [SamplingParams(temperature=0.9, max_tokens=7, seed=i) for i in range(2)]
                         + [params] + [SamplingParams(temperature=1.0, max_tokens=15) for _ in range(3)],
                         use_tqdm=False)
    assert mixed[2].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=10, seed=99, ignore_eos=True)
    assert llm.generate([target], other_seed, use_tqdm=False)[0].outputs[0].token_ids != alone


def test_n_samples_are_reproducible_and_distinct(llm):
    params = SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=7, ignore_eos=True)
    first = llm.generate([prompts(1, seed=6)[0]], params, use_tqdm=False)[0]
    again = llm.generate([prompts(1, seed=6)[0]], params, use_tqdm=False)[0]
    ids = [c.token_ids for c in first.outputs]
    assert ids == [c.token_ids for c in again.outputs]
    assert [c.index for c in first.outputs] == [0, 1, 2]
    assert len({tuple(t) for t in ids}) == 3


def test_requests_without_a_seed_draw_apart(tiny_model_dir):
    """Each unseeded request gets its own seed (derived from the engine's seed and the request's
    number): the same prompt sampled four times in one call, and again in a second call, gives
    outputs that differ; a new engine with the same seed repeats them all."""
    params = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)
    prompt = prompts(1, seed=20)[0]

    def runs():
        llm = LLM(str(tiny_model_dir), device=test_device(), kernels="torch", seed=3)
        return [tuple(o.outputs[0].token_ids) for _ in range(2)
                for o in llm.generate([prompt] * 4, params, use_tqdm=False)]
    first = runs()
    assert len(set(first)) == 8
    assert runs() == first


def test_ids_past_the_tokenizer_vocabulary_are_never_sampled(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), device=test_device(), kernels="torch", **eager_on_cuda())
    vocab = llm.get_tokenizer().vocab_size
    assert llm.engine.runner.model.config.vocab_size > vocab

    def favour_padding_rows(logits):
        logits[:, vocab:] += 1000.0
        return logits
    edit_logits(llm.engine.runner, favour_padding_rows)
    outs = llm.generate(prompts(4, seed=7), [SamplingParams(temperature=t, max_tokens=6, seed=1, ignore_eos=True)
                                             for t in (0.0, 0.5, 1.0, 2.0)], use_tqdm=False)
    for out in outs:
        assert max(out.outputs[0].token_ids) < vocab


def test_stop_token_ids_max_tokens_and_min_tokens(llm, tiny_model_dir):
    prompt = prompts(1, seed=8)[0]
    free = llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    stop_at = free[3]
    first = free.index(stop_at)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_at],
                                                ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == free[:first + 1] and out.finish_reason == "stop"
    # the stop token's text is left out (decoded once at the end: LLM.generate streams nothing)
    assert out.text == llm.get_tokenizer().decode(free[:first])
    min_tokens = SamplingParams(temperature=0, max_tokens=12, min_tokens=first + 3, stop_token_ids=[stop_at],
                                ignore_eos=True)
    out = llm.generate([prompt], min_tokens, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= first + 3
    assert stop_at not in out.token_ids[:first + 3]        # every one of the first min_tokens tokens
    # The greedy run above may not want stop_at where the ban ends; a model that always puts
    # stop_at first does: banned for exactly min_tokens tokens, then it ends the output.
    favouring = LLM(str(tiny_model_dir), device=test_device(), kernels="torch", **eager_on_cuda())
    favour(favouring.engine.runner, stop_at)
    out = favouring.generate([prompt], min_tokens, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == first + 4 and out.finish_reason == "stop"
    assert stop_at not in out.token_ids[:first + 3] and out.token_ids[first + 3] == stop_at
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == free[:5] and out.finish_reason == "length"


def test_eos_stops_unless_ignored(llm):
    prompt = prompts(1, seed=9)[0]
    engine = llm.engine
    free = llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    engine.eos_token_id = free[2]       # pretend the third greedy token is EOS
    try:
        stopped = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
        ignored = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    finally:
        engine.eos_token_id = llm.get_tokenizer().eos_token_id
    first = free.index(free[2])
    assert stopped.outputs[0].token_ids == free[:first + 1]
    assert stopped.outputs[0].finish_reason == "stop"
    assert ignored.outputs[0].token_ids == free


def test_text_and_stop_strings(llm):
    tok = llm.get_tokenizer()
    out = llm.generate(["def main():\n    return"], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                       use_tqdm=False)[0]
    full = out.outputs[0].text
    assert full == tok.decode(out.outputs[0].token_ids)
    assert out.prompt_token_ids == tok.encode("def main():\n    return")
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert len(stop) == 3
    cut = llm.generate(["def main():\n    return"], SamplingParams(temperature=0, max_tokens=16, stop=[stop],
                                                                    ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full[:full.index(stop)]
    assert stop not in cut.text


def test_a_stop_string_the_last_token_completes_is_cut(llm):
    """The token that completes a stop string may also be the last one max_tokens allows: the
    stop string still ends the text there, finish_reason "stop", not "length"."""
    text_prompt = "def main():\n    return"
    free = llm.generate([text_prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    tok = llm.get_tokenizer()
    checked = 0
    for k in range(3, 16):
        # a stop string ending in the last character of token k's text, which only token k completes
        before, upto = tok.decode(free.token_ids[:k - 1]), tok.decode(free.token_ids[:k])
        stop = upto[-3:]
        if len(upto) <= len(before) or len(upto) < 3 or stop in before or not free.text.startswith(upto):
            continue
        out = llm.generate([text_prompt], SamplingParams(temperature=0, stop=[stop], max_tokens=k,
                                                         ignore_eos=True), use_tqdm=False)[0].outputs[0]
        assert (out.finish_reason, out.text, len(out.token_ids)) == ("stop", upto[:upto.find(stop)], k), k
        checked += 1
    assert checked >= 3


def test_a_prompt_that_fills_max_model_len_exactly_is_taken(tiny_model_dir):
    engine = Engine(str(tiny_model_dir), device=test_device(), kernels="torch", max_model_len=40)
    engine.add_request("fits", [2] + [7] * 35, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("over", [2] + [7] * 36, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(drain(engine)["fits"].outputs[0].token_ids) == 4


def test_max_model_len_ends_at_the_last_learned_position(tiny_model_dir):
    """The tiny model has 256 learned positions: a sequence may fill them all (its last token at
    position 255), and a max_model_len one past them is refused, naming the field, rather than
    indexing past the position table at the last step."""
    engine = Engine(str(tiny_model_dir), device=test_device(), kernels="torch", max_model_len=256)
    engine.add_request("full", [2] + [7] * 247, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    out = drain(engine)["full"].outputs[0]
    assert len(out.token_ids) == 8 and out.finish_reason == "length"
    with pytest.raises(ValueError, match="max_model_len"):
        Engine(str(tiny_model_dir), device=test_device(), kernels="torch", max_model_len=257)


def test_half_precision_logits_are_widened_before_any_softmax(tiny_model_dir):
    """A bfloat16 model's logits reach the log-softmax as float32 (bfloat16 keeps 8 bits: its
    logprobs would be off in the second decimal), on the eager path as into the float32 buffer
    the decode graphs' captured step writes them to (compute_logits with `out`)."""
    llm = LLM(str(tiny_model_dir), "bfloat16", "cpu", "torch")
    model = llm.engine.runner.model
    hidden = torch.randn(3, 64, dtype=torch.bfloat16)
    logits = model.compute_logits(hidden)
    assert logits.dtype == torch.float32
    assert torch.equal(logits, torch.nn.functional.linear(hidden, model.decoder.embed_tokens.weight).float())
    graph_buffer = torch.full((4, logits.shape[1]), float("nan"))
    model.compute_logits(hidden, out=graph_buffer[:3])
    assert torch.equal(graph_buffer[:3], logits) and graph_buffer[3].isnan().all()
    out = llm.generate([[2, 45, 101, 7, 300, 12]], SamplingParams(max_tokens=1, prompt_logprobs=2),
                       use_tqdm=False)[0]
    values = [v for entry in out.prompt_logprobs[1:] for v in entry.values()]
    assert any(v != torch.tensor(v).bfloat16().item() for v in values)   # not rounded to bfloat16


def test_stop_strings_wait_for_min_tokens(llm, tiny_model_dir):
    """A stop string completed before min_tokens tokens are out does not stop the output, and
    is not looked for again (only text that later tokens add is); one completed at or after
    min_tokens stops it as usual, the text cut where that occurrence starts."""
    prompt, greedy = "def main():\n    return", dict(temperature=0, max_tokens=24, ignore_eos=True)
    engine = Engine(str(tiny_model_dir), device=test_device(), kernels="torch")
    engine.add_request("free", prompt, SamplingParams(**greedy))
    texts = [""]                # texts[n]: the text of the first n tokens, as the engine decodes it
    while engine.has_unfinished_requests():
        for out in engine.step():
            texts.append(out.outputs[0].text)
            ids = out.outputs[0].token_ids
    assert len(texts) == 25 and len(ids) == 24
    full = texts[-1]

    def completed(stop: str, after: int = 0) -> int | None:
        """The first token after `after` whose text completes an occurrence of `stop`."""
        return next((n for n in range(after + 1, len(texts))
                     if stop in texts[n][max(0, len(texts[n - 1]) - len(stop) + 1):]), None)
    candidates = [full[i:i + size] for size in (3, 2, 1) for i in range(len(full) - size + 1)
                  if all(c.isascii() and c.isprintable() for c in full[i:i + size])]

    def run(stop: str, min_tokens: int):
        return llm.generate([prompt], SamplingParams(**greedy, stop=[stop], min_tokens=min_tokens),
                            use_tqdm=False)[0].outputs[0]

    # A string found once, completed by token k (2 <= k <= 21, so min_tokens k + 3 fits).
    once = [s for s in candidates if full.count(s) == 1 and 2 <= completed(s) <= 21]
    assert once, f"no printable string occurs once in {full!r}"
    stop = once[0]
    k = completed(stop)
    for min_tokens in (0, k):
        out = run(stop, min_tokens)
        assert (out.token_ids, out.finish_reason) == (ids[:k], "stop"), min_tokens
        assert out.text == full[:full.index(stop)]
    out = run(stop, k + 3)        # its only occurrence came too early: it runs to max_tokens
    assert (out.token_ids, out.finish_reason, out.text) == (ids, "length", full)

    # A string completed at token k1 and next at token k2 >= k1 + 3: with min_tokens k1 + 3 the
    # output stops at k2, cut before the later occurrence.
    twice = [(s, completed(s), completed(s, completed(s))) for s in dict.fromkeys(candidates)]
    twice = [(s, k1, k2) for s, k1, k2 in twice if k2 is not None and k2 >= k1 + 3]
    assert twice, f"no printable string recurs 3 tokens apart in {full!r}"
    stop, k1, k2 = twice[0]
    cut = texts[k2].find(stop, max(0, len(texts[k2 - 1]) - len(stop) + 1))
    assert cut > full.index(stop)
    out = run(stop, k1 + 3)
    assert (out.token_ids, out.finish_reason, out.text) == (ids[:k2], "stop", full[:cut])


def test_the_earliest_stop_string_wins_whichever_is_listed_first(llm):
    """Two stop strings complete in the same step (inside one token's text): the text is cut at
    the one that starts first, not at the one listed first."""
    prompt = "def main():\n    return"
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)[0]
    tok, ids = llm.get_tokenizer(), out.outputs[0].token_ids
    full, pair = out.outputs[0].text, None
    for n in range(1, len(ids) + 1):         # the first token that adds two new, distinct characters
        before, after = tok.decode(ids[:n - 1]), tok.decode(ids[:n])
        piece = after[len(before):]
        fresh = [c for c in dict.fromkeys(piece) if c not in before]
        if after.startswith(before) and len(fresh) >= 2:
            pair = fresh[:2]
            break
    assert pair, f"no token adds two new characters in {full!r}"
    first, second = pair
    cut = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                                                stop=[second, first]), use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.text == full[:full.index(first)]


def test_engine_streams_text_so_far(tiny_model_dir):
    engine = Engine(str(tiny_model_dir), device=test_device(), kernels="torch")
    engine.add_request("r", "import os", SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    texts = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            texts.append(out.outputs[0].text)
    assert len(texts) == 10
    assert all(texts[i + 1].startswith(texts[i]) for i in range(9))
    assert out.finished and texts[-1] == engine.tokenizer.decode(out.outputs[0].token_ids)


def test_bad_requests_fail_alone(tiny_model_dir):
    engine = Engine(str(tiny_model_dir), device=test_device(), kernels="torch", max_model_len=64)
    good = prompts(2, seed=10)
    engine.add_request("good-0", good[0], GREEDY)
    engine.step()
    vocab = engine.vocab_size
    bad = [("empty", [], GREEDY, "prompt"),
           ("oov", [2, vocab], GREEDY, "outside the vocabulary"),
           ("negative", [2, -1], GREEDY, "outside the vocabulary"),
           ("too-long", [2] * 60, SamplingParams(max_tokens=10), "max_model_len"),
           ("float-id", [2, 5.0], GREEDY, "integers"),
           ("bool-id", [2, True], GREEDY, "integers"),     # a bool is an int to isinstance
           ("bool-only", (True,), GREEDY, "integers"),
           ("good-0", good[1], GREEDY, "already in use"),
           ("not-params", good[1], {"temperature": 0}, "SamplingParams"),
           (7, good[1], GREEDY, "request_id must be a str"),
           # bounds SamplingParams cannot know: the model's rows, the tokenizer's vocabulary
           ("stop-id", good[1], SamplingParams(stop_token_ids=[engine.model_config.vocab_size]), "stop_token_ids"),
           ("banned-id", good[1], SamplingParams(banned_token_ids=[engine.model_config.vocab_size]),
            "banned_token_ids"),
           ("logprobs", good[1], SamplingParams(logprobs=vocab + 1), "logprobs"),
           ("prompt-logprobs", good[1], SamplingParams(prompt_logprobs=vocab + 1), "prompt_logprobs")]
    for request_id, prompt, params, message in bad:
        with pytest.raises(ValueError, match=message):
            engine.add_request(request_id, prompt, params)
    engine.add_request("good-1", good[1], GREEDY)
    engine.add_request("good-tuple", tuple(good[1]), GREEDY)
    final = drain(engine)
    assert sorted(final) == ["good-0", "good-1", "good-tuple"]
    assert all(len(o.outputs[0].token_ids) == 12 for o in final.values())
    assert final["good-tuple"].outputs[0].token_ids == final["good-1"].outputs[0].token_ids
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_abort_frees_blocks_and_others_finish(tiny_model_dir):
    engine = Engine(str(tiny_model_dir), device=test_device(), kernels="torch")
    for i, p in enumerate(prompts(5, seed=11)):
        engine.add_request(str(i), p, GREEDY)
    engine.step()
    engine.step()
    aborted = engine.abort_request("2")
    assert aborted.request_id == "2" and aborted.finished
    assert aborted.outputs[0].finish_reason == "abort" and len(aborted.outputs[0].token_ids) == 2
    assert engine.abort_request("2") is None and engine.abort_request("unknown") is None
    with pytest.raises(ValueError, match="request_id must be a str"):
        engine.abort_request(["0"])                             # (unhashable: no such id can exist)
    final = drain(engine)
    assert sorted(final) == ["0", "1", "3", "4"]                # no step reports it again
    assert all(o.outputs[0].finish_reason == "length" for o in final.values())
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    engine.add_request("2", [2, 5], GREEDY)                     # the id is free again


@pytest.mark.parametrize("stream_outputs", [True, False])
def test_an_aborted_request_reports_the_text_of_its_tokens(tiny_model_dir, stream_outputs):
    """Its text is decoded when it ends, streamed or not (not streamed, text was only decoded
    when a sample stopped on its own)."""
    engine = Engine(str(tiny_model_dir), device=test_device(), kernels="torch", stream_outputs=stream_outputs)
    engine.add_request("a", "import os", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    for _ in range(7):
        engine.step()
    out = engine.abort_request("a").outputs[0]
    assert len(out.token_ids) == 7 and out.text == engine.tokenizer.decode(out.token_ids) and out.text


def test_llm_generate_rejects_a_bad_prompt_without_leaving_requests(llm):
    with pytest.raises(ValueError):
        llm.generate([[2, 5, 6], []], GREEDY, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate([[2, 5], [2, 6]], [GREEDY], use_tqdm=False)


def test_an_interrupted_generate_leaves_no_request_behind(tiny_model_dir):
    """Ctrl-C (or any error) in the middle of LLM.generate: its requests leave the engine with
    their blocks, and the next call runs as on a fresh LLM."""
    llm = LLM(str(tiny_model_dir), device=test_device(), kernels="torch")
    batch = prompts(4, seed=12)
    step, steps = llm.engine.step, []

    def interrupted_step():
        steps.append(1)
        if len(steps) == 3:
            raise KeyboardInterrupt
        return step()
    llm.engine.step = interrupted_step
    with pytest.raises(KeyboardInterrupt):
        llm.generate(batch, GREEDY, use_tqdm=False)
    assert not llm.engine.requests and not llm.engine.has_unfinished_requests()
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks
    again = llm.generate(batch, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == [run_alone(tiny_model_dir, p, GREEDY).token_ids for p in batch]


def test_the_engine_keeps_its_own_copy_of_the_params(tiny_model_dir):
    engine = Engine(str(tiny_model_dir), device=test_device(), kernels="torch")
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    engine.add_request("a", [2, 7, 9], params)
    params.max_tokens = 2          # the caller reuses its object for another request
    params.temperature = -3.0      # (not even valid: never read by the engine)
    out = drain(engine)["a"].outputs[0]
    assert len(out.token_ids) == 10


def test_streamed_outputs_are_snapshots(tiny_model_dir):
    """An output already handed out never changes (a server may still be reading it)."""
    engine = Engine(str(tiny_model_dir), device=test_device(), kernels="torch")
    engine.add_request("a", [2, 7, 9, 11], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                                         logprobs=2, prompt_logprobs=1))
    seen = []
    while engine.has_unfinished_requests():
        seen += [(o, len(o.outputs[0].token_ids), list(o.outputs[0].logprobs), list(o.prompt_logprobs))
                 for o in engine.step()]
    assert len(seen) == 6
    for out, length, logprobs, prompt_logprobs in seen:
        assert len(out.outputs[0].token_ids) == length == len(out.outputs[0].logprobs)
        assert out.outputs[0].logprobs == logprobs and out.prompt_logprobs == prompt_logprobs


def test_numpy_token_ids_are_accepted(llm):
    np = pytest.importorskip("numpy")
    prompt = [2, 7, 9, 11]
    out = llm.generate([list(np.array(prompt))], GREEDY, use_tqdm=False)[0]
    assert out.prompt_token_ids == prompt and all(type(t) is int for t in out.prompt_token_ids)
    assert out.outputs[0].token_ids == llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def test_llm_takes_design_arguments_by_position_and_names_unknown_ones(tiny_model_dir):
    """DESIGN.md §3's order: LLM(model, dtype, device, kernels, ...). Engine takes keywords only."""
    llm = LLM(str(tiny_model_dir), "bfloat16", "cpu", "torch")
    assert llm.engine.runner.dtype == torch.bfloat16 and llm.engine.runner.device.type == "cpu"
    assert llm.engine.cfg.kernels == "torch"
    with pytest.raises(ValueError, match="dtype"):
        LLM(str(tiny_model_dir), "float64")
    with pytest.raises(TypeError):
        Engine(str(tiny_model_dir), "float32")
    with pytest.raises(TypeError, match=r"Engine got .*torch_dtype.*use dtype="):
        Engine(str(tiny_model_dir), torch_dtype=torch.float16)
    with pytest.raises(TypeError, match="torch_dtype"):
        LLM(str(tiny_model_dir), torch_dtype=torch.float16)


def test_auto_dtype_is_float16_on_cuda_and_float32_elsewhere(monkeypatch):
    """DESIGN.md §3: dtype "auto" is float16 on CUDA (the published checkpoints' own dtype; not
    bfloat16), float32 on CPU; device None takes CUDA where there is one."""
    from opt_fast.config import EngineConfig
    from opt_fast.engine.model_runner import resolve_device_dtype
    assert resolve_device_dtype(EngineConfig(device="cpu")) == (torch.device("cpu"), torch.float32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = EngineConfig()
    assert resolve_device_dtype(cfg) == (torch.device("cuda"), torch.float16)
    cfg.device = "cuda:0"        # (EngineConfig itself refuses CUDA on a machine without it)
    assert resolve_device_dtype(cfg) == (torch.device("cuda", 0), torch.float16)
    cfg.dtype = "bfloat16"
    assert resolve_device_dtype(cfg) == (torch.device("cuda", 0), torch.bfloat16)


def test_text_prompt_without_tokenizer_is_a_value_error(tmp_path, tiny_model_dir):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((tiny_model_dir / name).read_bytes())
    llm = LLM(str(tmp_path), device=test_device(), kernels="torch")
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate("hello", GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="stop="):     # stop strings would never match
        llm.generate([[2, 7, 9]], SamplingParams(stop=["a"]), use_tqdm=False)
    assert len(llm.generate([[2, 7, 9]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 12


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path, tiny_model_dir):
    """The real OPT tokenizer (50265 ids) beside a tiny model: ids past the embedding's rows
    would fail inside the model (a device-side assert on CUDA), so the engine refuses at once."""
    from opt_testing import OPT_TOKENIZER_DIR
    if not (OPT_TOKENIZER_DIR / "vocab.json").is_file():
        pytest.skip("no OPT tokenizer files beside the project")
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((tiny_model_dir / name).read_bytes())
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((OPT_TOKENIZER_DIR / name).read_bytes())
    with pytest.raises(ValueError, match=r"tokenizer has 50265 ids, the model's embedding only \d+ rows"):
        Engine(str(tmp_path), device=test_device(), kernels="torch")


def test_engine_config_errors_name_the_field(tiny_model_dir):
    with pytest.raises(ValueError, match="block_size"):
        LLM(str(tiny_model_dir), block_size=12)
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(str(tiny_model_dir), max_model_len=10_000)
    with pytest.raises(ValueError, match="kernels"):
        LLM(str(tiny_model_dir), kernels="cuda")
    for name, value in (("seed", -1), ("seed", True), ("gpu_memory_utilization", True), ("enforce_eager", 1)):
        with pytest.raises(ValueError, match=name):
            LLM(str(tiny_model_dir), **{name: value})


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_min_tokens_bans_eos_until_they_are_out(tiny_model_dir, temperature):
    """A model whose every step puts nearly all mass on EOS: alone it stops at once; with
    min_tokens=3 three tokens come first (greedy and sampled, as HF and vLLM count), then EOS
    ends it."""
    engine = Engine(str(tiny_model_dir), device=test_device(), kernels="torch", **eager_on_cuda())
    eos = engine.eos_token_id
    favour(engine.runner, eos)
    prompt = prompts(1, seed=13)[0]
    free = dict(temperature=temperature, max_tokens=8, seed=5)
    engine.add_request("free", prompt, SamplingParams(**free))
    engine.add_request("banned", prompt, SamplingParams(**free, min_tokens=3))
    final = drain(engine)
    assert final["free"].outputs[0].token_ids == [eos]
    banned = final["banned"].outputs[0]
    assert eos not in banned.token_ids[:3] and banned.token_ids[3:] == [eos]
    assert banned.finish_reason == "stop"


def test_logprobs_stay_raw_while_min_tokens_bans_a_stop_token(llm):
    """min_tokens bans a stop token id from the draw, not from the reported raw distribution."""
    prompt = prompts(1, seed=12)[0]
    params = dict(temperature=0, max_tokens=4, logprobs=1, ignore_eos=True)
    free = llm.generate([prompt], SamplingParams(**params), use_tqdm=False)[0].outputs[0]
    banned = llm.generate([prompt], SamplingParams(**{**params, "ignore_eos": False}, min_tokens=4,
                                                   stop_token_ids=[free.token_ids[0]]),
                          use_tqdm=False)[0].outputs[0]
    assert banned.token_ids[0] != free.token_ids[0]
    # the top-1 raw entry still names the banned token with its unchanged logprob
    assert banned.logprobs[0][free.token_ids[0]] == pytest.approx(free.logprobs[0][free.token_ids[0]], abs=1e-5)
