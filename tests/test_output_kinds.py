"""SamplingParams.output_kind: what a streaming Engine and AsyncEngine return after each step.

"cumulative" (the default) gives every token and the whole text so far; "delta" only what the
request's earlier outputs did not hold, so joining a request's deltas gives the cumulative final
output; "final_only" the finished output alone.
"""
from __future__ import annotations

import asyncio

import pytest

from opt_testing import test_device
from opt_fast import LLM, Engine, SamplingParams
from opt_fast.async_engine import AsyncEngine

PROMPTS = ["def wrap(text, width", "import os\n", [2, 45, 101, 7, 300]]


def kinds_of(params: SamplingParams, kind: str) -> SamplingParams:
    return SamplingParams(**{**params.__dict__, "output_kind": kind})


def joined(deltas: list) -> list[tuple]:
    """Per sample: (token ids, text, logprobs, cumulative logprob, finish reason) of the deltas
    joined in order."""
    samples = []
    for index in range(len(deltas[-1].outputs)):
        parts = [d.outputs[index] for d in deltas]
        logprobs = None if parts[0].logprobs is None else [e for p in parts for e in p.logprobs]
        samples.append(([t for p in parts for t in p.token_ids], "".join(p.text for p in parts), logprobs,
                        parts[-1].cumulative_logprob, parts[-1].finish_reason))
    return samples


def whole(out) -> list[tuple]:
    return [(c.token_ids, c.text, c.logprobs, c.cumulative_logprob, c.finish_reason) for c in out.outputs]


@pytest.fixture(scope="module")
def params(tiny_model_dir):
    """Sampled with logprobs and two samples; greedy with a stop string from the middle of its
    free-running text, so held-back text and the cut at the stop string are streamed too."""
    llm = LLM(str(tiny_model_dir), device=test_device(), kernels="torch")
    free = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].text
    stop = free[len(free) // 2:len(free) // 2 + 3]
    assert stop.strip()
    return [SamplingParams(temperature=0, max_tokens=24, stop=[stop], ignore_eos=True),
            SamplingParams(temperature=0.9, top_k=40, seed=7, n=2, logprobs=2, max_tokens=14, ignore_eos=True),
            SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=0, prompt_logprobs=1)]


def stream_all(engine: Engine, params: list[SamplingParams]) -> dict[str, list]:
    for i, (prompt, p) in enumerate(zip(PROMPTS, params)):
        engine.add_request(str(i), prompt, p)
    outs: dict[str, list] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outs.setdefault(out.request_id, []).append(out)
    return outs


def test_joined_deltas_equal_the_cumulative_outputs(tiny_model_dir, params):
    cumulative = stream_all(Engine(str(tiny_model_dir), device=test_device(), kernels="torch"), params)
    delta = stream_all(Engine(str(tiny_model_dir), device=test_device(), kernels="torch"),
                       [kinds_of(p, "delta") for p in params])
    assert cumulative[str(0)][-1].outputs[0].finish_reason == "stop"
    for request_id, outs in cumulative.items():
        deltas = delta[request_id]
        assert len(deltas) == len(outs) > 3 and deltas[-1].finished
        assert joined(deltas) == whole(outs[-1])
        # each step's delta holds the sampled token of every sample that advanced, no more
        for out in deltas[1:]:
            assert all(len(c.token_ids) <= 1 for c in out.outputs)
        assert deltas[0].prompt_token_ids == outs[0].prompt_token_ids
        # the prompt's logprobs once, in the first delta (every cumulative output repeats them)
        assert deltas[0].prompt_logprobs == outs[-1].prompt_logprobs
        assert all(d.prompt_logprobs is None for d in deltas[1:])
    assert cumulative["2"][-1].prompt_logprobs is not None


def test_a_stop_string_across_tokens_is_never_streamed_in_part(tiny_model_dir):
    """The stop string begins in one token and ends in the next: its first character, held
    back while it could begin the stop string, never goes out in a delta, and the cut text
    is what the deltas join to."""
    engine = Engine(str(tiny_model_dir), device=test_device(), kernels="torch")
    tokenizer = engine.tokenizer
    free = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    ids = LLM(str(tiny_model_dir), device=test_device(), kernels="torch").generate(
        PROMPTS[1], free, use_tqdm=False)[0].outputs[0].token_ids
    text = tokenizer.decode(ids)
    ends = [len(tokenizer.decode(ids[:k])) for k in range(1, len(ids) + 1)]
    # a boundary with a character before it and two after it in the next token, first seen there
    cut = next(b for a, b, c in zip(ends, ends[1:], ends[2:]) if c - b >= 2 and b > a
               and text.find(text[b - 1:b + 2]) == b - 1 and text[b - 1:b + 2].strip())
    stop = text[cut - 1:cut + 2]
    engine.add_request("s", PROMPTS[1], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                        stop=[stop], output_kind="delta"))
    deltas = []
    while engine.has_unfinished_requests():
        deltas += engine.step()
    assert "".join(d.outputs[0].text for d in deltas) == text[:cut - 1]
    assert deltas[-1].outputs[0].finish_reason == "stop"


