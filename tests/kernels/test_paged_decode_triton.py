"""The Triton paged-decode and KV-write launchers beyond the shared op tests: split-K against one
split and the naive reference, long contexts over small blocks, padded block tables, caches
with unaligned or permuted strides, zero-length rows, the split heuristic, each tier of the
default launch (and the compile check's list of them), and input checks."""
from __future__ import annotations

import pytest
import torch

from kernel_testing import (DEVICE, PagedCache, assert_close_to, fused_write_case, gen, naive_causal_attention,
                            packed_qkv, randn, record_launches)
from opt_fast.kernels import kv_cache, paged_decode
from opt_fast.kernels.paged_decode import choose_num_splits, paged_decode_attention

I32 = dict(dtype=torch.int32, device=DEVICE)


def filled_cache(seq_lens, block_size, heads, head_dim, dtype, seed):
    """q strided from a packed qkv, a NaN-poisoned cache with permuted block tables (padding
    entries point at NaN blocks), and the float64 naive result."""
    g = gen(seed)
    q, _, _ = packed_qkv(len(seq_lens), heads, head_dim, g, dtype)
    cache = PagedCache(seq_lens, block_size, heads, head_dim, dtype, g)
    expected = []
    for i, n in enumerate(seq_lens):
        keys, values = randn(n, heads, head_dim, g=g, dtype=dtype), randn(n, heads, head_dim, g=g, dtype=dtype)
        cache.store(i, keys, values)
        expected.append(naive_causal_attention(q[i:i + 1], keys, values, head_dim ** -0.5, n - 1))
    return q, cache, torch.cat(expected)


def decode(q, cache, seq_lens, **kwargs):
    return paged_decode_attention(q, cache.key_cache, cache.value_cache, cache.block_tables,
                                  torch.tensor(seq_lens, **I32), q.shape[-1] ** -0.5, **kwargs)


# OPT's heads, the tiny test models' 16, and 34: rows that are no 16-byte multiple (the unaligned
# tile) and partials of a width that is no multiple of 4 (the merge's unhinted loads). Outputs,
# partials and their log-sum-exps NaN-poisoned: a split that writes nothing must be skipped.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_splits", [2, 3, 7])
@pytest.mark.parametrize("block_size,head_dim", [(8, 64), (16, 80), (32, 128), (16, 16), (8, 34)])
def test_forced_splits_equal_one_split_and_the_reference(nan_empty, dtype, num_splits, block_size, head_dim):
    # long relative to the block (up to 75 blocks of 8), lengths that leave some splits empty
    seq_lens = [600, 1, 130, 257, block_size * 5]
    q, cache, expected = filled_cache(seq_lens, block_size, 2, head_dim, dtype, seed=num_splits + head_dim)
    split = decode(q, cache, seq_lens, num_splits=num_splits)
    single = decode(q, cache, seq_lens, num_splits=1)
    assert_close_to(split, expected, dtype, scale=1.0)
    assert_close_to(single, expected, dtype, scale=1.0)
    # the same float32 math in another order: within an output rounding of each other
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(split, single, atol=tol, rtol=tol)


def test_heuristic_splits_a_long_single_sequence():
    """One sequence of 2048 tokens over blocks of 8: the launcher's own choice splits it."""
    seq_lens = [2048]
    assert choose_num_splits(1, 2, 2056) > 1
    q, cache, expected = filled_cache(seq_lens, 8, 2, 64, torch.float16, seed=3)
    assert_close_to(decode(q, cache, seq_lens), expected, torch.float16, scale=1.0)


