"""kv_cache_dtype="fp8": the engine keeps its KV cache in float8 e4m3 (a quarter of float32's
bytes per block, half of float16's), the Triton kernels and the torch references read and write
it alike, and only what is read back from the cache changes: a prompt's own prefill attends to
its unrounded keys, later steps to the rounded ones."""
from __future__ import annotations

import pytest
import torch

from opt_testing import test_device
from opt_fast import LLM, Engine, SamplingParams


def generate(model_dir, kernels: str, kv_cache_dtype: str, device: str = "cpu", **kwargs):
    llm = LLM(str(model_dir), device=device, kernels=kernels, kv_cache_dtype=kv_cache_dtype, progress=False, **kwargs)
    prompts = [[2] + list(range(5, 44)), [2] + list(range(60, 71)), [2, 9]]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1, prompt_logprobs=1)
    outs = llm.generate(prompts, params, use_tqdm=False)
    return llm, outs


def token_logprobs(out) -> list[float]:
    completion = out.outputs[0]
    return [step[token] for step, token in zip(completion.logprobs, completion.token_ids)]


@pytest.mark.parametrize("chunk", [None, 16], ids=["whole-prompts", "chunked-prompts"])
def test_the_triton_kernels_and_the_torch_references_agree_on_a_float8_cache(tiny_model_dir, chunk):
    """Chunked, a prompt's later chunks attend to its earlier ones through the float8 cache
    (prefill attention's context path), besides every decode step. On the test device: Triton
    on CPU needs the interpreter, which a CUDA machine's tests do not run."""
    limits = {} if chunk is None else dict(max_num_batched_tokens=chunk, max_num_seqs=chunk)
    limits.update(device=test_device(), dtype="float32")
    _, ours = generate(tiny_model_dir, "triton", "fp8", **limits)
    llm, reference = generate(tiny_model_dir, "torch", "fp8", **limits)
    assert llm.engine.runner.kv_cache.dtype == torch.float8_e4m3fn
    for a, b in zip(ours, reference):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert token_logprobs(a) == pytest.approx(token_logprobs(b), abs=1e-4)


def test_only_what_is_read_back_from_a_float8_cache_changes(tiny_model_dir):
    """The prompt's logprobs (one prefill, its keys unrounded) and the first token match the
    full-precision cache; later tokens' logprobs move, a little."""
    _, fp8 = generate(tiny_model_dir, "torch", "fp8")
    _, full = generate(tiny_model_dir, "torch", "auto")
    moved = 0.0
    for a, b in zip(fp8, full):
        assert [e and sorted(e.items()) for e in a.prompt_logprobs] == [e and sorted(e.items()) for e in b.prompt_logprobs]
        assert a.outputs[0].token_ids[0] == b.outputs[0].token_ids[0]
        assert token_logprobs(a)[0] == token_logprobs(b)[0]
        steps = min(len(token_logprobs(a)), len(token_logprobs(b)))
        agree = next((i for i, (x, y) in enumerate(zip(a.outputs[0].token_ids, b.outputs[0].token_ids)) if x != y),
                     steps)
        diffs = [abs(x - y) for x, y in zip(token_logprobs(a)[1:agree], token_logprobs(b)[1:agree])]
        assert all(d < 0.25 for d in diffs), diffs
        moved = max([moved] + diffs)
    assert moved > 0, "no decode step read a rounded key: the cache was not float8"


def test_a_float8_block_takes_a_quarter_of_the_float32_bytes(tiny_model_dir):
    fp8 = Engine(str(tiny_model_dir), device="cpu", kernels="torch", kv_cache_dtype="fp8_e4m3", progress=False)
    full = Engine(str(tiny_model_dir), device="cpu", kernels="torch", progress=False)
    assert fp8.runner.kv_cache.element_size() == 1 and full.runner.kv_cache.element_size() == 4
    assert fp8.runner._bytes_per_block() * 4 == full.runner._bytes_per_block()


@pytest.mark.parametrize("value", ["int8", "fp8_e5m2", "float16", None, 8])
def test_kv_cache_dtype_is_checked(tiny_model_dir, value):
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLM(str(tiny_model_dir), device="cpu", kv_cache_dtype=value, progress=False)
