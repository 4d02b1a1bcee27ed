"""Prefill attention over packed variable-length sequences, with and without cached context.

The new tokens' keys and values come from the k, v arguments; the context (context_lens[i] tokens
before them) is read through the block table from a NaN-poisoned cache in which only the context
slots hold data: the new tokens' own slots stay NaN, so an implementation must take them from k, v
and must not read past a sequence's context in the cache.
"""
from __future__ import annotations

import pytest
import torch

from kernel_testing import (DEVICE, DTYPES, OPS, PagedCache, assert_close_to, gen, naive_causal_attention,
                            packed_qkv, randn, stored_by_hand)


def run_prefill(ops, seqs: list[tuple[int, int]], block_size: int, heads: int, head_dim: int,
                dtype: torch.dtype, seed: int, scale: float | None = None, own_v: bool = False):
    """seqs: (context_len, new_len) per sequence; `scale` head_dim ** -0.5 unless given; `own_v`:
    v a tensor of its own (packed_qkv). Returns (output, expected float64)."""
    g = gen(seed)
    total_new = sum(n for _, n in seqs)
    q, k, v = packed_qkv(total_new, heads, head_dim, g, dtype, own_v=own_v)
    cache = PagedCache([c + n for c, n in seqs], block_size, heads, head_dim, dtype, g)
    scale = head_dim ** -0.5 if scale is None else scale
    cu, expected, start = [0], [], 0
    for i, (context, new) in enumerate(seqs):
        ctx_k = randn(context, heads, head_dim, g=g, dtype=dtype)
        ctx_v = randn(context, heads, head_dim, g=g, dtype=dtype)
        cache.store(i, ctx_k, ctx_v)
        s, e = start, start + new
        keys = torch.cat([ctx_k, k[s:e]])
        values = torch.cat([ctx_v, v[s:e]])
        expected.append(naive_causal_attention(q[s:e], keys, values, scale, query_start=context))
        start = e
        cu.append(start)
    out = ops.prefill_attention(
        q, k, v, cache.key_cache, cache.value_cache,
        torch.tensor(cu, dtype=torch.int32, device=DEVICE),
        torch.tensor([c for c, _ in seqs], dtype=torch.int32, device=DEVICE),
        cache.block_tables, scale)
    assert out.shape == q.shape and out.dtype == dtype
    return out, torch.cat(expected)


