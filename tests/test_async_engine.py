"""AsyncEngine: concurrent streaming clients over one engine loop, aborts, bad input, failures."""
from __future__ import annotations

import asyncio
import threading
import time
from itertools import count

import pytest

from opt_testing import test_device
from opt_fast import LLM, Engine, SamplingParams
from opt_fast.async_engine import AsyncEngine, EngineDeadError

SHORT = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
# Far longer than any test lets it run: a request still alive at the end was not aborted.
LONG = SamplingParams(temperature=0, max_tokens=150, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    """The reference (LLM.generate); its engine, used between LLM calls, also backs the AsyncEngines."""
    return LLM(str(tiny_model_dir), device=test_device(), kernels="torch")


async def collect(aeng: AsyncEngine, prompt, params, **kwargs) -> list:
    return [out async for out in aeng.generate(prompt, params, **kwargs)]


def assert_engine_idle(engine: Engine) -> None:
    assert not engine.has_unfinished_requests()
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_concurrent_clients_stream_what_llm_generate_returns(llm):
    prompts = ["def wrap(text, width", [2, 45, 101, 7, 300], "import os\n", [2, 5]]
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.8, top_k=20, seed=11, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=1.0, top_p=0.9, seed=5, max_tokens=14, repetition_penalty=1.3,
                             ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)]
    expected = llm.generate(prompts, params, use_tqdm=False)
    aeng = AsyncEngine.from_engine(llm.engine)
    loops_seen = set()

    async def client(prompt, p):
        outs = []
        async for out in aeng.generate(prompt, p):
            outs.append(out)
            loops_seen.add(sum(t.get_coro().__qualname__ == "AsyncEngine._run" for t in asyncio.all_tasks()))
        return outs

    async def main():
        return await asyncio.gather(*(client(prompt, p) for prompt, p in zip(prompts, params)))

    streams = asyncio.run(main())
    assert loops_seen == {1}             # one engine loop, however many clients
    for outs, ref in zip(streams, expected):
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
        assert outs[-1].outputs[0].token_ids == ref.outputs[0].token_ids
        assert outs[-1].outputs[0].text == ref.outputs[0].text
        # Streamed: several yields, each extending the one before.
        assert len(outs) > 1
        texts = [o.outputs[0].text for o in outs]
        lengths = [len(o.outputs[0].token_ids) for o in outs]
        assert lengths == sorted(lengths) and lengths[0] < lengths[-1]
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:])) and texts[0] != texts[-1]
    assert_engine_idle(llm.engine)


def test_clients_that_stop_abort_their_requests_and_engine_calls_stay_on_one_thread(llm, monkeypatch):
    engine = llm.engine
    expected = llm.generate([[2, 7, 8], [2, 9]], SHORT, use_tqdm=False)
    threads = set()
    for name in ("add_request", "step", "abort_request", "has_unfinished_requests"):
        method = getattr(engine, name)
        monkeypatch.setattr(engine, name, lambda *a, _m=method: threads.add(threading.get_ident()) or _m(*a))
    aeng = AsyncEngine.from_engine(engine)

    async def breaks_out():
        async for out in aeng.generate([2, 11, 12], LONG):
            if len(out.outputs[0].token_ids) == 2:
                break

    async def main():
        started = asyncio.Event()

        async def cancelled():
            async for _ in aeng.generate([2, 13], LONG):
                started.set()

        victim = asyncio.create_task(cancelled())
        others = asyncio.gather(breaks_out(), collect(aeng, [2, 7, 8], SHORT), collect(aeng, [2, 9], SHORT))
        await started.wait()
        victim.cancel()
        _, first, second = await others
        assert victim.cancelled()
        return first, second

    first, second = asyncio.run(main())
    # the aborts go to the worker thread without a wait; a no-op queued behind them (one
    # worker, first in first out) returns once they have run
    aeng._executor.submit(lambda: None).result()
    assert first[-1].outputs[0].token_ids == expected[0].outputs[0].token_ids
    assert second[-1].outputs[0].token_ids == expected[1].outputs[0].token_ids
    assert len(threads) == 1 and threading.get_ident() not in threads
    assert_engine_idle(engine)


def test_bad_input_raises_to_its_client_only(llm):
    expected = llm.generate([[2, 7, 8]], SHORT, use_tqdm=False)[0]
    aeng = AsyncEngine.from_engine(llm.engine)

    async def main():
        good = asyncio.create_task(collect(aeng, [2, 7, 8], SHORT))
        with pytest.raises(ValueError, match="outside the vocabulary"):
            await collect(aeng, [2, 10**6], SHORT)
        with pytest.raises(ValueError, match="max_model_len"):
            await collect(aeng, [2, 5], SamplingParams(max_tokens=10_000))
        held = aeng.generate([2, 5], SHORT, request_id="same")
        await held.__anext__()
        with pytest.raises(ValueError, match="request_id"):
            await collect(aeng, [2, 6], SHORT, request_id="same")
        with pytest.raises(ValueError, match="request_id must be a str"):
            await collect(aeng, [2, 6], SHORT, request_id=["same"])
        rest = [out async for out in held]
        return await good, rest

    good, rest = asyncio.run(main())
    assert good[-1].outputs[0].token_ids == expected.outputs[0].token_ids
    assert rest[-1].finished
    assert_engine_idle(llm.engine)


