"""The Triton prefill-attention launcher beyond the shared op tests: sequences spanning many query
blocks (the launcher's own tiles and forced small ones), contexts of 1, block_size +- 1 and just
past a power of two over permuted NaN-poisoned caches, empty and many sequences, bfloat16, caches
with other strides, every output element written, the launch grid without a host sync, and the
input checks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kernel_testing import DEVICE, TOL, PagedCache, fill_empty, gen, packed_qkv, randn, record_launches, sweep_script
from opt_fast.kernels import (attention, attention_persistent, attention_wgmma, attention_wgmma_persistent,
                              attention_wgmma_ws, attention_ws)
from opt_fast.kernels.attention import Tiles, prefill_attention

I32 = dict(dtype=torch.int32, device=DEVICE)
# (atol, rtol) for bfloat16 (8-bit mantissa), beside kernel_testing's fp32/fp16 ones
TOLERANCES = {**TOL, torch.bfloat16: (2e-2, 2e-2)}


def causal_reference64(q, keys, values, scale: float, query_start: int) -> torch.Tensor:
    """float64 softmax(q k^T * scale) v, query i at position query_start + i seeing keys up to it;
    vectorised, so long sequences stay quick (kernel_testing's naive loop is per query)."""
    q, keys, values = q.double().cpu(), keys.double().cpu(), values.double().cpu()
    scores = torch.einsum("qhd,khd->hqk", q, keys) * scale
    hidden = torch.arange(keys.shape[0])[None, :] > torch.arange(q.shape[0])[:, None] + query_start
    probs = torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, values)


def prefill_case(seqs, block_size, heads, head_dim, dtype, seed, scale=None, own_v=False):
    """seqs: (context_len, new_len) per sequence. Returns the launcher's arguments (q, k, v strided
    views of one packed qkv, v a tensor of its own with `own_v`; a NaN-poisoned cache holding
    only the context, read through permuted block tables; `scale`, head_dim ** -0.5 unless
    given) and the float64 expectation."""
    g = gen(seed)
    q, k, v = packed_qkv(sum(n for _, n in seqs), heads, head_dim, g, dtype, own_v=own_v)
    cache = PagedCache([c + n for c, n in seqs], block_size, heads, head_dim, dtype, g)
    scale = head_dim ** -0.5 if scale is None else scale
    cu, expected = [0], []
    for i, (context, new) in enumerate(seqs):
        ctx_k = randn(context, heads, head_dim, g=g, dtype=dtype)
        ctx_v = randn(context, heads, head_dim, g=g, dtype=dtype)
        cache.store(i, ctx_k, ctx_v)
        s, e = cu[-1], cu[-1] + new
        expected.append(causal_reference64(q[s:e], torch.cat([ctx_k, k[s:e]]), torch.cat([ctx_v, v[s:e]]),
                                           scale, context))
        cu.append(e)
    args = (q, k, v, cache.key_cache, cache.value_cache, torch.tensor(cu, **I32),
            torch.tensor([c for c, _ in seqs], **I32), cache.block_tables, scale)
    return args, torch.cat(expected)


def assert_matches(out, expected, dtype):
    assert out.dtype == dtype and out.shape == expected.shape
    assert torch.isfinite(out).all(), "non-finite values in the output"
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double().cpu(), expected, atol=atol, rtol=rtol)


# A finite value no output takes: rows that must stay unwritten keep it, where NaN could not
# tell them from a 0 / 0 the kernel wrote.
SENTINEL = -1234.0


@pytest.fixture
def sentinel_empty(monkeypatch):
    fill_empty(monkeypatch, SENTINEL)


# Sequences of several query blocks under the tiles the launcher picks itself, one shorter than
# a block, one empty, contexts of 1 and 2**k + 1. "narrow": 564 new tokens in 5 sequences (at
# most 128 on average: 64x64 tiles); "wide": 557 in 3 (head 64: 64x64 tiles; head 128: 128-row
# blocks). fp32: 16x16 tiles. Pairs rather than the full product: on a GPU each pair is one more
# kernel compile.
BATCHES = {"narrow": [(0, 300), (1, 5), (0, 0), (65, 257), (129, 2)],
           "wide": [(0, 300), (0, 0), (65, 257)]}


@pytest.mark.parametrize("dtype,head_dim,kind", [
    (torch.float32, 80, "narrow"), (torch.float16, 64, "wide"), (torch.float16, 80, "narrow"),
    (torch.float16, 128, "wide"), (torch.bfloat16, 64, "narrow"), (torch.bfloat16, 128, "narrow")],
    ids=["fp32-80", "fp16-64-wide", "fp16-80-narrow", "fp16-128-wide", "bf16-64-narrow", "bf16-128-narrow"])
def test_long_sequences_with_own_tiles(nan_empty, dtype, head_dim, kind):
    seqs = BATCHES[kind]
    if dtype != torch.float32:   # the batch selects the table entry it is named for
        cap = attention._capability(torch.device(DEVICE))
        picked = attention.default_tiles(head_dim, dtype, sum(n for _, n in seqs), len(seqs), cap)
        entry = attention.tile_table(cap)[(kind, attention._tile_head_dim(head_dim))]
        assert picked == entry._replace(tma=False)      # (TMA only from _TMA_MIN_TOKENS on)
    args, expected = prefill_case(seqs, 16, 2, head_dim, dtype, seed=head_dim)
    assert_matches(prefill_attention(*args), expected, dtype)


# Small forced tiles: several diagonal key tiles per query block (BLOCK_N < BLOCK_M), key tiles
# smaller and larger than a cache block, many full context tiles beside a partial one.
@pytest.mark.parametrize("tiles,block_size", [
    (Tiles(32, 16, 4, 2), 8), (Tiles(32, 16, 4, 2), 32), (Tiles(16, 16, 4, 2), 16),
    (Tiles(64, 32, 4, 2), 8)],
    ids=["32x16-bs8", "32x16-bs32", "16x16-bs16", "64x32-bs8"])
def test_forced_small_tiles(nan_empty, tiles, block_size):
    seqs = [(1, 70), (block_size - 1, 33), (block_size, 1), (block_size + 1, 47), (129, 17), (200, 64)]
    args, expected = prefill_case(seqs, block_size, 2, 80, torch.float16, seed=block_size + tiles.block_m)
    assert_matches(prefill_attention(*args, tiles=tiles), expected, torch.float16)


# One masked loop over a query block's new-token key tiles (Tiles.one_loop): several diagonal key
# tiles per block (BLOCK_N < BLOCK_M) and many before it, a sequence ending inside a tile, cached
# context before the new tokens (also a partial context tile) or none (max_context_len=0, the
# kernel without context loops); fp16 and fp32, head 80 split, with q by TMA (emulated here).
@pytest.mark.parametrize("tiles,dtype,no_context", [
    (Tiles(32, 16, 4, 2, one_loop=True), torch.float16, False),
    (Tiles(64, 32, 4, 3, one_loop=True), torch.float16, True),
    (Tiles(32, 32, 4, 2, True, one_loop=True), torch.float16, False),
    (Tiles(16, 16, 4, 2, one_loop=True), torch.float32, False)],
    ids=["32x16", "64x32-no-context", "32x32-tma", "16x16-fp32"])
def test_one_loop_tiles(nan_empty, monkeypatch, tiles, dtype, no_context):
    seqs = [(0 if no_context else c, n) for c, n in ((1, 70), (7, 33), (9, 1), (0, 47), (129, 17), (200, 64))]
    args, expected = prefill_case(seqs, 8, 2, 80, dtype, seed=tiles.block_m + tiles.block_n)
    bound = 0 if no_context else None
    launches = record_launches(monkeypatch, attention, "_prefill_attention_kernel")
    out = prefill_attention(*args, tiles=tiles, max_context_len=bound)
    assert_matches(out, expected, dtype)
    [(_, _, launch_args, options)] = launches
    assert options["ONE_LOOP"] is True
    # q by TMA (emulated here) where asked; K and V never (every tile is a masked pointer load)
    q_desc, k_desc, v_desc = launch_args[6:9]
    assert (q_desc is not None) == (tiles.tma and dtype != torch.float32) and k_desc is None and v_desc is None
    if DEVICE == "cpu":   # the interpreter runs the same softmax steps in the same order as the split loops
        split = prefill_attention(*args, tiles=tiles._replace(one_loop=False), max_context_len=bound)
        assert torch.equal(out, split)


def test_many_sequences():
    """37 sequences of random lengths and contexts: the block -> sequence search at depth."""
    g = gen(11)
    seqs = [(int(c), int(n)) for c, n in zip(torch.randint(0, 90, (37,), generator=g),
                                             torch.randint(0, 40, (37,), generator=g))]
    args, expected = prefill_case(seqs, 8, 3, 64, torch.float32, seed=12)
    assert_matches(prefill_attention(*args), expected, torch.float32)


@pytest.mark.parametrize("seq_chunk,count", [(4, 21), (4, 24), (128, 128), (128, 131)],
                         ids=["chunk4_last_alone", "chunk4_bound_alone", "chunk128_bound_alone", "chunk128"])