def test_final_only_streams_nothing_before_the_end(tiny_model_dir, params):
    outs = stream_all(Engine(str(tiny_model_dir), device=test_device(), kernels="torch"),
                      [kinds_of(p, "final_only") for p in params])
    reference = LLM(str(tiny_model_dir), device=test_device(), kernels="torch").generate(PROMPTS, params,
                                                                                        use_tqdm=False)
    for i, ref in enumerate(reference):
        assert [o.finished for o in outs[str(i)]] == [True]
        assert whole(outs[str(i)][0]) == whole(ref)


def test_llm_generate_returns_whole_outputs_for_every_kind(tiny_model_dir, params):
    llm = LLM(str(tiny_model_dir), device=test_device(), kernels="torch")
    want = [whole(o) for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    for kind in ("delta", "final_only"):
        got = llm.generate(PROMPTS, [kinds_of(p, kind) for p in params], use_tqdm=False)
        assert [whole(o) for o in got] == want


def test_llm_generate_returns_whole_outputs_on_an_engine_an_async_engine_streams(tiny_model_dir, params):
    llm = LLM(str(tiny_model_dir), device=test_device(), kernels="torch")
    want = [whole(o) for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    AsyncEngine.from_engine(llm.engine)             # which makes its engine stream
    got = llm.generate(PROMPTS, [kinds_of(p, "delta") for p in params], use_tqdm=False)
    assert [whole(o) for o in got] == want


def test_an_aborted_delta_request_returns_what_it_had_not_sent(tiny_model_dir):
    engine = Engine(str(tiny_model_dir), device=test_device(), kernels="torch")
    engine.add_request("a", [2, 9, 10], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                        output_kind="delta"))
    sent = [t for _ in range(4) for out in engine.step() for t in out.outputs[0].token_ids]
    final = engine.abort_request("a")
    assert final.finished and final.outputs[0].finish_reason == "abort"
    assert final.outputs[0].token_ids == [] and len(sent) == 4


def test_a_slow_async_client_gets_every_delta_merged(tiny_model_dir, params):
    """The AsyncEngine keeps only a request's newest output: deltas a client has not read yet
    are merged into it, so nothing is lost however slowly it reads."""
    llm = LLM(str(tiny_model_dir), device=test_device(), kernels="torch")
    reference = llm.generate(PROMPTS, params, use_tqdm=False)
    aeng = AsyncEngine.from_engine(llm.engine)

    async def client(prompt, p, pause):
        outs = []
        async for out in aeng.generate(prompt, kinds_of(p, "delta")):
            outs.append(out)
            await asyncio.sleep(pause)      # steps go on meanwhile
        return outs

    async def main():
        return await asyncio.gather(*(client(prompt, p, 0.05 * i) for i, (prompt, p) in enumerate(zip(PROMPTS, params))))

    streams = asyncio.run(asyncio.wait_for(main(), timeout=120))
    for outs, ref in zip(streams, reference):
        assert joined(outs) == whole(ref)
        # the prompt's logprobs survive the merge, in the first output the client reads
        assert outs[0].prompt_logprobs == ref.prompt_logprobs
        assert all(out.prompt_logprobs is None for out in outs[1:])
    # the slowest reader got merged deltas (a step adds one token per sample)
    assert any(len(c.token_ids) > 1 for out in streams[2] for c in out.outputs)


def test_output_kind_is_checked():
    with pytest.raises(ValueError, match="output_kind"):
        SamplingParams(output_kind="stream")


def test_merged_deltas_keep_the_first_ones_prompt_logprobs():
    """The AsyncEngine's merge of two unread deltas: tokens, text and logprobs joined, the later
    state otherwise, and the prompt's logprobs (sent in the first delta only) kept."""
    from opt_fast.async_engine import _merged
    from opt_fast.outputs import CompletionOutput, RequestOutput
    prompt_logprobs = [None, {7: -1.5}]
    first = RequestOutput("r", "p", [2, 7], prompt_logprobs, [CompletionOutput(0, "a", [5], -0.5, [{5: -0.5}])])
    second = RequestOutput("r", "p", [2, 7], None, [CompletionOutput(0, "b", [6], -1.0, [{6: -0.5}], "length")],
                           finished=True)
    merged = _merged(first, second)
    assert merged.prompt_logprobs == prompt_logprobs and merged.finished
    assert merged.outputs == [CompletionOutput(0, "ab", [5, 6], -1.0, [{5: -0.5}, {6: -0.5}], "length")]