# plain prefill: no context; lengths 1, block_size +- 1, just past a power of two
@pytest.mark.parametrize("ops", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_prefill_no_context(ops, dtype, block_size, head_dim):
    lengths = [1, block_size - 1, block_size + 1, 33, 2]
    seqs = [(0, n) for n in lengths]
    out, expected = run_prefill(ops, seqs, block_size, 2, head_dim, dtype, seed=block_size + head_dim)
    assert_close_to(out, expected, dtype, scale=1.0)


# chunked prefill / recompute: context already cached, of lengths 1, block_size +- 1, 2**k + 1
@pytest.mark.parametrize("ops", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_prefill_with_context(ops, dtype, block_size, head_dim):
    seqs = [(1, 5), (block_size - 1, 1), (block_size + 1, 3), (65, 7), (0, 4), (block_size, block_size + 1)]
    out, expected = run_prefill(ops, seqs, block_size, 2, head_dim, dtype, seed=3 * block_size + head_dim)
    assert_close_to(out, expected, dtype, scale=1.0)


# Every other test passes head_dim ** -0.5 and a v of k's strides (the model's packed qkv): a
# launcher that ignored its scale argument, or read v with k's strides, would pass them all.
@pytest.mark.parametrize("ops", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 80])
def test_prefill_takes_its_scale_and_the_strides_of_v(ops, dtype, head_dim):
    seqs = [(0, 9), (17, 5), (1, 1), (0, 20)]
    out, expected = run_prefill(ops, seqs, 16, 2, head_dim, dtype, seed=head_dim + 5, scale=0.3, own_v=True)
    assert_close_to(out, expected, dtype, scale=1.0)


@pytest.mark.parametrize("ops", OPS)
def test_prefill_single_sequence_many_heads(ops):
    out, expected = run_prefill(ops, [(17, 23)], 16, 5, 80, torch.float32, seed=1)
    assert_close_to(out, expected, torch.float32, scale=1.0)


@pytest.mark.parametrize("ops", OPS)
def test_prefill_output_does_not_depend_on_other_sequences(ops):
    """The same sequence, alone or packed between others, gives the same rows."""
    g = gen(4)
    heads, head_dim, block_size = 2, 64, 16
    q, k, v = packed_qkv(30, heads, head_dim, g, torch.float32)
    key_cache = torch.full((6, block_size, heads, head_dim), float("nan"), device=DEVICE)
    value_cache = key_cache.clone()
    tables = torch.tensor([[0, 1], [2, 3], [4, 5]], dtype=torch.int32, device=DEVICE)
    scale = head_dim ** -0.5
    both = ops.prefill_attention(q, k, v, key_cache, value_cache,
                                 torch.tensor([0, 9, 21, 30], dtype=torch.int32, device=DEVICE),
                                 torch.zeros(3, dtype=torch.int32, device=DEVICE), tables, scale)
    alone = ops.prefill_attention(q[9:21], k[9:21], v[9:21], key_cache, value_cache,
                                  torch.tensor([0, 12], dtype=torch.int32, device=DEVICE),
                                  torch.zeros(1, dtype=torch.int32, device=DEVICE), tables[1:2], scale)
    torch.testing.assert_close(both[9:21], alone, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("ops", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_with_slot_mapping_stores_the_new_tokens(ops, dtype):
    """slot_mapping: the step's KV write inside the prefill op. Each new token lands in its slot
    as write_kv_cache_ref puts it (a padding token, slot -1, nowhere), the rest of the cache is
    untouched, and the output is the one without it."""
    seqs, block_size, heads, head_dim = [(9, 20), (0, 33), (17, 1)], 8, 2, 80
    g = gen(9)
    q, k, v = packed_qkv(sum(n for _, n in seqs), heads, head_dim, g, dtype)
    cache = PagedCache([c + n for c, n in seqs], block_size, heads, head_dim, dtype, g)
    for i, (context, _) in enumerate(seqs):
        cache.store(i, randn(context, heads, head_dim, g=g, dtype=dtype),
                    randn(context, heads, head_dim, g=g, dtype=dtype))
    slots = [cache.slot(i, pos) for i, (context, new) in enumerate(seqs) for pos in range(context, context + new)]
    slots[7] = -1
    slots = torch.tensor(slots, dtype=torch.int64, device=DEVICE)
    expect_k, expect_v = stored_by_hand(cache.key_cache, k, slots), stored_by_hand(cache.value_cache, v, slots)
    i32 = dict(dtype=torch.int32, device=DEVICE)
    args = (q, k, v, cache.key_cache, cache.value_cache, torch.tensor([0, 20, 53, 54], **i32),
            torch.tensor([c for c, _ in seqs], **i32), cache.block_tables, head_dim ** -0.5)
    plain = ops.prefill_attention(*args)
    out = ops.prefill_attention(*args, slot_mapping=slots)
    torch.testing.assert_close(cache.key_cache, expect_k, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(cache.value_cache, expect_v, atol=0, rtol=0, equal_nan=True)
    assert torch.equal(out, plain)


@pytest.mark.parametrize("ops", OPS)
def test_prefill_stores_only_the_tokens_of_its_sequences(ops):
    """Tokens packed before cu_seqlens_q[0] or from cu_seqlens_q[-1] on belong to no sequence:
    their slots are not written, even where they are >= 0."""
    g = gen(12)
    q, k, v = packed_qkv(40, 1, 64, g, torch.float32)
    key_cache = torch.full((8, 8, 1, 64), float("nan"), device=DEVICE)
    value_cache = key_cache.clone()
    slots = torch.arange(40, dtype=torch.int64, device=DEVICE)
    i32 = dict(dtype=torch.int32, device=DEVICE)
    tables = torch.tensor([[0, 1], [2, 3]], **i32)
    # sequences at tokens 5..15 and 15..30, in blocks 0-1 and 2-3: slots 5..29 are theirs
    ops.prefill_attention(q, k, v, key_cache, value_cache, torch.tensor([5, 15, 30], **i32),
                          torch.zeros(2, **i32), tables, 0.125, slot_mapping=slots)
    flat_k, flat_v = key_cache.view(-1, 1, 64), value_cache.view(-1, 1, 64)
    assert torch.equal(flat_k[5:30], k[5:30]) and torch.equal(flat_v[5:30], v[5:30])
    assert flat_k[:5].isnan().all() and flat_k[30:].isnan().all()
    assert flat_v[:5].isnan().all() and flat_v[30:].isnan().all()