def test_table_padding_pointing_at_live_blocks_is_ignored(monkeypatch):
    """The model runner pads short rows with block 0, which another sequence owns and filled
    with finite values: only the first ceil(len / block_size) entries of a row may be read, by
    one split or by three (8-token tiles: the 48-token table in whole tiles of 16, merged)."""
    seq_lens = [3, 40, 17]
    q, cache, expected = filled_cache(seq_lens, 8, 2, 64, torch.float32, seed=11)
    owner_block = int(cache.block_tables[1, 0])
    table = cache.block_tables.clone()
    for i, n in enumerate(seq_lens):
        table[i, -(-n // 8):] = owner_block
    launches = record_launches(monkeypatch, paged_decode, "_merge_splits_kernel")
    for num_splits in (1, 3):
        out = paged_decode_attention(q, cache.key_cache, cache.value_cache, table,
                                     torch.tensor(seq_lens, **I32), 64 ** -0.5, num_splits=num_splits, block_n=8)
        assert_close_to(out, expected, torch.float32, scale=1.0)
        assert [grid for _, grid, args, _ in launches] == ([(3, 2)] if num_splits == 3 else [])
        assert num_splits == 1 or launches[0][2][4] == 3   # the merge's kv_splits
        launches.clear()


@pytest.mark.parametrize("layout", ["unaligned_rows", "heads_outermost"])
def test_caches_with_other_strides(layout):
    """Rows padded to head_dim + 1 (not 16-byte aligned: the unhinted fallback), and a cache
    stored heads-first and permuted to [blocks, block_size, heads, dim]; both NaN around the data."""
    seq_lens = [70, 5, 33]
    q, cache, expected = filled_cache(seq_lens, 16, 3, 80, torch.float16, seed=5)
    caches = []
    for dense in (cache.key_cache, cache.value_cache):
        nb, bs, h, d = dense.shape
        if layout == "unaligned_rows":
            storage = torch.full((nb, bs, h, d + 1), float("nan"), dtype=dense.dtype, device=DEVICE)
            view = storage[..., :d]
        else:
            storage = torch.full((h, nb, bs, d), float("nan"), dtype=dense.dtype, device=DEVICE)
            view = storage.permute(1, 2, 0, 3)
        view.copy_(dense)
        caches.append(view)
    if layout == "unaligned_rows":
        assert not paged_decode._rows_aligned(caches[0])
    for num_splits in (1, 2):
        out = paged_decode_attention(q, *caches, cache.block_tables, torch.tensor(seq_lens, **I32),
                                     80 ** -0.5, num_splits=num_splits)
        assert_close_to(out, expected, torch.float16, scale=1.0)


def test_bfloat16_matches_the_torch_reference():
    seq_lens = [45, 300, 2]
    q, cache, expected = filled_cache(seq_lens, 16, 2, 128, torch.bfloat16, seed=8)
    for num_splits in (1, 2):
        out = decode(q, cache, seq_lens, num_splits=num_splits)
        assert out.dtype == torch.bfloat16
        # bfloat16 keeps 8 bits: one output rounding is up to 2**-8 relative
        torch.testing.assert_close(out.double().cpu(), expected.cpu(), atol=1e-2, rtol=8e-3)


def test_zero_length_rows_give_zeros(monkeypatch):
    """A padding row of a CUDA-graph batch (length 0) must not make NaN, split or not (8-key
    tiles, so that 50 keys really make 4 splits and the merge kernel runs)."""
    seq_lens = [0, 50, 0]
    q, cache, expected = filled_cache([1, 50, 1], 8, 2, 64, torch.float32, seed=2)
    merge = paged_decode._merge_splits_kernel
    merges = []

    class Recording:
        def __getitem__(self, grid):
            merges.append(grid)
            return merge[grid]
    monkeypatch.setattr(paged_decode, "_merge_splits_kernel", Recording())
    for num_splits, merged in ((1, False), (4, True)):
        merges.clear()
        out = decode(q, cache, seq_lens, num_splits=num_splits, block_n=8)
        assert bool(merges) == merged
        assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[2], out[0])
        assert_close_to(out[1:2], expected[1:2], torch.float32, scale=1.0)


@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_new_kv_is_folded_in_by_the_split_that_holds_it(num_splits):
    """With new_kv the current token is read from registers by the one split whose range holds
    the last position, wherever that is (first, middle or last split, or a split boundary), and
    its slot is written once. Zero-length rows get zeros: a padding row (slot -1) writes
    nothing, one with a slot stores there all the same (as the reference would); the sequences'
    poisoned table padding and spare blocks stay NaN."""
    seq_lens = [0, 64, 65, 1, 200, 0, 127]
    q, cache, new_kv, keys, values = fused_write_case(seq_lens, 8, 2, 64, torch.float16, seed=num_splits)
    new_kv[2][5] = cache.slot(5, 0)     # a block the zero-length row holds
    before_k, before_v = cache.key_cache.clone(), cache.value_cache.clone()
    out = decode(q, cache, seq_lens, new_kv=new_kv, num_splits=num_splits, block_n=8)
    written = torch.zeros(cache.key_cache.shape[:2], dtype=torch.bool, device=DEVICE)
    for i, n in enumerate(seq_lens):
        if n or i == 5:
            b, o = divmod(int(new_kv[2][i]), 8)
            written[b, o] = True
            assert torch.equal(cache.key_cache[b, o], new_kv[0][i])
            assert torch.equal(cache.value_cache[b, o], new_kv[1][i])
    torch.testing.assert_close(cache.key_cache[~written], before_k[~written], atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(cache.value_cache[~written], before_v[~written], atol=0, rtol=0, equal_nan=True)
    for i, n in enumerate(seq_lens):
        if n == 0:
            assert torch.equal(out[i], torch.zeros_like(out[i]))
        else:
            expected = naive_causal_attention(q[i:i + 1], keys[i], values[i], 64 ** -0.5, n - 1)
            assert_close_to(out[i:i + 1], expected, torch.float16, scale=1.0)


def test_new_kv_is_stored_where_the_table_has_no_column():
    """With block tables of no columns nothing is read, but the current tokens still go to
    their slots (the reference stores them before it reads)."""
    q, cache, new_kv, _, _ = fused_write_case([3, 5], 8, 2, 64, torch.float32, seed=4)
    expect_k, expect_v = cache.key_cache.clone(), cache.value_cache.clone()
    kv_cache.write_kv_cache_ref(*new_kv[:2], expect_k, expect_v, new_kv[2])
    out = paged_decode_attention(q, cache.key_cache, cache.value_cache, cache.block_tables[:, :0],
                                 torch.tensor([3, 5], **I32), 0.125, new_kv=new_kv)
    assert torch.equal(out, torch.zeros_like(out))
    torch.testing.assert_close(cache.key_cache, expect_k, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(cache.value_cache, expect_v, atol=0, rtol=0, equal_nan=True)


def test_new_kv_with_a_length_past_the_table_takes_its_last_position():
    """A length longer than the table row (clamped) makes the table's last position the
    current token, in the kernel as in the reference."""
    q, cache, new_kv, _, _ = fused_write_case([9, 17], 8, 2, 64, torch.float32, seed=6)
    width = cache.block_tables.shape[1] * 8
    new_kv[2][1] = cache.slot(1, width - 1)
    lens = torch.tensor([9, width + 5], **I32)
    ref_k, ref_v = cache.key_cache.clone(), cache.value_cache.clone()
    ref_k[ref_k.isnan()] = 0.0    # the reference reads the poisoned padding the table points at
    ref_v[ref_v.isnan()] = 0.0
    expected = paged_decode.paged_decode_attention_ref(q, ref_k, ref_v, cache.block_tables, lens, 0.125,
                                                       new_kv=new_kv)
    zeroed_k, zeroed_v = cache.key_cache.nan_to_num(0.0), cache.value_cache.nan_to_num(0.0)
    out = paged_decode_attention(q, zeroed_k, zeroed_v, cache.block_tables, lens, 0.125, new_kv=new_kv)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(zeroed_k, ref_k, atol=0, rtol=0)
    torch.testing.assert_close(zeroed_v, ref_v, atol=0, rtol=0)


def test_new_kv_is_checked():
    q, cache, new_kv, _, _ = fused_write_case([5, 9], 8, 2, 64, torch.float16, seed=1)
    keys, values, slots = new_kv
    for bad, match in (((keys[:1], values, slots), "new_kv keys and values"),
                       ((keys, values.float(), slots), "new_kv keys and values"),
                       ((keys, values, slots.int()), "slot_mapping"), ((keys, values, slots[:1]), "slot_mapping")):
        with pytest.raises(ValueError, match=match):
            decode(q, cache, [5, 9], new_kv=bad)


def test_empty_batch():
    q = torch.empty(0, 2, 64, device=DEVICE)
    cache = torch.zeros(2, 16, 2, 64, device=DEVICE)
    out = paged_decode_attention(q, cache, cache, torch.zeros(0, 3, **I32), torch.zeros(0, **I32), 0.125)
    assert out.shape == (0, 2, 64)


# Launch overrides as the tile sweep passes them: tiles smaller and larger than a cache block,
# unpipelined and deeper pipelines, split and not, over lengths that end inside a tile (each
# within an A100's shared memory, so the test runs on any GPU too).
@pytest.mark.parametrize("overrides", [
    dict(block_n=8, num_warps=1, num_stages=3), dict(block_n=32, num_warps=2, num_stages=4, num_splits=3),
    dict(block_n=128, num_warps=8, num_stages=1), dict(block_n=256, num_warps=8, num_stages=2, num_splits=2)],
    ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
def test_launch_overrides_match_the_reference(overrides):
    seq_lens = [300, 1, 17, 129]
    q, cache, expected = filled_cache(seq_lens, 16, 2, 128, torch.float16, seed=overrides["block_n"])
    assert_close_to(decode(q, cache, seq_lens, **overrides), expected, torch.float16, scale=1.0)


def test_launch_overrides_reach_the_kernel(monkeypatch):
    launches = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((grid, kwargs))
    monkeypatch.setattr(paged_decode, "_paged_decode_kernel", Recorder())
    monkeypatch.setattr(paged_decode, "_merge_splits_kernel", Recorder())
    q, cache, _ = filled_cache([40, 9], 8, 2, 64, torch.float16, seed=1)
    decode(q, cache, [40, 9], block_n=16, num_warps=2, num_stages=4, num_splits=2)
    (grid, kwargs), (merge_grid, _) = launches
    # 6 table entries of 8 tokens = 48 tokens: two splits of 32 (whole 16-token tiles)
    assert grid == (2, 2, 2) and merge_grid == (2, 2)
    assert (kwargs["BLOCK_N"], kwargs["num_warps"], kwargs["NUM_STAGES"]) == (16, 2, 4)


@pytest.mark.parametrize("name,value", [("block_n", 48), ("block_n", 512), ("num_warps", 3),
                                        ("num_stages", 0), ("num_splits", 33), ("num_warps", True)])
def test_launch_overrides_are_checked(name, value):
    q, cache, _ = filled_cache([5, 9], 8, 2, 64, torch.float16, seed=1)
    with pytest.raises(ValueError, match=name):
        decode(q, cache, [5, 9], **{name: value})


def test_split_heuristic():
    sms = 132
    # enough (sequence, head) programs already: never split, however long the context
    assert choose_num_splits(64, 32, 2048, sms) == 1
    assert choose_num_splits(8, 40, 2048, sms) == 1
    # few programs and a long context: split, but never into slices under the minimum length
    assert choose_num_splits(1, 32, 2048, sms) == 2048 // paged_decode._MIN_SPLIT_TOKENS == 2
    assert choose_num_splits(8, 32, 2048, sms) == 2
    assert choose_num_splits(8, 32, 4096, sms) == 3    # 4 x 132 / 256 programs, rounded up
    assert choose_num_splits(1, 1, 1 << 20, sms) == paged_decode._MAX_SPLITS
    # a context of one minimum split or less: one split
    assert choose_num_splits(8, 32, 1024, sms) == 1
    assert choose_num_splits(1, 32, 128, sms) == 1


# The launcher's own choice in each tier of paged_decode._TIERS (programs per SM under 2, under 8,
# 8 or more), reached with small shapes by pretending the device has few SMs: 4 sequences x 2
# heads are 8 programs, one sequence of 2100 tokens on 2 SMs splits in two (4 programs).
SHORT, LONG = [300, 1, 17, 129], [2100]
TIER_CASES = [  # (head_dim, sms, seq_lens, DecodeConfig the launcher must pick)
    (64, 8, SHORT, (1, 32, 2, 5)), (64, 2, LONG, (2, 128, 4, 1)), (64, 1, SHORT, (1, 128, 4, 3)),
    (128, 8, SHORT, (1, 64, 2, 3)), (128, 2, LONG, (2, 64, 2, 3)), (128, 1, SHORT, (1, 32, 2, 4)),
]


@pytest.mark.parametrize("head_dim,sms,seq_lens,expected", TIER_CASES,
                         ids=[f"d{c[0]}-sms{c[1]}-{'long' if c[2] == LONG else 'short'}" for c in TIER_CASES])
def test_each_default_tier_runs_and_matches(monkeypatch, head_dim, sms, seq_lens, expected):
    q, cache, reference = filled_cache(seq_lens, 16, 2, head_dim, torch.float16, seed=head_dim + sms)
    config = paged_decode.default_config(len(seq_lens), 2, head_dim, torch.float16,
                                         cache.block_tables.shape[1] * 16, sms=sms)
    assert config == expected
    monkeypatch.setattr(paged_decode, "_sm_count", lambda device: sms)
    launches = record_launches(monkeypatch, paged_decode, "_paged_decode_kernel")
    assert_close_to(decode(q, cache, seq_lens), reference, torch.float16, scale=1.0)
    [(_, grid, _, kwargs)] = launches
    assert grid[2] == config.num_splits
    assert (kwargs["BLOCK_N"], kwargs["num_warps"], kwargs["NUM_STAGES"]) == config[1:]


def test_compile_check_builds_exactly_the_default_launches():
    """Every loop tile default_config picks for OPT's heads, any batch, context and SM count, is
    in compile_specs() for its dtype and alignment, and compile_specs() builds no other."""
    torch_dtype = {"*fp16": torch.float16, "*bf16": torch.bfloat16, "*fp32": torch.float32}
    built = {(torch_dtype[s.signature["q_ptr"]], s.constexprs["HEAD_DIM"], s.constexprs["ALIGNED"],
              s.constexprs["BLOCK_N"], s.num_warps, s.constexprs["NUM_STAGES"])
             for s in paged_decode.compile_specs() if s.kernel is paged_decode._paged_decode_kernel}
    picked = set()
    for dtype in torch_dtype.values():
        for head_dim in (64, 80, 128):
            for aligned in (True, False):
                for seqs in (1, 8, 64, 256):
                    for heads in (12, 32, 40):
                        for max_tokens in (16, 1024, 2048, 8192):
                            for sms in (108, 132):
                                c = paged_decode.default_config(seqs, heads, head_dim, dtype, max_tokens, aligned, sms)
                                picked.add((dtype, head_dim, aligned, c.block_n, c.num_warps, c.num_stages))
    assert picked == built


def test_paged_decode_rejects_bad_inputs():
    g = gen(1)
    q, cache, _ = filled_cache([5, 9], 8, 2, 64, torch.float16, seed=1)
    lens = torch.tensor([5, 9], **I32)
    good = (q, cache.key_cache, cache.value_cache, cache.block_tables, lens, 0.125)

    def call(i, value, **kwargs):
        args = list(good)
        args[i] = value
        paged_decode_attention(*args, **kwargs)

    with pytest.raises(ValueError, match="dtype"):
        call(0, q.float())
    with pytest.raises(ValueError, match="block_tables"):
        call(3, cache.block_tables.long())
    with pytest.raises(ValueError, match="seq_lens"):
        call(4, lens[:1])
    with pytest.raises(ValueError, match="seq_lens must be contiguous, got stride 2"):
        call(4, torch.tensor([5, 0, 9, 0], **I32)[::2])      # the kernels read seq_lens + i
    with pytest.raises(ValueError, match="heads x head_dim"):
        call(0, randn(2, 2, 32, g=g, dtype=torch.float16))
    with pytest.raises(ValueError, match="strides"):
        call(2, cache.value_cache.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3))
    with pytest.raises(ValueError, match="num_splits"):
        call(5, 0.125, num_splits=0)


# float32 -> bfloat16 is left out: the Triton 3.6 interpreter truncates that cast, the GPU rounds
# to nearest even (as torch does), so the two cannot match bit for bit here.
@pytest.mark.parametrize("src_dtype,cache_dtype", [(torch.float32, torch.float16), (torch.bfloat16, torch.bfloat16)])
def test_write_kv_cache_into_a_permuted_cache(src_dtype, cache_dtype):
    """Any cache strides (heads-first storage), and a source cast to the cache dtype on store."""
    g = gen(4)
    _, key, value = packed_qkv(9, 3, 80, g, src_dtype)
    storage = torch.full((2, 3, 5, 8, 80), float("nan"), dtype=cache_dtype, device=DEVICE)
    key_cache, value_cache = storage[0].permute(1, 2, 0, 3), storage[1].permute(1, 2, 0, 3)
    slots = torch.tensor([39, 0, -1, 7, 8, 22, -5, 31, 16], dtype=torch.int64, device=DEVICE)
    kv_cache.write_kv_cache(key, value, key_cache, value_cache, slots)
    expect_k = torch.full((5, 8, 3, 80), float("nan"), dtype=cache_dtype, device=DEVICE)
    expect_v = expect_k.clone()
    kv_cache.write_kv_cache_ref(key, value, expect_k, expect_v, slots)
    assert torch.equal(key_cache.nan_to_num(7.0), expect_k.nan_to_num(7.0))
    assert torch.equal(value_cache.nan_to_num(7.0), expect_v.nan_to_num(7.0))


def test_write_kv_cache_rejects_bad_inputs():
    g = gen(6)
    _, key, value = packed_qkv(4, 2, 64, g, torch.float16)
    cache = torch.zeros(3, 8, 2, 64, dtype=torch.float16, device=DEVICE)
    slots = torch.tensor([0, 1, 2, 3], dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="slot_mapping"):
        kv_cache.write_kv_cache(key, value, cache, cache.clone(), slots.int())
    strided = torch.tensor([0, 9, 1, 9, 2, 9, 3, 9], dtype=torch.int64, device=DEVICE)[::2]
    with pytest.raises(ValueError, match="slot_mapping must be contiguous, got stride 2"):
        kv_cache.write_kv_cache(key, value, cache, cache.clone(), strided)
    with pytest.raises(ValueError, match="heads x head_dim"):
        kv_cache.write_kv_cache(key[:, :1], value[:, :1], cache, cache.clone(), slots)
    with pytest.raises(ValueError, match="share strides"):
        kv_cache.write_kv_cache(key, value, cache, cache.transpose(0, 1).contiguous().transpose(0, 1), slots)
    with pytest.raises(ValueError, match="dtype"):
        kv_cache.write_kv_cache(key.to(torch.int32), value.to(torch.int32), cache, cache.clone(), slots)