def test_sequence_search_across_chunks(nan_empty, monkeypatch, seq_chunk, count):
    """More sequences than one chunk of cu_seqlens holds: the search counts over several chunks,
    with empty sequences at and around the chunk boundaries; the last chunk holds the last
    sequence and the end bound (count + 1 one past a multiple of the chunk), or the end bound
    alone (count a multiple of it: a prefill of exactly 128 sequences). Chunks of 4: a forced
    small chunk; 128: the launcher's own."""
    monkeypatch.setattr(attention, "SEQ_CHUNK", seq_chunk)
    g = gen(count)
    lengths = torch.randint(0, 7, (count,), generator=g).tolist()
    for empty in (seq_chunk - 1, seq_chunk, 2 * seq_chunk - 1):
        lengths[empty % count] = 0
    lengths[-1] = 20
    contexts = torch.randint(0, 20, (count,), generator=g).tolist()
    args, expected = prefill_case(list(zip(contexts, lengths)), 8, 1, 16, torch.float32, seed=count)
    assert_matches(prefill_attention(*args, tiles=Tiles(16, 16, 4, 2)), expected, torch.float32)


def test_packed_tokens_after_an_offset(sentinel_empty):
    """cu_seqlens_q may start past 0 (tokens before it belong to no sequence): the programs of
    the blocks before the first sequence write nothing (the output rows there stay as torch.empty
    left them), and never read the context length or block table row before sequence 0 (here a
    huge context through junk blocks)."""
    args, expected = prefill_case([(3, 20), (5, 13)], 8, 1, 16, torch.float32, seed=6)
    q, k, v, key_cache, value_cache, cu, context_lens, block_tables, scale = args
    lead = 40
    g = gen(40)
    shifted = [torch.cat([torch.randn((lead, *t.shape[1:]), generator=g).to(DEVICE), t]) for t in (q, k, v)]
    contexts = torch.tensor([10 ** 6] + context_lens.tolist(), **I32)
    tables = torch.cat([torch.full((1, block_tables.shape[1]), 10 ** 6, **I32), block_tables])
    out = prefill_attention(*shifted, key_cache, value_cache, cu + lead, contexts[1:], tables[1:], scale,
                            tiles=Tiles(16, 16, 4, 2))
    assert_matches(out[lead:], expected, torch.float32)
    assert (out[:lead] == SENTINEL).all()


def test_block_layout_is_uniform_where_the_host_bound_costs_no_more_programs():
    """ceil(max_query_len / block_m) programs a sequence where that is no more than the virtual
    axis's tokens // block_m + seqs; the virtual axis without a bound (None or 0) or where one
    long prompt among short ones would leave most uniform programs idle."""
    layout = attention._block_layout
    assert layout(8 * 1024, 8, 64, 1024) == (128, 16)        # equal prompts: no idle program
    assert layout(64 * 128, 64, 64, 128) == (128, 2)         # virtual: 192, a third of them idle
    assert layout(8 * 1024, 8, 64, 1000) == (128, 16)        # a loose bound
    assert layout(2048 + 63 * 5, 64, 64, 2048) == (100, 0)   # 64 x 32 uniform > 36 + 64 virtual
    assert layout(300, 2, 64, None) == (6, 0) and layout(300, 2, 64, 0) == (6, 0)
    assert layout(0, 3, 64, 0) == (3, 0)


@pytest.mark.parametrize("tiles", [Tiles(16, 16, 4, 2), Tiles(32, 16, 4, 2, one_loop=True),
                                   Tiles(128, 16, 4, 2, warp_specialize=True)],
                         ids=["main", "one-loop", "warp-specialized"])
