"""A float8 (e4m3) KV cache, kv_cache_dtype="fp8": the KV write rounds and saturates into it, and
both attentions read it back into the query's dtype, against naive float64 attention over the
values the cache actually holds. Every op table runs (torch references and Triton launchers).
Under Triton 3.6's interpreter a float8 NaN reads back as 480, not NaN: a kernel reading the
poisoned unused slots still shows, as outputs far off the reference rather than NaN."""
from __future__ import annotations

import pytest
import torch

from kernel_testing import DEVICE, OPS, PagedCache, assert_close_to, gen, naive_causal_attention, packed_qkv, randn
from opt_fast.kernels import attention, kv_cache, paged_decode

FP8 = torch.float8_e4m3fn
I32 = dict(dtype=torch.int32, device=DEVICE)


def fp8(x: torch.Tensor) -> torch.Tensor:
    """What a float8 e4m3 cache holds for x: torch's round-to-nearest-even, saturated at 448."""
    return x.double().clamp(-448.0, 448.0).to(FP8)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8).cpu()


@pytest.mark.parametrize("ops", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_write_rounds_and_saturates_into_a_float8_cache(ops, dtype):
    tokens, heads, head_dim, block_size = 13, 3, 80, 8
    g = gen(7)
    _, key, value = packed_qkv(tokens, heads, head_dim, g, dtype)
    # outliers past float8's range and values down in its subnormals
    key[0, 0, :4] = torch.tensor([1000.0, -1000.0, 447.0, 3e-3], dtype=dtype)
    value[3, 1, :3] = torch.tensor([-600.0, 1e-3, 1000.0], dtype=dtype)     # token 3: slot 0, stored
    shape = (5, block_size, heads, head_dim)
    key_cache = torch.full(shape, float("nan"), dtype=FP8, device=DEVICE)
    value_cache = key_cache.clone()
    slots = torch.tensor([3, 17, -1, 0, 38, 9, 21, -4, 30, 5, 12, 39, 26], dtype=torch.int64, device=DEVICE)

    ops.write_kv_cache(key, value, key_cache, value_cache, slots)

    flat_k, flat_v = key_cache.view(-1, heads, head_dim), value_cache.view(-1, heads, head_dim)
    nan_bits = bits(torch.full((), float("nan"), dtype=FP8))
    written = torch.zeros(flat_k.shape[0], dtype=torch.bool)
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            written[s] = True
            assert torch.equal(bits(flat_k[s]), bits(fp8(key[i]))), f"key of token {i}"
            assert torch.equal(bits(flat_v[s]), bits(fp8(value[i]))), f"value of token {i}"
    assert flat_k[3, 0, :2].float().tolist() == [448.0, -448.0]    # token 0's outliers, saturated
    assert flat_v[0, 1, [0, 2]].float().tolist() == [-448.0, 448.0]  # token 3's, likewise
    assert (bits(flat_k[~written]) == nan_bits).all() and (bits(flat_v[~written]) == nan_bits).all()


def float8_paged_cache(seq_lens, block_size, heads, head_dim, dtype, g):
    """A NaN-poisoned float8 PagedCache holding the first seq_lens[i] tokens of each sequence;
    returns it and, per sequence, the keys and values it holds (in float64)."""
    cache = PagedCache(seq_lens, block_size, heads, head_dim, FP8, g)
    held = []
    for i, n in enumerate(seq_lens):
        keys = fp8(randn(n, heads, head_dim, g=g, dtype=dtype, scale=2.0))
        values = fp8(randn(n, heads, head_dim, g=g, dtype=dtype, scale=2.0))
        cache.store(i, keys, values)
        held.append((keys.double(), values.double()))
    return cache, held


@pytest.mark.parametrize("ops", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("block_size,head_dim", [(16, 64), (8, 80), (32, 128)])
def test_paged_decode_reads_a_float8_cache(ops, dtype, block_size, head_dim):
    seq_lens = [1, 37, block_size + 1, 130]
    g = gen(block_size + head_dim)
    q, _, _ = packed_qkv(len(seq_lens), 2, head_dim, g, dtype)
    cache, held = float8_paged_cache(seq_lens, block_size, 2, head_dim, dtype, g)
    scale = head_dim ** -0.5
    expected = torch.cat([naive_causal_attention(q[i:i + 1], k, v, scale, n - 1)
                          for i, (n, (k, v)) in enumerate(zip(seq_lens, held))])
    out = ops.paged_decode_attention(q, cache.key_cache, cache.value_cache, cache.block_tables,
                                     torch.tensor(seq_lens, **I32), scale)
    assert_close_to(out, expected, dtype, scale=1.0)


def test_paged_decode_splits_over_a_float8_cache():
    seq_lens = [600, 3, 257]
    g = gen(5)
    q, _, _ = packed_qkv(len(seq_lens), 2, 128, g, torch.float16)
    cache, held = float8_paged_cache(seq_lens, 16, 2, 128, torch.float16, g)
    expected = torch.cat([naive_causal_attention(q[i:i + 1], k, v, 128 ** -0.5, n - 1)
                          for i, (n, (k, v)) in enumerate(zip(seq_lens, held))])
    for num_splits in (1, 5):
        out = paged_decode.paged_decode_attention(q, cache.key_cache, cache.value_cache, cache.block_tables,
                                                  torch.tensor(seq_lens, **I32), 128 ** -0.5, num_splits=num_splits)
        assert_close_to(out, expected, torch.float16, scale=1.0)


@pytest.mark.parametrize("ops", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_decode_with_new_kv_rounds_the_current_tokens_as_the_cache_holds_them(ops, dtype):
    """new_kv into a float8 cache: the current token is stored rounded and saturated as
    write_kv_cache stores it, and attended to as read back from there, not at full precision."""
    # lengths whose last position falls in a block the cache already gives the first n - 1
    seq_lens = [1, 37, 10, 130]
    g = gen(13)
    q, new_keys, new_values = packed_qkv(len(seq_lens), 2, 64, g, dtype)
    new_keys[1, 0, :2] = torch.tensor([1000.0, -1000.0], dtype=dtype)   # past float8's range
    new_values[2, 1, :2] = torch.tensor([-1000.0, 1000.0], dtype=dtype)
    cache, held = float8_paged_cache([n - 1 for n in seq_lens], 8, 2, 64, dtype, g)
    slots = torch.tensor([cache.slot(i, n - 1) for i, n in enumerate(seq_lens)], dtype=torch.int64, device=DEVICE)
    # the caches afterwards: as before (NaN poison included) but for the new tokens' slots
    want_k, want_v = cache.key_cache.clone().view(-1, 2, 64), cache.value_cache.clone().view(-1, 2, 64)
    for i, slot in enumerate(slots.tolist()):
        want_k[slot], want_v[slot] = fp8(new_keys[i]), fp8(new_values[i])
    out = ops.paged_decode_attention(q, cache.key_cache, cache.value_cache, cache.block_tables,
                                     torch.tensor(seq_lens, **I32), 0.125, new_kv=(new_keys, new_values, slots))
    flat_k, flat_v = cache.key_cache.view(-1, 2, 64), cache.value_cache.view(-1, 2, 64)
    assert flat_k[slots[1], 0, :2].float().tolist() == [448.0, -448.0]
    assert flat_v[slots[2], 1, :2].float().tolist() == [-448.0, 448.0]
    assert torch.equal(bits(flat_k), bits(want_k)) and torch.equal(bits(flat_v), bits(want_v))
    expected = []
    for i, (n, (k, v)) in enumerate(zip(seq_lens, held)):
        k = torch.cat([k, fp8(new_keys[i:i + 1]).double()])
        v = torch.cat([v, fp8(new_values[i:i + 1]).double()])
        expected.append(naive_causal_attention(q[i:i + 1], k, v, 0.125, n - 1))
    assert_close_to(out, torch.cat(expected), dtype, scale=1.0)


@pytest.mark.parametrize("ops", OPS)
@pytest.mark.parametrize("dtype,head_dim,tiles", [
    (torch.float32, 80, None), (torch.float16, 64, None), (torch.float16, 80, None),
    (torch.bfloat16, 128, None), (torch.float16, 80, attention.Tiles(32, 16, 4, 2)),
    (torch.float16, 64, attention.Tiles(64, 32, 4, 2, True))],
    ids=["fp32-80", "fp16-64", "fp16-80-split-head", "bf16-128", "fp16-80-32x16", "fp16-64-tma"])
def test_prefill_attends_to_context_in_a_float8_cache(ops, dtype, head_dim, tiles):
    """Chunked prefill / recompute: the context comes from the float8 cache, the new tokens as
    they are (unrounded), as the model passes both."""
    if tiles is not None and getattr(ops, "id", "torch") != "triton":
        pytest.skip("tile overrides are the Triton launcher's")
    seqs = [(5, 40), (0, 9), (33, 1), (129, 70)]     # (cached tokens, new tokens)
    g = gen(head_dim + 3)
    q, k, v = packed_qkv(sum(n for _, n in seqs), 2, head_dim, g, dtype)
    cache, held = float8_paged_cache([c for c, _ in seqs], 8, 2, head_dim, dtype, g)
    cu, expected = [0], []
    for (context, new), (ctx_k, ctx_v) in zip(seqs, held):
        s, e = cu[-1], cu[-1] + new
        expected.append(naive_causal_attention(q[s:e], torch.cat([ctx_k, k[s:e].double().cpu()]),
                                               torch.cat([ctx_v, v[s:e].double().cpu()]), head_dim ** -0.5, context))
        cu.append(e)
    extra = {} if tiles is None else dict(tiles=tiles)
    out = ops.prefill_attention(q, k, v, cache.key_cache, cache.value_cache, torch.tensor(cu, **I32),
                                torch.tensor([c for c, _ in seqs], **I32), cache.block_tables, head_dim ** -0.5,
                                max_context_len=129, **extra)
    if dtype == torch.bfloat16:   # 8 mantissa bits: the attention tests' bfloat16 tolerance
        assert out.dtype == dtype and torch.isfinite(out).all()
        torch.testing.assert_close(out.double().cpu(), torch.cat(expected), atol=2e-2, rtol=2e-2)
    else:
        assert_close_to(out, torch.cat(expected), dtype, scale=1.0)


def test_mismatched_or_unsupported_cache_dtypes_are_refused(monkeypatch):
    g = gen(1)
    q, k, v = packed_qkv(4, 2, 64, g, torch.float16)
    fp8_cache = torch.zeros(3, 8, 2, 64, dtype=FP8, device=DEVICE)
    fp16_cache = torch.zeros(3, 8, 2, 64, dtype=torch.float16, device=DEVICE)
    slots = torch.arange(4, device=DEVICE)
    tables, lens = torch.zeros(4, 1, **I32), torch.ones(4, **I32)
    with pytest.raises(ValueError, match="share one dtype"):
        kv_cache.write_kv_cache(k, v, fp8_cache, fp16_cache, slots)
    with pytest.raises(ValueError, match="share one dtype"):
        paged_decode.paged_decode_attention(q, fp8_cache, fp16_cache, tables, lens, 0.125)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        attention.prefill_attention(q, k, v, fp8_cache.to(torch.bfloat16), fp8_cache.to(torch.bfloat16),
                                    torch.tensor([0, 4], **I32), torch.zeros(1, **I32), tables[:1], 0.125)
    # Triton's float8 conversions need sm_89: on an older GPU the launchers say so, naming the option
    monkeypatch.setattr(kv_cache, "nvidia_capability", lambda device: 80)
    cuda_like = torch.device("cuda")
    with pytest.raises(ValueError, match="kv_cache_dtype='fp8'.*compute capability 89"):
        kv_cache.check_cache_dtype(FP8, cuda_like)
    kv_cache.check_cache_dtype(torch.float16, cuda_like)
