"""Decode attention over the paged KV cache: the Triton kernel ("triton") against the gather
reference ("torch_gather", `paged_decode_attention_ref`) and against PyTorch SDPA on a contiguous
cache ("sdpa", what a non-paged runtime would run), at OPT-1.3B / 6.7B / 13B head shapes.

Every sequence of a batch holds `context` tokens in blocks of 16, scattered by a random
permutation. The kernel is a GEMV bound by memory: bytes_moved counts K and V read once for all
context tokens, plus q and the output; the target on H100/H200 is >= 70% of measured copy
bandwidth at 6.7B, batch 64, context 1024. A second group times the kernel over a float8 cache
(kv_cache_dtype="fp8") beside the same kernel over a cache of the query's dtype; a third the
decode step's KV write fused into the kernel (new_kv, as the model runs it) beside the write as
its own launch before it.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarking import DEVICE, ON_GPU, run_benchmark, shapes
from opt_fast.kernels.kv_cache import write_kv_cache
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


def _paged_call(op, q, g, context: int, cache_dtype: torch.dtype, scale: float, write_new: str | None = None):
    """A call of `op` for q's sequences, each holding `context` tokens in scattered blocks.
    write_new: "fused" passes the current tokens' keys and values as new_kv, "apart" stores
    them with write_kv_cache first (what the model did before the store was fused)."""
    batch, heads, head_dim = q.shape
    blocks_per_seq = -(-context // BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, BLOCK_SIZE, heads, head_dim)
    key_cache = torch.randn(shape, generator=g, device=DEVICE, dtype=q.dtype).to(cache_dtype)
    value_cache = torch.randn(shape, generator=g, device=DEVICE, dtype=q.dtype).to(cache_dtype)
    perm = torch.randperm(num_blocks, generator=g, device=DEVICE)
    block_tables = perm.view(batch, blocks_per_seq).to(torch.int32)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=DEVICE)
    if write_new is None:
        return lambda: op(q, key_cache, value_cache, block_tables, seq_lens, scale)
    # the current token is each sequence's last position, strided out of a packed qkv as in the model
    _, key, value = torch.randn(batch, 3, heads, head_dim, generator=g, device=DEVICE, dtype=q.dtype).unbind(1)
    last = context - 1
    slots = block_tables[:, last // BLOCK_SIZE].long() * BLOCK_SIZE + last % BLOCK_SIZE
    if write_new == "fused":
        return lambda: op(q, key_cache, value_cache, block_tables, seq_lens, scale, new_kv=(key, value, slots))

    def write_then_decode():
        write_kv_cache(key, value, key_cache, value_cache, slots)
        return op(q, key_cache, value_cache, block_tables, seq_lens, scale)
    return write_then_decode


# Two variants of the kernel, each beside its own peer at the shapes it serves:
# - "float8 cache" (kv_cache_dtype="fp8"): the kernel over a float8 cache ("triton") beside a
#   cache of the query's dtype ("triton_same_dtype_cache"), at the goal shape and the largest one;
# - "with the KV write": the decode step's write inside the kernel ("triton", new_kv, as the model
#   runs it) beside write_kv_cache and then the kernel ("triton_write_then_decode"), at
#   decode-step batches of 1.3B and 6.7B.
PEERS = {"float8 cache": "triton_same_dtype_cache", "with the KV write": "triton_write_then_decode"}
VARIANT_CASES = [(variant, case) for variant, cases in (
    ("float8 cache", shapes(gpu=[("opt-6.7b", 32, 128, 64, 1024), ("opt-13b", 40, 128, 64, 2048)],
                            smoke=[("tiny", 2, 64, 3, 40)])),
    ("with the KV write", shapes(gpu=[("opt-1.3b", 32, 64, 64, 1024), ("opt-6.7b", 32, 128, 8, 1024)],
                                 smoke=[("tiny", 2, 64, 3, 40)]))) for case in cases]


@pytest.mark.parametrize("impl", ["triton", "peer"])
@pytest.mark.parametrize("variant,case", VARIANT_CASES, ids=lambda x: x if isinstance(x, str) else _case_id(x))
def test_paged_decode_variant(benchmark, roofline, variant, case, impl):
    size, heads, head_dim, batch, context = case
    benchmark.group = f"paged_decode {size} b{batch} ctx{context}, {variant}"
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q = torch.randn(batch, heads, head_dim, generator=g, device=DEVICE, dtype=DTYPE)
    ours = impl == "triton"
    cache_dtype = torch.float8_e4m3fn if variant == "float8 cache" and ours else DTYPE
    write_new = ("fused" if ours else "apart") if variant == "with the KV write" else None
    fn = _paged_call(paged_decode_attention, q, g, context, cache_dtype, head_dim ** -0.5, write_new)
    elements = batch * context * heads * head_dim
    # K and V read; q and the output; the new key and value read and written where there are some
    small = (6 if write_new else 2) * q.numel() * DTYPE.itemsize
    run_benchmark(benchmark, fn, bytes_moved=2 * elements * cache_dtype.itemsize + small, flops=4 * elements,
                  roofline=roofline, impl=impl if ours else PEERS[variant])
