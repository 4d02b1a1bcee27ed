"""Decode attention over the paged KV cache: the Triton kernel ("triton") against the gather
reference ("torch_gather", `paged_decode_attention_ref`) and against PyTorch SDPA on a contiguous
cache ("sdpa", what a non-paged runtime would run), at OPT-1.3B / 6.7B / 13B head shapes.

Every sequence of a batch holds `context` tokens in blocks of 16, scattered by a random
permutation. The kernel is a GEMV bound by memory: bytes_moved counts K and V read once for all
context tokens, plus q and the output; the target on H100/H200 is >= 70% of measured copy
bandwidth at 6.7B, batch 64, context 1024. A second group times the kernel over a float8 cache
(kv_cache_dtype="fp8") beside the same kernel over a cache of the query's dtype.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarking import DEVICE, ON_GPU, run_benchmark, shapes
from opt_fast.kernels.paged_decode import paged_decode_attention, paged_decode_attention_ref

BLOCK_SIZE = 16
HEADS = {"opt-1.3b": (32, 64), "opt-6.7b": (32, 128), "opt-13b": (40, 128)}
# The gather reference materialises every sequence's K and V, in float32, several times over
# (gather, upcast, mask, einsum): about 20 bytes per cached element of K plus V.
GATHER_LIMIT_BYTES = 8 << 30

CASES = shapes(
    gpu=[(size, *HEADS[size], batch, context) for size in HEADS
         for batch in (1, 8, 64, 256) for context in (128, 1024, 2048)],
    smoke=[("tiny", 2, 64, 3, 40)])
DTYPE = torch.float16 if ON_GPU else torch.float32


def _case_id(case) -> str:
    size, _, _, batch, context = case
    return f"{size}-b{batch}-ctx{context}"


@pytest.mark.parametrize("impl", ["triton", "torch_gather", "sdpa"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_paged_decode(benchmark, roofline, case, impl):
    size, heads, head_dim, batch, context = case
    elements = batch * context * heads * head_dim          # of K, and again of V
    if impl == "torch_gather" and 2 * elements * 10 > GATHER_LIMIT_BYTES:
        pytest.skip("the gather reference would need more than 8 GB")
    benchmark.group = f"paged_decode {size} b{batch} ctx{context}"
    g = torch.Generator(device=DEVICE).manual_seed(0)
    scale = head_dim ** -0.5
    q = torch.randn(batch, heads, head_dim, generator=g, device=DEVICE, dtype=DTYPE)
    if impl == "sdpa":
        keys = torch.randn(batch, heads, context, head_dim, generator=g, device=DEVICE, dtype=DTYPE)
        values = torch.randn_like(keys)
        query = q[:, :, None]

        def fn():
            return F.scaled_dot_product_attention(query, keys, values, scale=scale)
    else:
        op = paged_decode_attention if impl == "triton" else paged_decode_attention_ref
        fn = _paged_call(op, q, g, context, DTYPE, scale)
    itemsize = DTYPE.itemsize
    run_benchmark(benchmark, fn, bytes_moved=(2 * elements + 2 * batch * heads * head_dim) * itemsize,
                  flops=4 * elements, roofline=roofline, impl=impl)


def _paged_call(op, q, g, context: int, cache_dtype: torch.dtype, scale: float):
    """A call of `op` for q's sequences, each holding `context` tokens in scattered blocks."""
    batch, heads, head_dim = q.shape
    blocks_per_seq = -(-context // BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, BLOCK_SIZE, heads, head_dim)
    key_cache = torch.randn(shape, generator=g, device=DEVICE, dtype=q.dtype).to(cache_dtype)
    value_cache = torch.randn(shape, generator=g, device=DEVICE, dtype=q.dtype).to(cache_dtype)
    perm = torch.randperm(num_blocks, generator=g, device=DEVICE)
    block_tables = perm.view(batch, blocks_per_seq).to(torch.int32)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=DEVICE)
    return lambda: op(q, key_cache, value_cache, block_tables, seq_lens, scale)


# kv_cache_dtype="fp8": the same kernel over a float8 cache ("triton") beside a cache of the
# query's dtype ("triton_same_dtype_cache"), at the goal shape and the largest one.
FP8_CASES = shapes(gpu=[("opt-6.7b", 32, 128, 64, 1024), ("opt-13b", 40, 128, 64, 2048)],
                   smoke=[("tiny", 2, 64, 3, 40)])


@pytest.mark.parametrize("impl", ["triton", "triton_same_dtype_cache"])
@pytest.mark.parametrize("case", FP8_CASES, ids=_case_id)
def test_paged_decode_float8_cache(benchmark, roofline, case, impl):
    size, heads, head_dim, batch, context = case
    benchmark.group = f"paged_decode {size} b{batch} ctx{context}, float8 cache"
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q = torch.randn(batch, heads, head_dim, generator=g, device=DEVICE, dtype=DTYPE)
    cache_dtype = torch.float8_e4m3fn if impl == "triton" else DTYPE
    fn = _paged_call(paged_decode_attention, q, g, context, cache_dtype, head_dim ** -0.5)
    elements = batch * context * heads * head_dim
    run_benchmark(benchmark, fn, bytes_moved=2 * elements * cache_dtype.itemsize + 2 * q.numel() * DTYPE.itemsize,
                  flops=4 * elements, roofline=roofline, impl=impl)
