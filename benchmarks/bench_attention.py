"""Prefill attention: the Triton varlen kernel ("triton") against PyTorch SDPA with
`is_causal=True` on a padded batch ("sdpa"), at OPT-1.3B / 6.7B / 13B head shapes.

Every sequence of a batch has the same prompt length and no cached context, so the padded batch
has no padding and both sides do the same causal work. Ours reads q, k, v as the model passes
them (strided views into one packed [tokens, 3, heads, head_dim] tensor); SDPA gets contiguous
[batch, heads, L, head_dim] tensors, its best case. flops count the causal half of QK^T and PV;
bytes_moved counts q, k, v read once and the output written. The goal on H100/H200 is >= 0.9x
SDPA's time at every shape. A second group times the kernel with the KV-cache write inside it
(slot_mapping, as the model runs it) beside write_kv_cache and then the kernel.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarking import DEVICE, ON_GPU, run_benchmark, shapes
from opt_fast.kernels.attention import prefill_attention
from opt_fast.kernels.kv_cache import write_kv_cache

HEADS = {"opt-1.3b": (32, 64), "opt-6.7b": (32, 128), "opt-13b": (40, 128)}
CASES = shapes(
    gpu=[(size, *HEADS[size], batch, length) for size in HEADS
         for batch in (1, 8, 64) for length in (128, 1024, 2048)],
    smoke=[("tiny", 2, 64, 2, 40)])
DTYPE = torch.float16 if ON_GPU else torch.float32


def _case_id(case) -> str:
    size, _, _, batch, length = case
    return f"{size}-b{batch}-L{length}"


@pytest.mark.parametrize("impl", ["triton", "sdpa"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_prefill_attention(benchmark, roofline, case, impl):
    size, heads, head_dim, batch, length = case
    elements = batch * length * heads * head_dim       # of each of q, k, v and the output
    if ON_GPU and 5 * elements * DTYPE.itemsize > torch.cuda.mem_get_info()[0]:
        pytest.skip("not enough free GPU memory for this shape")
    benchmark.group = f"prefill_attention {size} b{batch} L{length}"
    g = torch.Generator(device=DEVICE).manual_seed(0)
    scale = head_dim ** -0.5
    if impl == "sdpa":
        q, k, v = (torch.randn(batch, heads, length, head_dim, generator=g, device=DEVICE, dtype=DTYPE)
                   for _ in range(3))

        def fn():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    else:
        qkv = torch.randn(batch * length, 3, heads, head_dim, generator=g, device=DEVICE, dtype=DTYPE)
        q, k, v = qkv.unbind(1)
        # No cached context: one (never read) cache block and an empty table row per sequence.
        key_cache = torch.full((1, 16, heads, head_dim), float("nan"), device=DEVICE, dtype=DTYPE)
        value_cache = key_cache.clone()
        i32 = dict(dtype=torch.int32, device=DEVICE)
        cu_seqlens = torch.arange(0, batch * length + 1, length, **i32)
        context_lens = torch.zeros(batch, **i32)
        block_tables = torch.zeros(batch, 1, **i32)

        def fn():   # the host knows there is no cached context and the lengths, as the model does
            return prefill_attention(q, k, v, key_cache, value_cache, cu_seqlens, context_lens,
                                     block_tables, scale, max_context_len=0, max_query_len=length)
    run_benchmark(benchmark, fn, bytes_moved=4 * elements * DTYPE.itemsize,
                  flops=4 * batch * heads * head_dim * length ** 2 // 2, roofline=roofline, impl=impl)


# The prefill step's KV write inside the kernel ("triton", slot_mapping) beside write_kv_cache and
# then the kernel ("triton_write_then_attend"): fresh prompts at 6.7B, short and long.
WRITE_CASES = shapes(gpu=[("opt-6.7b", 32, 128, 64, 128), ("opt-6.7b", 32, 128, 8, 1024)],
                     smoke=[("tiny", 2, 64, 2, 40)])


@pytest.mark.parametrize("impl", ["triton", "triton_write_then_attend"])
@pytest.mark.parametrize("case", WRITE_CASES, ids=_case_id)
def test_prefill_attention_with_kv_write(benchmark, roofline, case, impl):
    size, heads, head_dim, batch, length = case
    tokens = batch * length
    elements = tokens * heads * head_dim
    benchmark.group = f"prefill_attention {size} b{batch} L{length}, with the KV write"
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = torch.randn(tokens, 3, heads, head_dim, generator=g, device=DEVICE, dtype=DTYPE).unbind(1)
    # each sequence's tokens in blocks of its own, scattered by a permutation, as the engine holds them
    blocks_per_seq = -(-length // 16)
    perm = torch.randperm(batch * blocks_per_seq, generator=g, device=DEVICE)
    block_tables = perm.view(batch, blocks_per_seq).to(torch.int32)
    key_cache = torch.empty((batch * blocks_per_seq, 16, heads, head_dim), device=DEVICE, dtype=DTYPE)
    value_cache = torch.empty_like(key_cache)
    positions = torch.arange(length, device=DEVICE)
    slots = (block_tables.long()[:, positions // 16] * 16 + positions % 16).flatten()
    i32 = dict(dtype=torch.int32, device=DEVICE)
    args = (q, k, v, key_cache, value_cache, torch.arange(0, tokens + 1, length, **i32), torch.zeros(batch, **i32),
            block_tables, head_dim ** -0.5)
    if impl == "triton":
        def fn():
            return prefill_attention(*args, max_context_len=0, max_query_len=length, slot_mapping=slots)
    else:
        def fn():
            write_kv_cache(k, v, key_cache, value_cache, slots)
            return prefill_attention(*args, max_context_len=0, max_query_len=length)
    # q, k, v read, the output written, and k, v written again into the cache
    run_benchmark(benchmark, fn, bytes_moved=6 * elements * DTYPE.itemsize,
                  flops=4 * batch * heads * head_dim * length ** 2 // 2, roofline=roofline, impl=impl)