def test_uniform_block_layout_matches_the_virtual_one(sentinel_empty, monkeypatch, tiles):
    """A batch without cached context in both block layouts gives the reference: max_query_len
    exact (the uniform layout in the main kernel), loose (uniform where the rule allows), not
    given, or with context possible (the virtual axis). Prompts of several blocks and a partial
    one, of one token, an empty one; tokens packed after an offset and padding rows after the
    last prompt (NaN; their output rows keep what torch.empty left). The uniform grid holds
    seqs x ceil(bound / block_m) programs a head, fewer here than the virtual axis's
    tokens // block_m + seqs; the warp-specialised kernel always runs the virtual axis."""
    lengths = [48, 47, 0, 48, 48, 1]
    ws_kernel = tiles.warp_specialize   # fp16 / bf16 only
    dtype = torch.float16 if ws_kernel else torch.float32
    args, expected = prefill_case([(0, n) for n in lengths], 8, 2, 16, dtype, seed=21)
    q, k, v, key_cache, value_cache, cu, context_lens, block_tables, scale = args
    lead, tail = 5, 40
    shifted = [torch.cat([torch.full((lead, *t.shape[1:]), float("nan"), dtype=dtype, device=DEVICE), t,
                          torch.full((tail, *t.shape[1:]), float("nan"), dtype=dtype, device=DEVICE)])
               for t in (q, k, v)]
    module, name = ((attention_ws, "_prefill_attention_ws_kernel") if ws_kernel
                    else (attention, "_prefill_attention_kernel"))
    launches = record_launches(monkeypatch, module, name)
    rows = slice(lead, lead + sum(lengths))
    virtual = (lead + sum(lengths) + tail) // tiles.block_m + len(lengths)
    grids = []
    # (with context possible the warp-specialised tiles give way to the main kernel's own)
    for bound, context in ((48, 0), (60, 0), (None, 0), *([] if ws_kernel else [(48, None)])):
        out = prefill_attention(*shifted, key_cache, value_cache, cu + lead, context_lens, block_tables, scale,
                                tiles=tiles, max_context_len=context, max_query_len=bound)
        assert_matches(out[rows], expected, dtype)
        assert (out[:lead] == SENTINEL).all() and (out[rows.stop:] == SENTINEL).all()
        _, grid, _, kwargs = launches.pop()
        assert grid[0] * grid[2] == 2   # one group of both heads (their keys fit L2)
        grids.append(grid[1])
        assert kwargs.get("UNIFORM", False) == (grid[1] != virtual)
    per_seq = [-(-bound // tiles.block_m) * len(lengths) for bound in (48, 60)]
    if ws_kernel:
        assert grids == [virtual] * 3
    else:
        assert grids == [per_seq[0], min(per_seq[1], virtual), virtual, virtual] and per_seq[0] < virtual


def test_head_splits():
    """Heads of two powers of two of at least 16 split into two exact tiles; others pad."""
    split = attention._head_split
    assert [split(d, True) for d in (64, 80, 96, 48, 128, 72, 40, 20)] == [
        (64, 0), (64, 16), (64, 32), (32, 16), (128, 0), (128, 0), (64, 0), (32, 0)]
    assert split(80, False) == (128, 0)


# Split heads (80, 48 = 32 + 16, 96 = 64 + 32) and padded ones (80 on request, 72 = 64 + 8, 40):
# several query and key tiles, partial context tiles and a sequence ending inside a tile.
@pytest.mark.parametrize("head_dim,split_head", [(80, True), (80, False), (48, True), (96, True), (72, True),
                                                 (40, True)])
def test_split_and_padded_heads(nan_empty, head_dim, split_head):
    seqs = [(21, 70), (0, 9), (40, 33)]
    args, expected = prefill_case(seqs, 8, 2, head_dim, torch.float16, seed=head_dim)
    out = prefill_attention(*args, tiles=Tiles(32, 16, 4, 2, False, split_head))
    assert_matches(out, expected, torch.float16)


def test_cache_views_with_other_strides(nan_empty):
    """Key and value caches as views into one [num_blocks, 2, block_size, heads, head_dim] pool."""
    seqs = [(19, 9), (40, 30)]
    args, expected = prefill_case(seqs, 16, 2, 64, torch.float32, seed=5)
    q, k, v, key_cache, value_cache, *rest = args
    pool = torch.full((key_cache.shape[0], 2, *key_cache.shape[1:]), float("nan"), device=DEVICE)
    pool[:, 0], pool[:, 1] = key_cache, value_cache
    assert not pool[:, 0].is_contiguous()
    assert_matches(prefill_attention(q, k, v, pool[:, 0], pool[:, 1], *rest), expected, torch.float32)


def test_launch_grid_without_host_sync(monkeypatch):
    """The launch reads no value from the device (doing so raises here), and runs
    tokens // BLOCK_M + seqs query blocks per head."""
    args, _ = prefill_case([(3, 200), (0, 1), (17, 100)], 16, 4, 64, torch.float16, seed=2)
    launches = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *a, **kw: launches.append((grid, kw))
    monkeypatch.setattr(attention, "_prefill_attention_kernel", Recorder())

    def host_read(*args, **kwargs):
        pytest.fail("a device value was read on the host")
    for name in ("item", "tolist", "__bool__", "__int__", "__index__", "__float__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    prefill_attention(*args)
    monkeypatch.undo()
    [(grid, kwargs)] = launches
    assert grid == (4, 301 // kwargs["BLOCK_M"] + 3, 1)


def test_head_groups_fit_half_of_l2_and_divide_the_heads():
    """All heads in one group where the batch's keys and values fit L2; else the most heads,
    dividing their count, whose keys and values fit half of it, at least one."""
    mb = 2 ** 20
    l2 = 50 * mb
    assert attention._head_group(32, mb, l2) == 32                 # 32 MB: all of it fits
    assert attention._head_group(40, mb, l2) == 40                 # 40 MB likewise
    assert attention._head_group(32, 4 * mb, l2) == 4              # OPT-6.7B b8 L1024: 6 fit half, 4 divides 32
    assert attention._head_group(40, 4 * mb, l2) == 5              # OPT-13B likewise: 6 fit, 5 divides 40
    assert attention._head_group(32, 2 * mb, l2) == 8              # OPT-1.3B b8 L1024: 12 fit
    assert attention._head_group(7, 10 * mb, l2) == 1              # prime: one head a group
    assert attention._head_group(4, 100 * mb, l2) == 1             # not even one fits: one
    assert attention._head_group(3, 0, l2) == 3


@pytest.mark.parametrize("context", [False, True], ids=["no-context", "context"])
def test_head_groups_run_every_head(monkeypatch, sentinel_empty, context):
    """With an L2 too small for the batch the grid runs the heads in groups (6 heads, 2 at a
    time: grid (2, blocks, 3)); every head's output matches the reference, none left unwritten."""
    launches = record_launches(monkeypatch, attention, "_prefill_attention_kernel")
    spans = [(9, 21), (0, 17)] if context else [(0, 21), (0, 17)]
    args, expected = prefill_case(spans, 8, 6, 16, torch.float32, seed=23)
    q = args[0]
    per_head = (q.shape[0] + (2 * 9 if context else 0)) * 16 * 2 * 4   # its keys and values, float32
    monkeypatch.setattr(attention, "l2_bytes", lambda device: 5 * per_head)   # 2 heads fit half of it
    out = prefill_attention(*args, max_context_len=9 if context else 0)
    assert_matches(out, expected, torch.float32)
    [(_, grid, _, _)] = launches
    assert grid[0] == 2 and grid[2] == 3


BAD_INPUTS = {
    "k shape": lambda a: dict(k=a["k"][:, :1]),
    "v dtype": lambda a: dict(v=a["v"].float()),
    "cache dtype": lambda a: dict(key_cache=a["key_cache"].float(), value_cache=a["value_cache"].float()),
    "cache heads": lambda a: dict(key_cache=a["key_cache"][:, :, :1], value_cache=a["value_cache"][:, :, :1]),
    "value cache strides": lambda a: dict(value_cache=a["value_cache"].transpose(0, 1).contiguous()
                                          .transpose(0, 1)),
    "head_dim stride": lambda a: dict(q=a["q"].transpose(1, 2).contiguous().transpose(1, 2)),
    "misaligned rows": lambda a: dict(q=torch.zeros(7, 2, 65, dtype=a["q"].dtype, device=DEVICE)[..., :64]),
    "int64 cu_seqlens": lambda a: dict(cu_seqlens_q=a["cu_seqlens_q"].long()),
    "cu_seqlens length": lambda a: dict(cu_seqlens_q=a["cu_seqlens_q"][:1]),
    "block table rows": lambda a: dict(block_tables=torch.cat([a["block_tables"]] * 2)),
    "float64": lambda a: {name: a[name].double() for name in ("q", "k", "v", "key_cache", "value_cache")},
}


@pytest.mark.parametrize("change", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_input_checks(change):
    args, _ = prefill_case([(5, 7)], 8, 2, 64, torch.float16, seed=0)
    named = dict(zip(("q", "k", "v", "key_cache", "value_cache", "cu_seqlens_q", "context_lens",
                      "block_tables", "scale"), args))
    assert prefill_attention(**named).shape == named["q"].shape
    with pytest.raises(ValueError, match="prefill_attention"):
        prefill_attention(**{**named, **change(named)})


def test_more_query_blocks_than_a_grid_holds_is_a_value_error(monkeypatch):
    """CUDA's grid has at most 65535 programs along its second axis (query blocks + sequences
    at the tiles that run): past it, a clear error before any launch, not a launch failure."""
    monkeypatch.setattr(attention, "_prefill_attention_kernel", None)     # never reached
    seqs = 65536
    q = torch.zeros(16, 1, 16, device=DEVICE)
    cache = torch.zeros(1, 16, 1, 16, device=DEVICE)
    cu_seqlens = torch.zeros(seqs + 1, **I32)
    cu_seqlens[-1] = 16
    with pytest.raises(ValueError, match="65535"):
        prefill_attention(q, q, q, cache, cache, cu_seqlens, torch.zeros(seqs, **I32), torch.zeros(seqs, 1, **I32),
                          1.0, tiles=Tiles(16, 16, 4, 2))


def _table_tiles() -> list:
    """The distinct tile shapes of every capability's table in the interpreter (which ignores
    warps and stages, so one run per block shape covers an entry); on a GPU, of its own table
    (the sm_90 tiles need more shared memory than an A100 has)."""
    caps = (80, 90) if DEVICE == "cpu" else (attention._capability(torch.device(DEVICE)),)
    tiles = {(t.block_m, t.block_n): t for cap in caps for t in attention.tile_table(cap).values()}
    return sorted(tiles.values())


@pytest.mark.parametrize("tiles", _table_tiles(), ids=lambda t: f"{t.block_m}x{t.block_n}")
def test_every_table_tile_at_head_dim_128(nan_empty, tiles):
    """A query block spanning several key tiles, a sequence ending inside a tile, and a cached
    context with a partial tile, under each tile shape the launcher can pick."""
    seqs = [(37, 260), (0, 3), (130, 64)]
    args, expected = prefill_case(seqs, 16, 2, 128, torch.float16, seed=tiles.block_n)
    assert_matches(prefill_attention(*args, tiles=tiles), expected, torch.float16)


@pytest.mark.parametrize("capability", [80, 90])
def test_compile_check_builds_exactly_the_tiles_the_launcher_picks(capability):
    """Each tile the launcher can pick on a target (OPT's heads; narrow and wide batches, the
    boundary between them at 128 new tokens a sequence) is compiled for that target in its
    dtype, beside the sweep's candidates on sm_90 (head_dim 80 padded, the TMA twins, one loop,
    q in shared memory with its register caps, the warp-specialised and the persistent kernels'
    tiles), and the compile check builds nothing else there."""
    def launch(tiles, head_dim, name):
        d_lo, d_hi = attention._head_split(head_dim, tiles.split_head)
        return (tiles.block_m, tiles.block_n, tiles.num_warps, tiles.num_stages, tiles.tma, (d_lo, d_hi),
                tiles.one_loop, tiles.q_smem and tiles.tma and d_lo + d_hi == head_dim, tiles.max_registers,
                head_dim, name)

    specs = [spec for spec in attention.compile_specs() if capability in spec.targets]
    by_kernel = {kernel: [s for s in specs if s.kernel is kernel] for kernel in (
        attention._prefill_attention_kernel, attention_ws._prefill_attention_ws_kernel,
        attention_persistent._prefill_persistent_kernel)}
    assert sum(map(len, by_kernel.values())) == len(specs)
    built = {(c["BLOCK_M"], c["BLOCK_N"], spec.num_warps, spec.num_stages, c["USE_TMA"], (c["D_LO"], c["D_HI"]),
              c["ONE_LOOP"], c["Q_2D"], spec.max_registers, c["HEAD_DIM"], spec.signature["q_ptr"])
             for spec in by_kernel[attention._prefill_attention_kernel] for c in [spec.constexprs]}
    built_ws = {(c["BLOCK_M"], c["BLOCK_N"], spec.num_warps, spec.num_stages, c["HEAD_DIM"], spec.signature["q_ptr"])
                for spec in by_kernel[attention_ws._prefill_attention_ws_kernel] for c in [spec.constexprs]}
    built_persistent = {(c["BLOCK"], spec.num_warps, spec.num_stages, (c["D_LO"], c["D_HI"]), c["HEAD_DIM"],
                         spec.signature["q_ptr"])
                        for spec in by_kernel[attention_persistent._prefill_persistent_kernel] for c in [spec.constexprs]}
    picked = set()
    for head_dim in (64, 80, 128):
        for tokens, seqs in ((4096, 2), (600, 2), (64, 64), (128 * 64, 64), (128 * 64 + 1, 64)):
            for dtype, name in ((torch.float16, "*fp16"), (torch.bfloat16, "*bf16"), (torch.float32, "*fp32")):
                picked.add(launch(attention.default_tiles(head_dim, dtype, tokens, seqs, capability), head_dim, name))
    half = ("*fp16", "*bf16")
    if capability >= 90:
        picked |= {launch(tiles, 80, name) for tiles in attention.PADDED_80_CANDIDATES for name in half}
        picked |= {launch(tiles, head_dim, name)
                   for pad, candidates in [*attention.TMA_CANDIDATES.items(), *attention.ONE_LOOP_CANDIDATES.items(),
                                           *attention.Q_SMEM_CANDIDATES.items()]
                   for tiles in candidates for head_dim in (64, 80, 128) if pad == (64 if head_dim <= 64 else 128)
                   for name in half}
    ws_tiles = [(pad, t) for pad, candidates in attention.WS_CANDIDATES.items() for t in candidates]
    ws_tiles += [(pad, t) for (_, pad), t in attention._WS_TILES_SM90.items()]
    picked_ws = {(t.block_m, t.block_n, t.num_warps, t.num_stages, head_dim, name) for pad, t in ws_tiles
                 for head_dim in (64, 80, 128) if pad == (64 if head_dim <= 64 else 128) for name in half
                 if capability >= 90}
    # candidates by padded head_dim, the table by head class (64, 80, 128); the table's Gluon
    # entries are attention_wgmma_persistent.py's to build
    persistent_tiles = [(head_dim, t) for pad, candidates in attention.PERSISTENT_CANDIDATES.items()
                        for t in candidates for head_dim in (64, 80, 128) if pad == (64 if head_dim <= 64 else 128)]
    persistent_tiles += [(head_dim, t) for head_class, t in attention._PERSISTENT_TILES_SM90.items() if not t.wgmma
                         for head_dim in (64, 80, 128) if attention._tile_head_dim(head_dim) == head_class]
    picked_persistent = {(t.block_m, t.num_warps, t.num_stages, attention._head_split(head_dim, t.split_head),
                          head_dim, name) for head_dim, t in persistent_tiles for name in half
                         if capability >= 90}
    assert picked == built and picked_ws == built_ws and picked_persistent == built_persistent


def test_sweep_candidates_with_options_are_compile_checked(monkeypatch):
    """Every prefill candidate of the tile sweep (benchmarks/sweep_tiles.py) that asks for an
    option (TMA, a padded head, warp specialisation, one loop, q_smem, a register cap, persistent,
    the Gluon wgmma kernel) is a variant the compile check builds for sm_90 at that head_dim, in
    fp16 (the sweep's dtype);
    and the TMA candidates hold the twin of each sm_90 table entry. Every wgmma candidate is
    listed, as off a GPU: on one the sweep would first run the Gluon probe (two dozen child
    processes launching kernels, minutes) to drop those it saw fail."""
    sweep = sweep_script()
    monkeypatch.setattr(sweep, "_wgmma_probe_passed", lambda case, tiles: True)
    specs = [s for s in attention.compile_specs() if 90 in s.targets and s.signature["q_ptr"] == "*fp16"]
    built = {(c.get("BLOCK_M", c.get("BLOCK")), c.get("BLOCK_N", c.get("BLOCK")), s.num_warps, s.num_stages,
              c.get("USE_TMA", False), c.get("D_HI"), s.uses_warp_specialize, c.get("ONE_LOOP", False),
              s.kernel is attention_persistent._prefill_persistent_kernel, c.get("Q_2D", False), s.max_registers, c["HEAD_DIM"])
             for s in specs for c in [s.constexprs]}
    built_wgmma = {(c["BLOCK_M"], c["BLOCK_N"], s.num_warps, c["STAGES"], c["HEAD_DIM"])
                   for s in attention_wgmma.compile_specs() if s.signature["out_ptr"] == "*fp16"
                   for c in [s.constexprs]}
    # the warp-specialised form: 128 rows in two 64-row consumers, 4 warps the first's
    built_wgmma_ws = {(attention_wgmma_ws.BLOCK_M.value, c["BLOCK_N"], s.num_warps, c["STAGES"], c["PINGPONG"],
                       c["HEAD_DIM"])
                      for s in attention_wgmma_ws.compile_specs() if s.signature["out_ptr"] == "*fp16"
                      for c in [s.constexprs]}
    # the persistent form: one block_m x block_m tile, num_stages slot sets
    built_wgmma_persistent = {(c["BLOCK"], c["BLOCK"], s.num_warps, c["BUFFERS"], c["HEAD_DIM"])
                              for s in attention_wgmma_persistent.compile_specs() if s.signature["out_ptr"] == "*fp16"
                              for c in [s.constexprs]}
    options = 0
    family = sweep.FAMILIES["prefill"]
    for case in family.cases(smoke=False):
        for candidate in family.candidates(case, smoke=False):
            tiles = Tiles(*candidate["tiles"]) if "tiles" in candidate else None
            if tiles is None or tiles[4:] == Tiles(1, 1, 1, 1)[4:]:
                continue   # the default (grouped or not), or plain tiles: the sweep skips any that fail
            options += 1
            if tiles.wgmma and tiles.warp_specialize:   # kernels/attention_wgmma_ws.py
                assert (*tiles[:4], tiles.pingpong, case["head_dim"]) in built_wgmma_ws, (case, candidate)
                continue
            if tiles.wgmma and tiles.persistent:   # kernels/attention_wgmma_persistent.py
                assert case["length"] <= tiles.block_m, (case, candidate)   # elsewhere the default runs
                assert (*tiles[:4], case["head_dim"]) in built_wgmma_persistent, (case, candidate)
                continue
            if tiles.wgmma:   # the Gluon kernel (kernels/attention_wgmma.py)
                assert (*tiles[:4], case["head_dim"]) in built_wgmma, (case, candidate)
                continue
            d_hi = None if tiles.warp_specialize else attention._head_split(case["head_dim"], tiles.split_head)[1]
            key = (*tiles[:4], tiles.tma, d_hi, tiles.warp_specialize, tiles.one_loop, tiles.persistent,
                   tiles.q_smem, tiles.max_registers, case["head_dim"])
            assert key in built, (case, candidate)
    assert options, "the sweep has candidates with options (on sm_90, the capability it assumes off a GPU)"
    twins = {(attention._padded_class(head), tiles._replace(tma=True)) for (_, head), tiles in attention.tile_table(90).items()}
    assert twins <= {(pad, t) for pad, candidates in attention.TMA_CANDIDATES.items() for t in candidates}


def test_narrow_and_wide_batches():
    """Up to 128 new tokens a sequence on average takes the narrow tiles, more the wide ones;
    the table entries are the H200 sweeps' on sm_90, the H100 sweep's on sm_80
    (kernels/attention_tiles.py), with head 80 (two exact tiles) an entry of its own."""
    fp16 = torch.float16
    assert attention.default_tiles(64, fp16, 128 * 64, 64, 90) == Tiles(64, 64, 4, 2)
    assert attention.default_tiles(64, fp16, 128 * 64 + 1, 64, 90) == Tiles(64, 64, 4, 3, True)
    assert attention.default_tiles(128, fp16, 128 * 64, 64, 90) == Tiles(64, 64, 4, 2)
    assert attention.default_tiles(128, fp16, 2048, 1, 90) == Tiles(64, 64, 4, 3, True)
    # TMA's host cost pays only on longer batches
    assert attention.default_tiles(128, fp16, 1023, 1, 90) == Tiles(64, 64, 4, 3)
    assert attention.default_tiles(80, fp16, 2048, 1, 90) == Tiles(64, 64, 4, 3, True)
    assert attention.default_tiles(80, fp16, 128 * 64, 64, 90) == Tiles(64, 32, 4, 3, one_loop=True)
    # short prompts without cached context at heads 64 / 128: the Gluon kernel on sm_90 alone
    assert attention.default_tiles(64, fp16, 128 * 64, 64, 90, context_free=True) == Tiles(64, 64, 4, 3, wgmma=True)
    assert attention.default_tiles(128, fp16, 128 * 64, 64, 90, context_free=True) == Tiles(64, 64, 4, 2, wgmma=True)
    assert attention.default_tiles(128, fp16, 128 * 64, 64, 80, context_free=True) == Tiles(64, 64, 8, 2)
    assert attention.default_tiles(80, fp16, 2048, 1, 80) == Tiles(128, 64, 8, 3)
    assert attention.default_tiles(128, fp16, 128 * 64, 64, 80) == Tiles(64, 64, 8, 2)
    assert [attention._tile_head_dim(d) for d in (32, 64, 80, 96, 112, 128)] == [64, 64, 80, 80, 128, 128]


@pytest.mark.parametrize("tiles,field", [
    ((128, 48, 8, 3), "block_n"), ((64, 128, 4, 2), "block_m"), ((128, 64, 3, 2), "num_warps"),
    ((128, 64, 4, 0), "num_stages"), ((128, 64, 4), "tiles"), ((64, 64, 4, 2, 1), "tiles.tma"),
    ((64, 64, 4, 2, True, 1), "tiles.split_head"), ((64, 64, 4, 2, True, True, 1), "tiles.warp_specialize"),
    ((128, 64, 8, 2, True, True, True), "tiles.warp_specialize needs num_warps=4 and block_m=128"),
    ((64, 64, 4, 2, True, True, True), "tiles.warp_specialize needs num_warps=4 and block_m=128"),
    ((128, 64, 4, 3, False, True, True), "tiles.warp_specialize needs num_stages <= 2"),
    ((64, 64, 4, 2, True, True, True, 1), "tiles"),
    ((64, 32, 4, 1, False, True, False, False, True), "tiles.persistent needs block_n == block_m"),
    ((64, 64, 4, 1, True, True, False, False, True), "tiles.persistent is a kernel of its own"),
    ((64, 64, 4, 1, False, True, False, True, True), "tiles.persistent is a kernel of its own"),
    ((64, 64, 4, 1, False, True, False, False, 1), "tiles.persistent must be a bool"),
    ((64, 64, 4, 2, True, True, False, False, False, 1), "tiles.q_smem must be a bool"),
    ((64, 64, 4, 2, False, True, False, False, False, True), "tiles.q_smem needs tiles.tma"),
    ((128, 64, 4, 2, True, True, True, False, False, True), "tiles.q_smem is the main kernel's option"),
    ((64, 64, 4, 2, False, True, False, False, False, False, True), "tiles.max_registers"),
    ((64, 64, 4, 2, False, True, False, False, False, False, 128.0), "tiles.max_registers"),
    ((64, 64, 4, 2, False, True, False, False, False, False, 8), "tiles.max_registers"),
    ((64, 64, 4, 2, False, True, False, False, False, False, 256), "tiles.max_registers"),
    ((64, 64, 4, 2, False, True, False, False, False, False, 0, 1), "tiles")])
def test_tile_overrides_are_checked(tiles, field):
    args, _ = prefill_case([(0, 9)], 8, 2, 64, torch.float16, seed=0)
    with pytest.raises(ValueError, match=field):
        prefill_attention(*args, tiles=tiles)


# --------------------------------------------------------------------------------------------
# TMA loads (tiles.tma): q and the off-diagonal new-token K/V tiles by descriptor
# --------------------------------------------------------------------------------------------

@pytest.fixture
def tma_count(monkeypatch):
    """How many TMA descriptors the launcher builds: proof that the TMA path really ran."""
    built = []
    real = attention._tma_descriptor

    def counting(t, rows, width, flat=False):
        built.append((rows, width, flat))
        return real(t, rows, width, flat)
    monkeypatch.setattr(attention, "_tma_descriptor", counting)
    return built


# head_dim 80 reads 128-wide boxes whose last 48 columns TMA fills with zeros; in q they meet
# the next head's keys if that went wrong. Sequences of several query blocks, one ending inside
# a tile, cached contexts with partial tiles (pointer loads beside the TMA ones).
@pytest.mark.parametrize("dtype,head_dim,tiles,widths", [
    (torch.float32, 80, Tiles(16, 16, 4, 2, True), (64, 16)), (torch.float16, 64, Tiles(32, 16, 4, 2, True), (64,)),
    (torch.float16, 80, Tiles(64, 32, 8, 2, True), (64, 16)),
    (torch.float16, 80, Tiles(32, 32, 4, 2, True, False), (128,)),
    (torch.float16, 128, Tiles(64, 64, 8, 3, True), (128,))],
    ids=["fp32-80", "fp16-64", "fp16-80", "fp16-80-padded", "fp16-128"])
def test_tma_tiles_match_the_reference(nan_empty, tma_count, dtype, head_dim, tiles, widths):
    seqs = [(0, 150), (17, 5), (0, 0), (33, 97)]
    args, expected = prefill_case(seqs, 16, 3, head_dim, dtype, seed=head_dim + tiles.block_m)
    assert_matches(prefill_attention(*args, tiles=tiles), expected, dtype)
    rows = (tiles.block_m, tiles.block_n, tiles.block_n)
    assert tma_count == [(r, width, False) for width in widths for r in rows]


def test_tma_keeps_other_sequences_out(tma_count):
    """A sequence whose new tokens are all NaN sits right after one that ends inside a tile:
    the first one's output stays exact (the diagonal tile's masked loads never let the next
    sequence's values in, as a bulk copy would)."""
    args, expected = prefill_case([(5, 45), (0, 40)], 16, 2, 64, torch.float16, seed=3)
    q, k, v = args[:3]
    for t in (q, k, v):
        t[45:] = float("nan")
    out = prefill_attention(*args, tiles=Tiles(32, 16, 4, 2, True))
    assert_matches(out[:45], expected[:45], torch.float16)
    assert tma_count, "the TMA path did not run"


def test_tma_falls_back_where_descriptors_cannot_address_the_rows(nan_empty, tma_count):
    """One head whose head stride is not a multiple of 16 bytes: allowed by the input checks
    (the dimension has size 1), not addressable by TMA, so pointer loads run instead."""
    args, expected = prefill_case([(3, 40)], 16, 1, 64, torch.float32, seed=4)
    rows = args[0].contiguous()
    q = torch.as_strided(rows, rows.shape, (rows.stride(0), 3, 1))
    assert_matches(prefill_attention(q, *args[1:], tiles=Tiles(16, 16, 4, 2, True)), expected, torch.float32)
    assert tma_count == []


# q in shared memory (Tiles.q_smem): q by 2-D boxes of its rows' columns, k and v as with tma;
# several query blocks, a sequence ending inside a tile, an empty one, cached contexts with
# partial tiles; head 80 split in two 2-D boxes (64 + 16 columns from the head's start).
@pytest.mark.parametrize("dtype,head_dim,tiles,widths", [
    (torch.float16, 64, Tiles(64, 32, 4, 2, True, q_smem=True), (64,)),
    (torch.float16, 80, Tiles(32, 16, 8, 2, True, q_smem=True, max_registers=128), (64, 16)),
    (torch.float32, 128, Tiles(16, 16, 4, 2, True, q_smem=True), (128,)),
    (torch.bfloat16, 128, Tiles(64, 32, 4, 3, True, q_smem=True), (128,))],
    ids=["fp16-64", "fp16-80", "fp32-128", "bf16-128"])
def test_q_smem_tiles_match_the_reference(nan_empty, tma_count, dtype, head_dim, tiles, widths):
    seqs = [(0, 150), (17, 5), (0, 0), (33, 97)]
    args, expected = prefill_case(seqs, 16, 3, head_dim, dtype, seed=head_dim + tiles.block_n)
    assert_matches(prefill_attention(*args, tiles=tiles), expected, dtype)
    assert tma_count == [(rows, width, flat) for width in widths
                         for rows, flat in ((tiles.block_m, True), (tiles.block_n, False), (tiles.block_n, False))]


def test_q_smem_keeps_other_sequences_and_heads_out(tma_count):
    """q's 2-D box spans every head's columns of its rows: a NaN in the neighbouring heads, and in
    the next sequence's rows, which the box also covers, leaves this head's outputs exact."""
    args, expected = prefill_case([(5, 45), (0, 40)], 16, 3, 64, torch.float16, seed=5)
    q, k, v = args[:3]
    q[:, 0] = q[:, 2] = float("nan")       # every token's heads 0 and 2
    for t in (q, k, v):
        t[45:] = float("nan")
    out = prefill_attention(*args, tiles=Tiles(32, 16, 4, 2, True, q_smem=True))
    assert_matches(out[:45, 1], expected[:45, 1], torch.float16)
    assert (32, 64, True) in tma_count


@pytest.mark.parametrize("layout", ["padded-head", "heads-apart"])
def test_q_smem_keeps_the_3d_box_where_a_2d_one_would_read_other_columns(nan_empty, tma_count, layout):
    """A head padded to its tile (80 in one 128-wide box) or q rows whose heads do not sit back to
    back: a 2-D box would take the next head's or another tensor's columns (NaN here) for the
    padding, so q comes by the 3-D box, which reads zeros past the head."""
    args, expected = prefill_case([(3, 70), (0, 21)], 16, 2, 80, torch.float16, seed=6)
    tiles = Tiles(32, 32, 4, 2, True, q_smem=True)
    if layout == "padded-head":
        tiles, width = tiles._replace(split_head=False), 128
        args[0][:, 1] = float("nan")        # head 1, whose columns follow head 0's
    else:   # q's heads 96 elements apart in its rows, as in a [tokens, heads, 96] tensor's first 80 columns
        wide = torch.full((args[0].shape[0], 2, 96), float("nan"), dtype=torch.float16, device=DEVICE)
        wide[:, :, :80] = args[0]
        args, width = (wide[:, :, :80], *args[1:]), 64
    assert_matches(prefill_attention(*args, tiles=tiles)[:, 0], expected[:, 0], torch.float16)
    assert tma_count[0] == (32, width, False)


def test_register_cap_reaches_the_launch(monkeypatch):
    """max_registers goes to the launch as ptxas's maxnreg (the interpreter ignores it; on a GPU it
    decides how many programs share an SM); 0 asks for no cap."""
    launches = record_launches(monkeypatch, attention, "_prefill_attention_kernel")
    args, expected = prefill_case([(0, 40)], 16, 2, 64, torch.float16, seed=7)
    for cap in (128, 0):
        assert_matches(prefill_attention(*args, tiles=Tiles(32, 16, 4, 2, max_registers=cap)), expected,
                       torch.float16)
    assert [kwargs["maxnreg"] for _, _, _, kwargs in launches] == [128, None]


def test_tma_needs_hopper(monkeypatch):
    args, _ = prefill_case([(0, 9)], 8, 2, 64, torch.float16, seed=0)
    monkeypatch.setattr(attention, "_capability", lambda device: 80)
    with pytest.raises(ValueError, match="tiles.tma needs compute capability 90"):
        prefill_attention(*args, tiles=(64, 64, 4, 2, True))


# --------------------------------------------------------------------------------------------
# The warp-specialised kernel (tiles.warp_specialize, for batches without cached context)
# --------------------------------------------------------------------------------------------

@pytest.fixture
def ws_launches(monkeypatch):
    """The tiles of each warp-specialised launch: proof that that kernel, not the main one, ran."""
    launched = []
    real = attention_ws.launch

    def recording(q, k, v, out, cu_seqlens_q, scale, tiles, grid, *caches_and_slots):
        launched.append(tiles)
        return real(q, k, v, out, cu_seqlens_q, scale, tiles, grid, *caches_and_slots)
    monkeypatch.setattr(attention_ws, "launch", recording)
    return launched


def ws(*tiles) -> Tiles:
    return Tiles(*tiles, warp_specialize=True)


# Sequences of several query blocks, one ending inside a key tile, an empty one, one token;
# head 80 padded to 128 (TMA reads the 48 columns past it as zeros); the sweep's candidate tiles
# (attention.WS_CANDIDATES), which on a GPU are the compiled variants the compile check verified.
@pytest.mark.parametrize("dtype,head_dim,tiles", [
    (torch.float16, 64, ws(128, 64, 4, 2)), (torch.float16, 80, ws(128, 32, 4, 2)),
    (torch.float16, 128, ws(128, 64, 4, 2)), (torch.bfloat16, 64, ws(128, 128, 4, 2)),
    (torch.bfloat16, 128, ws(128, 32, 4, 2))],
    ids=["fp16-64", "fp16-80", "fp16-128", "bf16-64", "bf16-128"])
def test_warp_specialized_tiles_match_the_reference(nan_empty, ws_launches, dtype, head_dim, tiles):
    assert tiles in attention.WS_CANDIDATES[64 if head_dim <= 64 else 128]
    seqs = [(0, 150), (0, 5), (0, 0), (0, 297), (0, 1), (0, 33)]
    args, expected = prefill_case(seqs, 16, 3, head_dim, dtype, seed=head_dim + tiles.block_n)
    out = prefill_attention(*args, tiles=tiles, max_context_len=0)
    assert_matches(out, expected, dtype)
    assert ws_launches == [tiles]
    if DEVICE == "cuda":   # as the engine replays it: the descriptors' scratch inside the graph
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            replayed = prefill_attention(*args, tiles=tiles, max_context_len=0)
        replayed.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(replayed, out)


def test_warp_specialized_keeps_other_sequences_out(ws_launches):
    """The next sequence's new tokens are all NaN: the per-sequence descriptors read zeros past
    the first sequence, which ends inside a key tile, so its output stays exact."""
    args, expected = prefill_case([(0, 45), (0, 40)], 16, 2, 64, torch.float16, seed=3)
    for t in args[:3]:
        t[45:] = float("nan")
    out = prefill_attention(*args, tiles=ws(128, 16, 4, 2), max_context_len=0)
    assert_matches(out[:45], expected[:45], torch.float16)
    assert ws_launches


def test_warp_specialized_packed_after_an_offset(sentinel_empty, ws_launches):
    """Tokens before cu_seqlens_q[0] (NaN here) belong to no sequence: never read, and their
    output rows stay as torch.empty left them. More of them than a query block, so some
    programs find no block at all."""
    args, expected = prefill_case([(0, 20), (0, 13)], 8, 1, 64, torch.float16, seed=6)
    q, k, v, key_cache, value_cache, cu, context_lens, block_tables, scale = args
    lead = 300
    shifted = [torch.cat([torch.full((lead, *t.shape[1:]), float("nan"), dtype=t.dtype, device=DEVICE), t])
               for t in (q, k, v)]
    out = prefill_attention(*shifted, key_cache, value_cache, cu + lead, context_lens, block_tables, scale,
                            tiles=ws(128, 16, 4, 2), max_context_len=0)
    assert_matches(out[lead:], expected, torch.float16)
    assert (out[:lead] == SENTINEL).all() and ws_launches


def test_warp_specialized_falls_back_where_descriptors_cannot_address_the_rows(nan_empty, ws_launches):
    """As for the main kernel's TMA: a head stride that is not a multiple of 16 bytes leaves the
    warp-specialised kernel (device-side descriptors) out; the main kernel runs."""
    args, expected = prefill_case([(0, 40)], 16, 1, 64, torch.float16, seed=4)
    rows = args[0].contiguous()
    q = torch.as_strided(rows, rows.shape, (rows.stride(0), 3, 1))
    out = prefill_attention(q, *args[1:], tiles=ws(128, 16, 4, 2), max_context_len=0)
    assert_matches(out, expected, torch.float16)
    assert ws_launches == []


def test_warp_specialized_only_where_the_batch_has_no_context(monkeypatch, ws_launches):
    """Without a host bound of 0 on the context, or in float32 (CUDA cores), the main kernel runs
    at the launcher's own tiles (the warp-specialised ones are compile-checked for their kernel
    only) and sees the context."""
    launches = record_launches(monkeypatch, attention, "_prefill_attention_kernel")
    cap = attention._capability(torch.device(DEVICE))
    for dtype, seqs, bound in ((torch.float16, [(17, 30), (0, 20)], None), (torch.float16, [(17, 30), (0, 20)], 17),
                               (torch.float32, [(0, 30)], 0)):
        launches.clear()
        args, expected = prefill_case(seqs, 16, 2, 64, dtype, seed=5)
        assert_matches(prefill_attention(*args, tiles=ws(128, 16, 4, 2), max_context_len=bound), expected, dtype)
        own = attention.default_tiles(64, dtype, sum(n for _, n in seqs), len(seqs), cap)
        assert [tuple(kw[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"))
                for _, _, _, kw in launches] == [own[:4]]
    assert ws_launches == []


@pytest.mark.parametrize("dtype,tiles", [
    (torch.float16, None), (torch.float32, None), (torch.bfloat16, Tiles(32, 16, 4, 2)),
    (torch.float16, Tiles(64, 32, 4, 2, True))], ids=["fp16-own", "fp32-own", "bf16-32x16", "fp16-64x32-tma"])
def test_batches_known_to_have_no_context_never_read_it(nan_empty, dtype, tiles):
    """max_context_len=0 runs the main kernel without its context loops: context_lens claiming 5
    cached tokens, whose cache slots hold NaN, change nothing; with the bound unknown, the same
    lengths are read and the NaN shows (so the poison would catch a kernel that reads them)."""
    seqs = [(0, 70), (0, 1), (0, 33), (0, 16)]
    args, expected = prefill_case(seqs, 8, 2, 80, dtype, seed=3)
    poisoned = list(args)
    poisoned[6] = torch.full_like(args[6], 5)    # context_lens
    assert_matches(prefill_attention(*poisoned, tiles=tiles, max_context_len=0), expected, dtype)
    assert not torch.isfinite(prefill_attention(*poisoned, tiles=tiles)).all()


def test_warp_specialize_needs_hopper(monkeypatch):
    args, _ = prefill_case([(0, 9)], 8, 2, 64, torch.float16, seed=0)
    monkeypatch.setattr(attention, "_capability", lambda device: 80)
    with pytest.raises(ValueError, match="tiles.warp_specialize needs compute capability 90"):
        prefill_attention(*args, tiles=ws(128, 64, 4, 2), max_context_len=0)


def test_warp_specialized_table_entries_serve_context_free_batches(monkeypatch, ws_launches):
    """A warp-specialised entry in the sm_90 table (what a sweep that shows it winning would add)
    runs for a batch the host knows has no context, and never for one that may have some, which
    keeps the main table's tiles; both match the reference."""
    chosen = ws(128, 16, 4, 2)
    monkeypatch.setitem(attention._WS_TILES_SM90, ("wide", 64), chosen)
    cap = attention._capability(torch.device(DEVICE))
    seqs = [(0, 300), (0, 157)]
    args, expected = prefill_case(seqs, 16, 2, 64, torch.float16, seed=9)
    main = attention.tile_table(cap)[("wide", 64)]._replace(tma=False)     # (457 tokens: no TMA)
    assert attention.default_tiles(64, torch.float16, 457, 2, cap, context_free=True) == (chosen if cap >= 90 else main)
    assert attention.default_tiles(64, torch.float16, 457, 2, cap) == main
    for bound in (0, None):
        assert_matches(prefill_attention(*args, max_context_len=bound), expected, torch.float16)
    assert ws_launches == ([chosen] if cap >= 90 else [])


# --------------------------------------------------------------------------------------------
# slot_mapping: the KV-cache write inside the launch
# --------------------------------------------------------------------------------------------

def new_token_slots(seqs, block_tables: torch.Tensor, block_size: int, skipped=()) -> torch.Tensor:
    """The cache slot of every new token of `seqs` ((context, new) pairs) through its table row,
    -1 for the packed token indices in `skipped` (padding)."""
    table = block_tables.tolist()
    slots = [table[i][pos // block_size] * block_size + pos % block_size
             for i, (context, new) in enumerate(seqs) for pos in range(context, context + new)]
    for t in skipped:
        slots[t] = -1
    return torch.tensor(slots, dtype=torch.int64, device=DEVICE)


# Each query block's program stores its own rows: several diagonal tiles per block (32x16), key
# tiles before the block in the same loop (one_loop, also with q by TMA), the launcher's own tiles,
# head 80 as two exact tiles and padded, float32, float8 caches, and the warp-specialised kernel
# (which stores its block's rows after its loop). Contexts before the new tokens, a sequence of one
# token, and padding tokens (slot -1) that must not be stored.
@pytest.mark.parametrize("dtype,head_dim,tiles,cache_dtype,no_context", [
    (torch.float16, 80, Tiles(32, 16, 4, 2), None, False),
    (torch.float16, 80, Tiles(32, 16, 4, 2, split_head=False), None, False),
    (torch.float16, 64, Tiles(64, 32, 4, 3, one_loop=True), None, False),
    (torch.float16, 64, Tiles(32, 32, 4, 2, True, one_loop=True), None, True),
    (torch.float16, 128, None, None, False),
    (torch.float32, 80, None, None, False),
    (torch.float16, 80, Tiles(32, 16, 4, 2), torch.float8_e4m3fn, False),
    (torch.bfloat16, 64, Tiles(128, 32, 4, 2, warp_specialize=True), None, True),
    (torch.float16, 80, Tiles(128, 64, 4, 2, warp_specialize=True), torch.float8_e4m3fn, True)],
    ids=["32x16-split-80", "32x16-padded-80", "one-loop", "one-loop-tma-no-ctx", "own-tiles-128", "fp32",
         "fp8-cache", "warp-specialized", "warp-specialized-80-fp8"])
def test_slot_mapping_stores_each_new_token_once(nan_empty, ws_launches, dtype, head_dim, tiles, cache_dtype,
                                                 no_context):
    seqs = [(0 if no_context else c, n) for c, n in ((9, 70), (0, 33), (17, 1), (1, 47))]
    args, expected = prefill_case(seqs, 8, 2, head_dim, dtype, seed=head_dim + (tiles.block_n if tiles else 0))
    q, k, v, key_cache, value_cache = args[:5]
    if cache_dtype is not None:   # the context as a float8 cache holds it, NaN elsewhere as before
        key_cache, value_cache = key_cache.to(cache_dtype), value_cache.to(cache_dtype)
        args = (*args[:3], key_cache, value_cache, *args[5:])
    slots = new_token_slots(seqs, args[7], 8, skipped=(5, 71))
    expect_k, expect_v = key_cache.clone(), value_cache.clone()
    attention.write_kv_cache_ref(k, v, expect_k, expect_v, slots)
    bound = 0 if no_context else None
    extra = {} if tiles is None else dict(tiles=tiles)
    plain = prefill_attention(*args, max_context_len=bound, **extra)
    out = prefill_attention(*args, max_context_len=bound, slot_mapping=slots, **extra)
    torch.testing.assert_close(key_cache, expect_k, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(value_cache, expect_v, atol=0, rtol=0, equal_nan=True)
    # the write changes nothing the attention reads: the same output as without it
    assert torch.equal(out, plain)
    assert bool(ws_launches) == bool(tiles and tiles.warp_specialize)
    if cache_dtype is None or no_context:    # a float8 context is read rounded: not what expected holds
        assert_matches(out, expected, dtype)


def test_slot_mapping_reaches_the_kernel(monkeypatch):
    """With slot_mapping the main kernel is compiled with its store; without, the slot argument
    is None and nothing is stored."""
    launches = record_launches(monkeypatch, attention, "_prefill_attention_kernel")
    seqs = [(3, 20)]
    args, _ = prefill_case(seqs, 8, 2, 64, torch.float16, seed=1)
    slots = new_token_slots(seqs, args[7], 8)
    prefill_attention(*args, slot_mapping=slots)
    prefill_attention(*args)
    (_, _, with_slots, options), (_, _, without, plain_options) = launches
    assert with_slots[15] is slots and options["WRITE_KV"] is True
    assert without[15] is None and plain_options["WRITE_KV"] is False


@pytest.mark.parametrize("bad", ["short", "int32", "strided"])
def test_slot_mapping_is_checked(bad):
    args, _ = prefill_case([(0, 20)], 8, 1, 64, torch.float16, seed=2)
    slots = torch.arange(20, device=DEVICE)
    slots = {"short": slots[:19], "int32": slots.int(), "strided": torch.arange(40, device=DEVICE)[::2]}[bad]
    with pytest.raises(ValueError, match="slot_mapping"):
        prefill_attention(*args, slot_mapping=slots)


# --------------------------------------------------------------------------------------------
# The persistent kernel (tiles.persistent): prompts that fit one tile, no cached context
# --------------------------------------------------------------------------------------------

def persistent(block: int, warps: int = 4, **options) -> Tiles:
    return Tiles(block, block, warps, 1, persistent=True, **options)


@pytest.fixture
def persistent_launches(monkeypatch):
    """(grid, items) of each launch of the persistent kernel: proof that it, not the main one, ran."""
    launches = record_launches(monkeypatch, attention_persistent, "_prefill_persistent_kernel")
    record_launches(monkeypatch, attention, "_prefill_attention_kernel", launches=launches)

    def persistent_only():
        return [(grid, args[8] * args[9]) for name, grid, args, _ in launches if name == "_prefill_persistent_kernel"]
    persistent_only.all = launches
    return persistent_only


# A full tile, one token, an empty sequence, a tile less one, a prime length, and padding tokens
# (slot -1) that must not be stored, over NaN-poisoned permuted cache blocks. Fewer programs
# than (sequence, head) items, so each program runs several and reads its next item's bounds
# ahead, and more programs than items; head 80 as two exact tiles and padded; fp32 and bf16.
@pytest.mark.parametrize("dtype,head_dim,block,programs,split_head", [
    (torch.float16, 128, 32, 2, True), (torch.bfloat16, 64, 64, 132, True), (torch.float32, 80, 32, 5, True),
    (torch.float16, 80, 16, 3, False)],
    ids=["fp16-128-2-programs", "bf16-64-more-programs-than-items", "fp32-80-split", "fp16-80-padded"])
def test_persistent_kernel_matches_the_reference(nan_empty, monkeypatch, persistent_launches, dtype, head_dim,
                                                 block, programs, split_head):
    monkeypatch.setattr(attention_persistent, "sm_count", lambda device: programs)
    seqs = [(0, n) for n in (block, 1, 0, block - 1, 13 % block, 2)]
    heads = 3
    args, expected = prefill_case(seqs, 8, heads, head_dim, dtype, seed=block + head_dim)
    q, k, v, key_cache, value_cache = args[:5]
    slots = new_token_slots(seqs, args[7], 8, skipped=(block + 2,))
    expect_k, expect_v = key_cache.clone(), value_cache.clone()
    attention.write_kv_cache_ref(k, v, expect_k, expect_v, slots)
    out = prefill_attention(*args, tiles=persistent(block, split_head=split_head), max_context_len=0,
                            max_query_len=block, slot_mapping=slots)
    assert_matches(out, expected, dtype)
    torch.testing.assert_close(key_cache, expect_k, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(value_cache, expect_v, atol=0, rtol=0, equal_nan=True)
    items = len(seqs) * heads
    assert persistent_launches() == [((min(programs, items),), items)]
    # without the store: the same output, and the cache as it was
    before = key_cache.clone()
    assert torch.equal(prefill_attention(*args, tiles=persistent(block, split_head=split_head), max_context_len=0,
                                         max_query_len=block), out)
    torch.testing.assert_close(key_cache, before, atol=0, rtol=0, equal_nan=True)


def test_persistent_kernel_writes_only_its_sequences_rows(sentinel_empty, monkeypatch):
    """Tokens before cu_seqlens[0] and after cu_seqlens[-1] (NaN there) belong to no item: their
    output rows keep what torch.empty left, their slots stay unstored; a short last sequence
    before the padding."""
    monkeypatch.setattr(attention_persistent, "sm_count", lambda device: 2)
    seqs = [(0, 16), (0, 3), (0, 1)]
    args, expected = prefill_case(seqs, 8, 2, 64, torch.float32, seed=12)
    q, k, v, key_cache, value_cache, cu, context_lens, block_tables, scale = args
    lead, tail = 5, 7
    nan = torch.full((1, *q.shape[1:]), float("nan"), device=DEVICE)
    padded = [torch.cat([nan.expand(lead, -1, -1), t, nan.expand(tail, -1, -1)]) for t in (q, k, v)]
    slots = torch.cat([torch.zeros(lead, dtype=torch.int64, device=DEVICE),
                       new_token_slots(seqs, block_tables, 8),
                       torch.ones(tail, dtype=torch.int64, device=DEVICE)])
    expect_k, expect_v = key_cache.clone(), value_cache.clone()
    attention.write_kv_cache_ref(k, v, expect_k, expect_v, slots[lead:lead + k.shape[0]])
    out = prefill_attention(*padded, key_cache, value_cache, cu + lead, context_lens, block_tables, scale,
                            tiles=persistent(16), max_context_len=0, max_query_len=16, slot_mapping=slots)
    assert_matches(out[lead:-tail], expected, torch.float32)
    assert (out[:lead] == SENTINEL).all() and (out[-tail:] == SENTINEL).all()
    torch.testing.assert_close(key_cache, expect_k, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(value_cache, expect_v, atol=0, rtol=0, equal_nan=True)


@pytest.fixture
def recorded_prefetches(monkeypatch):
    """The persistent kernel's L2 prefetch, which is inline PTX, runs in the interpreter as a
    recorder: each call's addresses (an int64 array) in the list returned, in call order."""
    if DEVICE != "cpu":
        pytest.skip("the interpreter alone can record what a kernel's inline PTX is asked to do")
    from triton.runtime import interpreter
    calls = []

    def record(builder, asm, constraints, values, type, is_pure, pack):
        assert "prefetch.global.L2" in asm, asm
        (addresses,) = values
        calls.append(addresses.data.astype(np.int64).ravel())
        dummy = interpreter.TensorHandle(np.zeros(addresses.data.shape, dtype=np.int32), interpreter.tl.int32)

        class Result:
            def get_result(self, index):
                return dummy
        return Result()
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_inline_asm", record)
    for module in (attention, attention_persistent):   # as on a GPU: prefetch on
        monkeypatch.setattr(module, "nvidia_capability", lambda device: 90)
    return calls


# fp32 head 80: 320-byte rows, 4 lines asked for (the last clamped to the row's last element);
# bf16 head 128 with separate q, k, v; tokens before and after the sequences; sequences of 1 and
# 0 tokens, the last one short; 2 and 3 programs, so each runs several items.
@pytest.mark.parametrize("dtype,head_dim,separate,programs", [
    (torch.float32, 80, False, 2), (torch.bfloat16, 128, True, 3)], ids=["fp32-80-packed", "bf16-128-separate"])
def test_persistent_prefetch_asks_only_for_the_next_items_rows(recorded_prefetches, monkeypatch, dtype, head_dim,
                                                              separate, programs):
    """Every address the L2 prefetch asks for is an element of q, k or v (the order of the
    calls) in a row of a sequence, at a column inside the head; and the (token, head) rows asked
    for are exactly those of each program's next item."""
    monkeypatch.setattr(attention_persistent, "sm_count", lambda device: programs)
    lens, heads, lead, tail = [16, 1, 0, 9, 16, 2], 3, 2, 3
    tokens = lead + sum(lens) + tail
    q, k, v = packed_qkv(tokens, heads, head_dim, gen(3), dtype)
    if separate:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    cu = [lead]
    for n in lens:
        cu.append(cu[-1] + n)
    cache = torch.zeros(1, 8, heads, head_dim, dtype=dtype, device=DEVICE)
    # cu_seqlens as the head of a longer buffer whose next entries would send a read past the
    # last sequence (the last items have no next one) far past the tokens
    cu_seqlens = torch.tensor(cu + [10 ** 6] * 4, **I32)[:len(cu)]
    prefill_attention(q, k, v, cache, cache.clone(), cu_seqlens, torch.zeros(len(lens), **I32),
                      torch.zeros(len(lens), 1, **I32), head_dim ** -0.5, tiles=persistent(16), max_context_len=0,
                      max_query_len=16)
    seq_of = {t: s for s in range(len(lens)) for t in range(cu[s], cu[s + 1])}
    asked = set()
    assert recorded_prefetches and len(recorded_prefetches) % 3 == 0
    for i, addresses in enumerate(recorded_prefetches):
        name, t = "qkv"[i % 3], (q, k, v)[i % 3]
        for address in addresses.tolist():
            offset, misaligned = divmod(address - t.data_ptr(), t.element_size())
            token, within = divmod(offset, t.stride(0))
            head, column = divmod(within, t.stride(1))
            assert not misaligned and token in seq_of and head < heads and column < head_dim, (name, address)
            asked.add((name, token, head))
    items = len(lens) * heads
    expected = set()
    for program in range(programs):
        mine = list(range(program, items, programs))
        for item, later in zip(mine, mine[1:]):
            if lens[item // heads] and lens[later // heads]:
                seq = later // heads
                expected |= {(name, token, later % heads) for name in "qkv" for token in range(cu[seq], cu[seq + 1])}
    assert asked == expected


@pytest.mark.parametrize("seqs,max_context_len,max_query_len", [
    ([(0, 20), (0, 32)], 0, None), ([(0, 20), (0, 33)], 0, 33), ([(5, 20), (0, 32)], 5, 32),
    ([(0, 20), (0, 32)], None, 32)],
    ids=["length-unknown", "longer-than-the-tile", "cached-context", "context-unknown"])
def test_persistent_tiles_run_the_main_kernel_where_the_host_cannot_promise_a_fit(
        nan_empty, persistent_launches, seqs, max_context_len, max_query_len):
    """Without a host bound of at most block_m new tokens a sequence, or one of 0 on the context,
    the main kernel runs at the launcher's own tiles and sees all of each sequence."""
    args, expected = prefill_case(seqs, 8, 2, 64, torch.float16, seed=7)
    out = prefill_attention(*args, tiles=persistent(32), max_context_len=max_context_len,
                            max_query_len=max_query_len)
    assert_matches(out, expected, torch.float16)
    cap = attention._capability(torch.device(DEVICE))
    own = attention.default_tiles(64, torch.float16, sum(n for _, n in seqs), len(seqs), cap)
    assert persistent_launches() == []
    assert [tuple(kw[key] for key in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"))
            for _, _, _, kw in persistent_launches.all] == [own[:4]]


def test_persistent_table_entries_serve_short_context_free_batches(monkeypatch, persistent_launches):
    """A persistent entry in the sm_90 table (what a sweep that shows it winning would add) runs
    for a batch the host knows has no context and prompts that fit, and for no other batch."""
    chosen = persistent(64)
    monkeypatch.setitem(attention._PERSISTENT_TILES_SM90, 64, chosen)
    fp16 = torch.float16
    assert attention.default_tiles(64, fp16, 100, 2, 90, context_free=True, max_query_len=64) == chosen
    for kwargs in (dict(context_free=True, max_query_len=65), dict(context_free=True), dict(max_query_len=64)):
        assert not attention.default_tiles(64, fp16, 100, 2, 90, **kwargs).persistent
    assert not attention.default_tiles(64, fp16, 100, 2, 80, context_free=True, max_query_len=64).persistent
    assert not attention.default_tiles(128, fp16, 100, 2, 90, context_free=True, max_query_len=64).persistent
    seqs = [(0, 64), (0, 36)]
    args, expected = prefill_case(seqs, 16, 2, 64, fp16, seed=4)
    cap = attention._capability(torch.device(DEVICE))
    assert_matches(prefill_attention(*args, max_context_len=0, max_query_len=64), expected, fp16)
    assert_matches(prefill_attention(*args, max_context_len=0, max_query_len=100), expected, fp16)
    assert len(persistent_launches()) == (1 if cap >= 90 else 0)


# The shared op tests pass head_dim ** -0.5 and v of k's strides; the warp-specialised and the
# persistent kernels have launchers of their own, each passing the scale and v's strides on.
@pytest.mark.parametrize("tiles", [ws(128, 32, 4, 2), persistent(32)], ids=["warp_specialized", "persistent"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_own_kernels_take_their_scale_and_the_strides_of_v(nan_empty, ws_launches, persistent_launches, tiles,
                                                           dtype):
    args, expected = prefill_case([(0, 21), (0, 1), (0, 32)], 8, 2, 80, dtype, seed=17, scale=0.3, own_v=True)
    assert args[2].stride(0) != args[1].stride(0)
    out = prefill_attention(*args, tiles=tiles, max_context_len=0, max_query_len=32)
    assert_matches(out, expected, dtype)
    # the kernel meant ran, not the main one (which runs fp32 for the warp-specialised tiles)
    if tiles.persistent:
        assert persistent_launches()[0][1] == 6
    elif dtype != torch.float32:
        assert ws_launches


@pytest.mark.parametrize("name", ["max_context_len", "max_query_len"])
@pytest.mark.parametrize("bound", [-1, True, 1.0, "0"])
def test_host_bounds_are_checked(name, bound):
    args, _ = prefill_case([(0, 9)], 8, 2, 64, torch.float16, seed=0)
    with pytest.raises(ValueError, match=name):
        prefill_attention(*args, **{name: bound})