def test_a_failing_step_reaches_every_client_and_the_wrapper_stays_dead(tiny_model_dir):
    engine = Engine(str(tiny_model_dir), device=test_device(), kernels="torch")
    real_step, steps = engine.step, count()

    def step():
        if next(steps) == 3:
            raise RuntimeError("device lost")
        return real_step()

    engine.step = step
    aeng = AsyncEngine.from_engine(engine)

    async def main():
        results = await asyncio.gather(*(collect(aeng, [2, i], LONG) for i in (5, 6, 7)),
                                       return_exceptions=True)
        with pytest.raises(EngineDeadError):
            await collect(aeng, [2, 8], SHORT)
        return results

    results = asyncio.run(asyncio.wait_for(main(), timeout=60))    # a hang fails, not blocks
    assert aeng.dead
    for result in results:
        assert isinstance(result, EngineDeadError) and str(result.__cause__) == "device lost"


def test_an_engine_is_reusable_across_event_loops(llm):
    """Each asyncio.run gets LLM.generate's result (a loop that never steps times out)."""
    expected = llm.generate([[2, 7, 8]], SHORT, use_tqdm=False)[0].outputs[0]
    assert len(expected.token_ids) == SHORT.max_tokens
    aeng = AsyncEngine.from_engine(llm.engine)
    for _ in range(2):
        outs = asyncio.run(asyncio.wait_for(collect(aeng, [2, 7, 8], SHORT), timeout=60))
        assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "length"
        assert outs[-1].outputs[0].token_ids == expected.token_ids
        assert len(outs[-1].outputs[0].token_ids) == SHORT.max_tokens
        assert outs[-1].outputs[0].text == expected.text
    assert_engine_idle(llm.engine)


def test_a_reused_request_id_never_gets_the_earlier_requests_outputs(tiny_model_dir):
    """Client A cancels its request "x" while a step runs; client B starts another "x" at once.
    The step's output for A (here its last) must not reach B, and B's own request runs to its
    end under B's eyes (before, B's stream ended on A's result while B's request ran on)."""
    engine = Engine(str(tiny_model_dir), device=test_device(), kernels="torch")
    real_step = engine.step
    engine.step = lambda: (time.sleep(0.2), real_step())[1]     # a step slow enough to cancel in
    aeng = AsyncEngine.from_engine(engine)
    a_params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)

    async def main():
        first = aeng.generate([2, 5, 6], a_params, request_id="x")
        await first.__anext__()
        await first.aclose()
        return await collect(aeng, [2, 9, 10, 11], SHORT, request_id="x")

    outs = asyncio.run(asyncio.wait_for(main(), timeout=60))
    assert all(o.prompt_token_ids == [2, 9, 10, 11] for o in outs)
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == SHORT.max_tokens
    assert_engine_idle(engine)


def test_a_result_finished_before_a_failing_step_still_reaches_its_slow_client(tiny_model_dir):
    engine = Engine(str(tiny_model_dir), device=test_device(), kernels="torch")
    real_step, steps = engine.step, count()

    def step():
        if next(steps) == 3:        # after the short request's last step, before its client reads it
            raise RuntimeError("device lost")
        return real_step()
    engine.step = step
    aeng = AsyncEngine.from_engine(engine)

    async def slow_client():
        outs = []
        async for out in aeng.generate([2, 5], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)):
            outs.append(out)
            await asyncio.sleep(0.5)
        return outs

    async def main():
        return await asyncio.gather(slow_client(), collect(aeng, [2, 6], LONG), return_exceptions=True)

    short, long = asyncio.run(asyncio.wait_for(main(), timeout=60))
    assert isinstance(long, EngineDeadError)
    assert short[-1].finished and len(short[-1].outputs[0].token_ids) == 2


def test_close_ends_streaming_clients_and_frees_the_engine(tiny_model_dir):
    aeng = AsyncEngine(str(tiny_model_dir), device=test_device(), kernels="torch")

    async def scenario():
        received = []

        async def client():
            async for out in aeng.generate([2, 5, 9], LONG):
                received.append(out)
        task = asyncio.create_task(client())
        while not received:
            await asyncio.sleep(0.01)
        await aeng.close()
        with pytest.raises(EngineDeadError, match="closed"):
            await task
        with pytest.raises(EngineDeadError, match="closed"):
            await collect(aeng, [2, 7], SHORT)
        return received

    received = asyncio.run(scenario())
    assert 0 < len(received[-1].outputs[0].token_ids) < LONG.max_tokens
    assert aeng.dead and aeng.engine.runner.model is None
