"""Decode attention over the paged KV cache (one query per sequence), against a naive float64
softmax over each sequence's keys gathered token by token through its block table."""
from __future__ import annotations

import pytest
import torch

from kernel_testing import (DEVICE, DTYPES, OPS, PagedCache, assert_close_to, fused_write_case, gen,
                            naive_causal_attention, packed_qkv, randn, stored_by_hand)


def decode_case(seq_lens: list[int], block_size: int, heads: int, head_dim: int, dtype: torch.dtype, seed: int):
    """A poisoned cache holding seq_lens[i] tokens of sequence i; q strided from a packed qkv."""
    g = gen(seed)
    q, _, _ = packed_qkv(len(seq_lens), heads, head_dim, g, dtype)
    cache = PagedCache(seq_lens, block_size, heads, head_dim, dtype, g)
    keys, values = [], []
    for i, n in enumerate(seq_lens):
        keys.append(randn(n, heads, head_dim, g=g, dtype=dtype))
        values.append(randn(n, heads, head_dim, g=g, dtype=dtype))
        cache.store(i, keys[-1], values[-1])
    return q, cache, keys, values


@pytest.mark.parametrize("ops", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_paged_decode_matches_naive(ops, dtype, block_size, head_dim):
    # 1, block_size +- 1, a full block, just past powers of two, a long-ish one
    seq_lens = [1, block_size - 1, block_size, block_size + 1, 33, 129, 3 * block_size + 5]
    heads = 3
    q, cache, keys, values = decode_case(seq_lens, block_size, heads, head_dim, dtype,
                                         seed=block_size * 7 + head_dim)
    scale = head_dim ** -0.5
    out = ops.paged_decode_attention(q, cache.key_cache, cache.value_cache, cache.block_tables,
                                     torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), scale)
    assert out.shape == q.shape and out.dtype == dtype
    expected = torch.cat([naive_causal_attention(q[i:i + 1], keys[i], values[i], scale, query_start=n - 1)
                          for i, n in enumerate(seq_lens)])
    assert_close_to(out, expected, dtype, scale=1.0)


# Every other test passes head_dim ** -0.5: a launcher that ignored its scale would pass them.
@pytest.mark.parametrize("ops", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_decode_takes_its_scale(ops, dtype):
    seq_lens = [1, 17, 40]
    q, cache, keys, values = decode_case(seq_lens, 16, 2, 80, dtype, seed=29)
    out = ops.paged_decode_attention(q, cache.key_cache, cache.value_cache, cache.block_tables,
                                     torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), 0.3)
    expected = torch.cat([naive_causal_attention(q[i:i + 1], keys[i], values[i], 0.3, query_start=n - 1)
                          for i, n in enumerate(seq_lens)])
    assert_close_to(out, expected, dtype, scale=1.0)


@pytest.mark.parametrize("ops", OPS)
def test_paged_decode_many_sequences_few_heads(ops):
    """More sequences than a split heuristic would split for, all of different lengths."""
    seq_lens = [5, 1, 77, 16, 31, 2, 64, 65, 9, 40, 3]
    q, cache, keys, values = decode_case(seq_lens, 16, 1, 80, torch.float16, seed=21)
    out = ops.paged_decode_attention(q, cache.key_cache, cache.value_cache, cache.block_tables,
                                     torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), 80 ** -0.5)
    expected = torch.cat([naive_causal_attention(q[i:i + 1], keys[i], values[i], 80 ** -0.5, n - 1)
                          for i, n in enumerate(seq_lens)])
    assert_close_to(out, expected, torch.float16, scale=1.0)


@pytest.mark.parametrize("ops", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size,head_dim", [(8, 64), (16, 80), (32, 128)])
@pytest.mark.parametrize("length", [1, 15, 17, 33])
def test_decode_of_last_token_equals_last_row_of_prefill(ops, dtype, block_size, head_dim, length):
    """The same sequence three ways: a plain prefill over all its tokens, a chunked prefill of
    the last token over the cached others, and a decode of the last token over the cache."""
    heads = 2
    g = gen(length * 100 + block_size + head_dim)
    q, k, v = packed_qkv(length, heads, head_dim, g, dtype)
    cache = PagedCache([length], block_size, heads, head_dim, dtype, g)
    scale = head_dim ** -0.5
    i32 = dict(dtype=torch.int32, device=DEVICE)

    full = ops.prefill_attention(q, k, v, cache.key_cache, cache.value_cache,
                                 torch.tensor([0, length], **i32), torch.tensor([0], **i32),
                                 cache.block_tables, scale)
    cache.store(0, k, v)
    chunked = ops.prefill_attention(q[-1:], k[-1:], v[-1:], cache.key_cache, cache.value_cache,
                                    torch.tensor([0, 1], **i32), torch.tensor([length - 1], **i32),
                                    cache.block_tables, scale)
    decoded = ops.paged_decode_attention(q[-1:], cache.key_cache, cache.value_cache, cache.block_tables,
                                         torch.tensor([length], **i32), scale)
    # all three are float32-accumulated results of the same inputs: one output rounding apart
    atol, rtol = (1e-6, 1e-6) if dtype == torch.float32 else (1e-3, 1e-3)
    torch.testing.assert_close(decoded, full[-1:], atol=atol, rtol=rtol)
    torch.testing.assert_close(chunked, full[-1:], atol=atol, rtol=rtol)
    expected = naive_causal_attention(q, k, v, scale, query_start=0)
    assert_close_to(full, expected, dtype, scale=1.0)


@pytest.mark.parametrize("ops", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size,head_dim", [(8, 64), (16, 80), (32, 128)])
def test_decode_with_new_kv_stores_then_reads_the_current_tokens(ops, dtype, block_size, head_dim):
    """new_kv: the step's KV write inside the decode op. The current tokens land in their slots
    exactly as write_kv_cache puts them, nothing else in the cache changes, and the output is
    attention over every position, the current one included; a row with slot -1 stores
    nothing and still attends to its current token, not to what the cache holds there."""
    seq_lens = [1, block_size, block_size + 1, 37, 2 * block_size + 3]
    q, cache, new_kv, keys, values = fused_write_case(seq_lens, block_size, 3, head_dim, dtype,
                                                      seed=block_size + head_dim, unstored=(3,))
    new_keys, new_values, slots = new_kv
    expect_k = stored_by_hand(cache.key_cache, new_keys, slots)
    expect_v = stored_by_hand(cache.value_cache, new_values, slots)
    scale = head_dim ** -0.5
    out = ops.paged_decode_attention(q, cache.key_cache, cache.value_cache, cache.block_tables,
                                     torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), scale,
                                     new_kv=new_kv)
    torch.testing.assert_close(cache.key_cache, expect_k, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(cache.value_cache, expect_v, atol=0, rtol=0, equal_nan=True)
    expected = torch.cat([naive_causal_attention(q[i:i + 1], keys[i], values[i], scale, query_start=n - 1)
                          for i, n in enumerate(seq_lens)])
    assert_close_to(out, expected, dtype, scale=1.0)
