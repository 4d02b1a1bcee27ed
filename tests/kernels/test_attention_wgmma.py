"""The Gluon wgmma prefill kernel (kernels/attention_wgmma.py, Tiles.wgmma).

Gluon does not run in the Triton interpreter, so on CPU only what surrounds the kernel is
tested: the tile checks, which inputs it takes, that its tiles fall back to the main kernel where
it cannot run, and (by the compile check) that it compiles for sm_90 with the QK^T of one key
tile in flight beside the PV of the one before. On an sm_90 GPU the kernel itself runs against
the float64 reference, after benchmarks/wgmma_probe.py has run its first launches in child
processes with a time limit (a wrong barrier phase hangs rather than fails)."""
from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from kernel_testing import (DEVICE, compile_only, fill_empty, gen, load_benchmark, packed_qkv, randn,
                            record_launches)
from opt_fast.kernels import (attention, attention_persistent, attention_tiles, attention_wgmma,
                              attention_wgmma_persistent, attention_wgmma_ws)
from opt_fast.kernels.attention import Tiles, prefill_attention
from test_attention_triton import TOLERANCES, causal_reference64

I32 = dict(dtype=torch.int32, device=DEVICE)
ON_HOPPER = DEVICE == "cuda" and torch.cuda.get_device_capability() == (9, 0)
CANDIDATES = [pytest.param(head_dim, tiles, id=f"d{head_dim}-{tiles.block_m}x{tiles.block_n}x{tiles.num_warps}x"
                           f"{tiles.num_stages}" + "-ws" * tiles.warp_specialize + "-pingpong" * tiles.pingpong
                           + "-persistent" * tiles.persistent)
              for head_dim, candidates in sorted(attention_tiles.WGMMA_CANDIDATES.items()) for tiles in candidates]
# the warp-specialised form (its own kernel, attention_wgmma_ws.py)
WS_CANDIDATES = [c for c in CANDIDATES if c.values[1].warp_specialize]
# the persistent form for short prompts (its own kernel, attention_wgmma_persistent.py)
PERSISTENT_CANDIDATES = [c for c in CANDIDATES if attention_tiles.one_tile_per_prompt(c.values[1])]
# the warp-specialised form on one program an SM (its kernel's programs take many query blocks)
WS_PERSISTENT_CANDIDATES = [c for c in WS_CANDIDATES if c.values[1].persistent]
# The first candidate of each kernel form at each head size: where a test's other axis (a dtype,
# a cache dtype) is the launcher's or the descriptors' and not the tiles', these stand for all
# (the GPU check's time goes to what differs; a persistent launch of the warp-specialised
# kernel is no form of its own).
FORMS = list({(c.values[0], c.values[1].warp_specialize, c.values[1].pingpong,
               attention_tiles.one_tile_per_prompt(c.values[1])): c for c in reversed(CANDIDATES)}.values())[::-1]
# Each Gluon kernel, by module: a launch of any of them is the Gluon path's.
GLUON_KERNELS = ((attention_wgmma, "_prefill_wgmma_kernel"), (attention_wgmma_ws, "_prefill_wgmma_ws_kernel"),
                 (attention_wgmma_persistent, "_prefill_wgmma_persistent_kernel"))
needs_hopper = pytest.mark.skipif(not ON_HOPPER, reason="the wgmma kernel runs on an sm_90 GPU only (no interpreter)")


def context_free_case(lengths, heads, head_dim, dtype, seed, padding_tokens=0, scale=None, own_v=False):
    """Prompts of `lengths` new tokens with no cached context, packed back to back (q, k, v strided
    views of one [T, 3, H, D] tensor, as the model passes them; v a tensor of its own with
    `own_v`), then `padding_tokens` rows past the last sequence holding NaN; `scale` head_dim **
    -0.5 unless given. Returns the launcher's arguments and the float64 expectation."""
    g = gen(seed)
    tokens = sum(lengths) + padding_tokens
    scale = head_dim ** -0.5 if scale is None else scale
    q, k, v = packed_qkv(tokens, heads, head_dim, g, dtype, own_v=own_v)
    q.data[sum(lengths):] = float("nan")
    k.data[sum(lengths):] = float("nan")
    v.data[sum(lengths):] = float("nan")
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    expected = torch.cat([causal_reference64(q[s:e], k[s:e], v[s:e], scale, 0) for s, e in zip(cu, cu[1:])])
    cache = torch.full((1, 16, heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    args = (q, k, v, cache, cache.clone(), torch.tensor(cu, **I32), torch.zeros(len(lengths), **I32),
            torch.zeros(len(lengths), 1, **I32), scale)
    return args, expected


def record_gluon_launches(monkeypatch) -> list:
    """Records every launch of the three Gluon kernels in one list, as record_launches does."""
    launches = []
    for module, name in GLUON_KERNELS:
        record_launches(monkeypatch, module, name, launches=launches)
    return launches


def launched_grid(name: str, grid: tuple, args: tuple) -> tuple:
    """(heads of a group, places, groups) of a recorded Gluon launch: its grid, or the grid the
    warp-specialised kernel's work items stand for (it runs a grid of its own, one program an
    item or an SM)."""
    if name != "_prefill_wgmma_ws_kernel":
        return grid
    heads_per_group, places, items = args[16:19]
    return heads_per_group, places, items // (heads_per_group * places)


def reference_launch(record):
    """A stand-in for attention_wgmma.launch_prefill_wgmma (CPU: no Gluon) that hands `record`
    its arguments by name, then writes the reference's output and cache write."""
    def launch(q, k, v, out, cu, qk_scale, block_m, block_n, warps, stages, grid, blocks_per_seq, seq_chunk,
               key_cache, value_cache, slot_mapping=None, overlap=True, warp_specialize=False, pingpong=False,
               persistent=False):
        record(dict(cu=cu, grid=grid, blocks_per_seq=blocks_per_seq, slot_mapping=slot_mapping, overlap=overlap,
                    persistent=persistent))
        seqs = cu.shape[0] - 1
        out.copy_(attention.prefill_attention_ref(q, k, v, key_cache, value_cache, cu,
                                                  torch.zeros(seqs, **I32), torch.zeros(seqs, 1, **I32),
                                                  qk_scale / attention.LOG2E, slot_mapping=slot_mapping))
    return launch


def fitted(tiles: Tiles, lengths: list) -> tuple[list, int | None]:
    """(prompt lengths, max_query_len) for a test batch at `tiles`: as given, without a bound;
    for the persistent form, which runs only where its bound says every prompt fits a tile,
    each cut to block_m, with that bound."""
    if not attention_tiles.one_tile_per_prompt(tiles):
        return lengths, None
    return [min(n, tiles.block_m) for n in lengths], tiles.block_m


# --------------------------------------------------------------------------------------------
# Everywhere (CPU included)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("head_dim, tiles", CANDIDATES)
def test_candidates_pass_the_tile_checks(head_dim, tiles):
    assert attention._check_tiles(tuple(tiles), 90) == tiles and tiles.wgmma
    # (the persistent form also takes heads in a padded box: OPT-2.7B's 80)
    assert head_dim in attention_wgmma.WGMMA_HEAD_DIMS or (tiles.persistent and head_dim == 80)


@pytest.mark.parametrize("tiles, message", [
    (Tiles(64, 64, 8, 2, wgmma=True), "block_m a multiple of 16 * num_warps"),
    (Tiles(128, 64, 2, 2, wgmma=True), "num_warps in (4, 8)"),
    (Tiles(128, 64, 8, 1, wgmma=True), "num_stages >= 2"),
    (Tiles(128, 32, 8, 3, wgmma=True), "num_stages * block_n >= block_m"),
    (Tiles(128, 64, 8, 2, wgmma=True, one_loop=True), "no one_loop"),
    (Tiles(128, 64, 8, 2, True, wgmma=True, q_smem=True), "no q_smem"),
    (Tiles(256, 256, 8, 2, wgmma=True, persistent=True), "persistent needs block_m in (64, 128)"),
    (Tiles(128, 64, 8, 2, wgmma=True, persistent=True), "persistent needs block_n == block_m"),
    (Tiles(128, 128, 8, 1, wgmma=True, persistent=True), "num_stages >= 2"),
    (Tiles(128, 128, 4, 2, warp_specialize=True, persistent=True), "warp_specialize only with wgmma"),
    (Tiles(128, 128, 4, 2, True, warp_specialize=True, wgmma=True, persistent=True), "no tma or one_loop"),
    (Tiles(128, 32, 4, 2, wgmma=True, warp_specialize=True), "block_n in (64, 128)"),
    (Tiles(128, 64, 4, 1, wgmma=True, warp_specialize=True), "num_stages >= 2"),
    (Tiles(64, 64, 4, 2, wgmma=True, warp_specialize=True), "block_m=128"),
    (Tiles(128, 64, 4, 3, warp_specialize=True, wgmma=True, pingpong=True), "at block_n == block_m"),
    (Tiles(128, 128, 4, 2, warp_specialize=True, pingpong=True), "tiles.pingpong is the warp-specialised Gluon"),
    (Tiles(128, 128, 4, 2, warp_specialize=True, wgmma=True, pingpong=1), "tiles.pingpong must be a bool"),
    (Tiles(128, 128, 4, 2, warp_specialize=True, wgmma=True, max_registers=128), "sets its own register cap"),
    (Tiles(128, 64, 8, 2, wgmma=1), "tiles.wgmma must be a bool"),
])
def test_tile_checks_name_what_the_kernel_cannot_take(tiles, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        attention._check_tiles(tuple(tiles), 90)


@pytest.mark.parametrize("capability", [80, 89, 100, 120])
def test_tile_check_refuses_wgmma_off_sm90(capability):
    """wgmma is sm_90's alone: compiled for sm_100 or sm_120 LLVM aborts the process."""
    with pytest.raises(ValueError, match="tiles.wgmma needs compute capability 90"):
        attention._check_tiles(tuple(Tiles(128, 128, 8, 2, wgmma=True)), capability)


def test_which_inputs_the_kernel_takes():
    """fp16 / bf16 heads of 64 or 128 columns, packed back to back, 16-byte aligned rows: the
    model's strided views of one qkv tensor. Not float32, not head 80, not a padded head (the
    2-D box would read the next head's columns), not rows a TMA descriptor cannot address."""
    g = gen(0)
    for dtype in (torch.float16, torch.bfloat16):
        for head_dim in (64, 128):
            assert attention_wgmma.takes(*packed_qkv(5, 3, head_dim, g, dtype))
    assert not attention_wgmma.takes(*packed_qkv(5, 3, 128, g, torch.float32))
    assert not attention_wgmma.takes(*packed_qkv(5, 3, 80, g, torch.float16))
    padded = randn(5, 3, 136, g=g, dtype=torch.float16)[:, :, :128]
    assert not attention_wgmma.takes(padded, padded, padded)
    odd_rows = randn(5 * 3 * 128 + 8, g=g, dtype=torch.float16)[1:1 + 5 * 3 * 128].view(5, 3, 128)
    assert not attention_wgmma.takes(odd_rows, odd_rows, odd_rows)
    # the persistent form (padded): heads up to 128 columns starting 16-byte aligned, in boxes
    # of the next width that holds them
    for head_dim, width in ((80, 128), (96, 128), (40, 64), (64, 64), (128, 128)):
        assert attention_wgmma.takes(*packed_qkv(5, 3, head_dim, g, torch.float16), padded=True)
        assert attention_wgmma.padded_width(head_dim) == width
    for head_dim in (84, 136):   # rows of 168 bytes; wider than any box
        assert not attention_wgmma.takes(*packed_qkv(5, 3, head_dim, g, torch.float16), padded=True)
    assert not attention_wgmma.takes(*packed_qkv(5, 3, 80, g, torch.float32), padded=True)


@pytest.mark.skipif(ON_HOPPER, reason="where the kernel can run it does; tested below")
def test_wgmma_tiles_fall_back_to_the_main_kernel(monkeypatch):
    """Where the Gluon kernel cannot run (here: no sm_90 GPU, or the interpreter), its tiles are
    replaced by the main kernel's defaults, which match the reference; the Gluon kernel is never
    launched."""
    launches = record_launches(monkeypatch, attention, "_prefill_attention_kernel")
    monkeypatch.setattr(attention_wgmma, "launch_prefill_wgmma",
                        lambda *a, **k: pytest.fail("the Gluon kernel was launched off an sm_90 GPU"))
    args, expected = context_free_case([5, 17], 2, 64, torch.float16, seed=1)
    tiles = attention_tiles.WGMMA_CANDIDATES[64][0]
    out = prefill_attention(*args, tiles=tiles, max_context_len=0)
    torch.testing.assert_close(out.double().cpu(), expected, atol=TOLERANCES[torch.float16][0],
                               rtol=TOLERANCES[torch.float16][1])
    assert [name for name, *_ in launches] == ["_prefill_attention_kernel"]
    assert launches[0][3]["BLOCK_M"] == attention.default_tiles(64, torch.float16, 22, 2).block_m


def test_with_possible_context_the_main_kernel_runs(monkeypatch):
    """The Gluon kernel reads no cache: a batch that may have context (max_context_len not 0)
    runs the main kernel whatever the device (here told the Gluon kernel could run)."""
    monkeypatch.setattr(attention, "_wgmma_takes", lambda *args: True)
    launches = record_launches(monkeypatch, attention, "_prefill_attention_kernel")
    monkeypatch.setattr(attention_wgmma, "launch_prefill_wgmma",
                        lambda *a, **k: pytest.fail("the Gluon kernel was launched for a batch with context"))
    args, _ = context_free_case([9], 2, 64, torch.float16, seed=2)
    prefill_attention(*args, tiles=attention_tiles.WGMMA_CANDIDATES[64][0])
    assert len(launches) == 1


def test_the_table_serves_context_free_batches_on_sm90(monkeypatch):
    """sm_90 launches known to have no cached context pick _WGMMA_TILES_SM90's entry (its own
    narrow ones, a wide one set here), by tile kind and exact head_dim; others
    keep the main kernel's tables; the compile check builds it; and where the kernel cannot run
    (here on CPU) the launch falls back to the main kernel and still matches the reference."""
    chosen = Tiles(128, 64, 4, 2, wgmma=True)
    monkeypatch.setitem(attention_tiles._WGMMA_TILES_SM90, ("wide", 128), chosen)
    fp16 = torch.float16
    assert attention.default_tiles(128, fp16, 2048, 1, 90, context_free=True) == chosen
    assert attention.default_tiles(128, fp16, 2048, 1, 90) == attention.tile_table(90)[("wide", 128)]
    assert attention.default_tiles(128, fp16, 2048, 1, 80, context_free=True) == attention.tile_table(80)[("wide", 128)]
    assert not attention.default_tiles(128, fp16, 2048, 1, 100, context_free=True).wgmma
    narrow = attention_tiles._WGMMA_TILES_SM90[("narrow", 128)]
    assert attention.default_tiles(128, fp16, 128 * 8, 8, 90, context_free=True) == narrow
    assert not attention.default_tiles(128, fp16, 128 * 8, 8, 90).wgmma
    assert not attention.default_tiles(80, fp16, 128 * 8, 8, 90, context_free=True).wgmma
    assert not attention.default_tiles(96, fp16, 2048, 1, 90, context_free=True).wgmma
    assert any("128x64 w4s2" in spec.label for spec in attention_wgmma.compile_specs())
    if not ON_HOPPER:
        args, expected = context_free_case([300], 2, 128, fp16, seed=7)
        out = prefill_attention(*args, max_context_len=0)
        torch.testing.assert_close(out.double().cpu(), expected, atol=3e-3, rtol=3e-3)


@pytest.mark.skipif(ON_HOPPER, reason="stubs the kernel; where it runs, the GPU test below checks the write")
def test_launcher_gives_the_cache_write_to_the_kernel_or_writes_float8_first(monkeypatch):
    """The launcher's side of the Gluon path, with the kernel stubbed (on CPU): for caches of the
    inputs' dtype the kernel gets slot_mapping and no write_kv_cache runs; a float8 cache is
    written before the kernel, of the tokens inside the sequences only (not the padding rows
    after the last one), and the kernel gets no slot_mapping."""
    handed = []
    monkeypatch.setattr(attention, "_wgmma_takes", lambda *args: True)
    monkeypatch.setattr(attention_wgmma, "launch_prefill_wgmma", lambda *args, **options: handed.append(args[-1]))
    args, _ = context_free_case([5, 9], 2, 64, torch.float16, seed=11, padding_tokens=3)
    q, k, v = args[:3]
    slots = torch.randperm(32, generator=gen(12))[:q.shape[0]].to(DEVICE)
    tiles = attention_tiles.WGMMA_CANDIDATES[64][0]
    real_write = attention.write_kv_cache
    for cache_dtype in (torch.float16, torch.float8_e4m3fn):
        caches = [torch.full((2, 16, 2, 64), -3.0, device=DEVICE).to(cache_dtype) for _ in range(2)]
        want = [c.clone() for c in caches]
        fused = cache_dtype == q.dtype
        monkeypatch.setattr(attention, "write_kv_cache", (lambda *a: pytest.fail("write_kv_cache ran")) if fused
                            else real_write)
        prefill_attention(q, k, v, *caches, *args[5:], tiles=tiles, max_context_len=0, slot_mapping=slots)
        assert handed.pop() is (slots if fused else None)
        if not fused:
            attention.prefill_attention_ref(q, k, v, *want, *args[5:], slot_mapping=slots)
        assert all(torch.equal(got.float(), ref.float()) for got, ref in zip(caches, want))


@pytest.mark.skipif(ON_HOPPER, reason="stubs the kernels; where they run, the GPU tests check them")
def test_warp_specialised_tiles_reach_their_kernel_in_128_row_blocks(monkeypatch):
    """Tiles with wgmma and warp_specialize: the launcher hands them to the Gluon path with
    warp_specialize set, the grid in 128-row query blocks (the uniform layout where the bound
    allows it), and that path hands them on to attention_wgmma_ws.launch with every argument,
    the other tiles to the 64-row kernel."""
    handed = []
    monkeypatch.setattr(attention, "_wgmma_takes", lambda *args: True)
    real = attention_wgmma.launch_prefill_wgmma
    monkeypatch.setattr(attention_wgmma, "launch_prefill_wgmma",
                        lambda *args, **options: handed.append((args, options)))
    args, _ = context_free_case([130, 130, 127], 2, 128, torch.float16, seed=13)
    tiles = next(t for t in attention_tiles.WGMMA_CANDIDATES[128] if t.warp_specialize)
    for bound, blocks_per_seq in ((130, 2), (None, 0)):
        prefill_attention(*args, tiles=tiles, max_context_len=0, max_query_len=bound)
        (launched, options), = handed
        handed.clear()
        assert options == dict(warp_specialize=True, pingpong=False, persistent=False)
        assert launched[6:9] == (128, tiles.block_n, 4)
        grid, per_seq = launched[10:12]
        # uniform: 2 blocks a sequence; virtual: tokens // 128 + seqs
        assert per_seq == blocks_per_seq and grid[1] == (3 * 2 if bound else 387 // 128 + 3)

    ws_calls, plain_calls = [], []
    monkeypatch.setattr(attention_wgmma_ws, "launch", lambda *a: ws_calls.append(a))
    monkeypatch.setattr(attention_wgmma, "_prefill_wgmma_kernel", type("Stub", (), {
        "__getitem__": lambda self, grid: lambda *a, **k: plain_calls.append(grid)})())
    q, k, v, key_cache, value_cache, cu = args[:6]
    out = torch.empty_like(q)
    common = (q, k, v, out, cu, 0.1, 128, 64, 4, 3, (2, 6, 1), 2, 16, key_cache, value_cache)
    real(*common, warp_specialize=True)
    assert ws_calls == [(q, k, v, out, cu, 0.1, 64, 3, (2, 6, 1), 2, 16, key_cache, value_cache, None, True, False,
                         False)]
    assert plain_calls == []
    real(*common)
    assert plain_calls == [(2, 6, 1)] and len(ws_calls) == 1


def test_warp_specialised_kernel_takes_the_grid_as_work_items(monkeypatch):
    """attention_wgmma_ws.launch runs the (heads of a group, places, groups) grid it is given as
    that many work items on a grid of its own: one program an item, or, persistent, one an SM
    (or an item, whichever is fewer); the kernel gets the grid's shape and both counts."""
    calls = []
    monkeypatch.setattr(attention_wgmma_ws, "_prefill_wgmma_ws_kernel", type("Stub", (), {
        "__getitem__": lambda self, grid: lambda *a, **k: calls.append((grid, a[16:20], k["UNIFORM"]))})())
    args, _ = context_free_case([130, 130, 127], 6, 128, torch.float16, seed=14)
    q, k, v, key_cache, value_cache, cu = args[:6]
    out = torch.empty_like(q)
    for persistent, sms, programs in ((False, 132, 36), (True, 132, 36), (True, 4, 4)):
        monkeypatch.setattr(attention_wgmma_ws, "sm_count", lambda device, sms=sms: sms)
        attention_wgmma_ws.launch(q, k, v, out, cu, 0.1, 128, 2, (2, 6, 3), 2, 16, key_cache, value_cache,
                                  persistent=persistent)
        assert calls.pop() == ((programs, ), (2, 6, 36, programs), True)


@pytest.mark.skipif(ON_HOPPER, reason="stubs the kernels; where they run, the GPU tests check them")
def test_persistent_warp_specialised_tiles_take_prompts_of_any_length(monkeypatch):
    """Warp-specialised Gluon tiles with persistent: whatever the prompts' lengths and bound,
    the launcher hands them to the Gluon path with warp_specialize and persistent set and its
    usual grid of 128-row blocks (not the short-prompt kernel's, which takes a prompt a tile,
    and not the main kernel); with possible context the main kernel runs."""
    handed = []
    monkeypatch.setattr(attention, "_wgmma_takes", lambda *args: True)
    monkeypatch.setattr(attention_wgmma, "launch_prefill_wgmma",
                        lambda *args, **options: handed.append((args, options)))
    main = record_launches(monkeypatch, attention, "_prefill_attention_kernel")
    args, _ = context_free_case([300, 290, 260], 2, 128, torch.float16, seed=15)
    head_dim, tiles = WS_PERSISTENT_CANDIDATES[0].values
    for bound, blocks_per_seq in ((None, 0), (300, 3)):
        prefill_attention(*args, tiles=tiles, max_context_len=0, max_query_len=bound)
        (launched, options), = handed
        handed.clear()
        assert options == dict(warp_specialize=True, pingpong=tiles.pingpong, persistent=True)
        # uniform: 3 blocks a prompt; virtual: tokens // 128 + prompts (9 either way)
        assert launched[6:12] == (128, tiles.block_n, 4, tiles.num_stages, (2, 9, 1), blocks_per_seq)
    assert not main
    prefill_attention(*args, tiles=tiles, max_query_len=300)
    assert not handed and len(main) == 1


@pytest.mark.skipif(ON_HOPPER, reason="stubs the kernels; where they run, the GPU tests check them")
def test_persistent_tiles_reach_their_kernel_where_every_prompt_fits(monkeypatch):
    """Tiles with wgmma and persistent: with a bound (max_query_len) within block_m the
    launcher hands them to the Gluon path with persistent set and no grid (the kernel sizes
    its own), a float8 cache written first; without a bound, with one past block_m, or with
    possible context, the main kernel runs at its default tiles and matches the reference. The
    Gluon path hands them on to attention_wgmma_persistent.launch, whose grid is one program an
    SM, or an item, whichever is fewer."""
    handed = []
    monkeypatch.setattr(attention, "_wgmma_takes", lambda *args: True)
    real = attention_wgmma.launch_prefill_wgmma
    monkeypatch.setattr(attention_wgmma, "launch_prefill_wgmma",
                        lambda *args, **options: handed.append((args, options)))
    main = record_launches(monkeypatch, attention, "_prefill_attention_kernel")
    head_dim, tiles = PERSISTENT_CANDIDATES[-1].values
    args, expected = context_free_case([16, 5, 11], 2, head_dim, torch.float16, seed=21, padding_tokens=3)
    q, k, v = args[:3]
    slots = torch.randperm(48, generator=gen(22))[:q.shape[0]].to(DEVICE)
    for cache_dtype in (torch.float16, torch.float8_e4m3fn):
        caches = [torch.full((3, 16, 2, head_dim), -3.0, device=DEVICE).to(cache_dtype) for _ in range(2)]
        prefill_attention(q, k, v, *caches, *args[5:], tiles=tiles, max_context_len=0, max_query_len=tiles.block_m,
                          slot_mapping=slots)
        (launched, options), = handed
        handed.clear()
        assert options == dict(persistent=True) and not main
        assert launched[6:12] == (tiles.block_m, tiles.block_m, tiles.num_warps, tiles.num_stages, None, 0)
        assert launched[-1] is (slots if cache_dtype == torch.float16 else None)
    for context, bound in ((0, None), (0, tiles.block_m + 1), (None, tiles.block_m)):
        out = prefill_attention(*args, tiles=tiles, max_context_len=context, max_query_len=bound)
        (_, _, _, constants), = main
        main.clear()
        assert not handed and constants["BLOCK_M"] == attention.default_tiles(head_dim, q.dtype, 35, 3).block_m
        torch.testing.assert_close(out[:expected.shape[0]].double().cpu(), expected, atol=3e-3, rtol=3e-3)
    assert not handed

    calls = []
    monkeypatch.setattr(attention_wgmma_persistent, "_prefill_wgmma_persistent_kernel", type("Stub", (), {
        "__getitem__": lambda self, grid: lambda *a, **k: calls.append((grid, k))})())
    key_cache, value_cache, cu = args[3:6]
    out = torch.empty_like(q)
    for sms, grid in ((132, (6,)), (4, (4,))):
        monkeypatch.setattr(attention_wgmma_persistent, "sm_count", lambda device, sms=sms: sms)
        real(q, k, v, out, cu, 0.1, 128, 128, 8, tiles.num_stages, None, 0, 16, key_cache, value_cache, slots,
             persistent=True)
        (launched_grid, constants), = calls
        calls.clear()
        assert launched_grid == grid   # 3 prompts x 2 heads
        assert {name: constants[name] for name in ("HEAD_DIM", "BLOCK", "BUFFERS", "WRITE_KV", "num_warps")} == dict(
            HEAD_DIM=head_dim, BLOCK=128, BUFFERS=tiles.num_stages, WRITE_KV=True, num_warps=8)


@pytest.mark.skipif(ON_HOPPER, reason="stubs the kernel; where it runs, the GPU tests check it")
def test_a_persistent_table_entry_serves_short_context_free_batches(monkeypatch):
    """Gluon persistent entries in the launcher's persistent table (what a sweep that shows them
    winning would add; by head class, so heads 80 and 128 each their own): default_tiles picks
    each for batches known to have no context and prompts that fit, the launcher hands it to
    the Gluon path, and the compile check builds each at its head (not as a Triton persistent
    kernel); other batches keep the main kernel's tables."""
    chosen = {64: Tiles(128, 128, 8, 3, persistent=True, wgmma=True),
              80: Tiles(128, 128, 8, 2, persistent=True, wgmma=True)}
    for head_class, tiles in chosen.items():
        monkeypatch.setitem(attention_tiles._PERSISTENT_TILES_SM90, head_class, tiles)
    fp16 = torch.float16
    for head_dim, tiles in chosen.items():
        assert attention.default_tiles(head_dim, fp16, 8192, 64, 90, context_free=True, max_query_len=128) == tiles
        assert not attention.default_tiles(head_dim, fp16, 8192, 64, 90, context_free=True,
                                           max_query_len=129).persistent
        assert not attention.default_tiles(head_dim, fp16, 8192, 64, 90, max_query_len=128).persistent
    # head 128, padded like 80, has an entry of its own (none here)
    assert not attention.default_tiles(128, fp16, 8192, 64, 90, context_free=True, max_query_len=128).persistent
    monkeypatch.setattr(attention_tiles, "WGMMA_CANDIDATES", {})   # the table's entries alone
    built = {(s.constexprs["HEAD_DIM"], s.constexprs["HEAD_PAD"], s.constexprs["BUFFERS"])
             for s in attention_wgmma_persistent.compile_specs()}
    assert built == {(64, 64, 3), (80, 128, 2)}
    # (the Triton persistent kernel's own candidates have one stage)
    assert {s.num_stages for s in attention.compile_specs()
            if s.kernel is attention_persistent._prefill_persistent_kernel} == {1}
    handed = []
    monkeypatch.setattr(attention, "_wgmma_takes", lambda *args: True)
    monkeypatch.setattr(attention_wgmma, "launch_prefill_wgmma", lambda *args, **options: handed.append(options))
    for head_dim in chosen:
        args, _ = context_free_case([128, 100], 2, head_dim, fp16, seed=25)
        prefill_attention(*args, max_context_len=0, max_query_len=128)
    assert handed == [dict(persistent=True)] * 2


def test_persistent_launch_pads_a_head_of_80_to_128(monkeypatch):
    """OPT-2.7B's heads: boxes of 128 columns over the [tokens, heads * 80] rows (the next
    head's first 48 columns, which the kernel zeroes in q and k), HEAD_DIM 80 and HEAD_PAD 128
    to the kernel, the shared memory of 128-column slots."""
    calls = []
    monkeypatch.setattr(attention_wgmma_persistent, "_prefill_wgmma_persistent_kernel", type("Stub", (), {
        "__getitem__": lambda self, grid: lambda *a, **k: calls.append((a, k))})())
    args, _ = context_free_case([16, 5], 3, 80, torch.float16, seed=24)
    q, k, v, key_cache, value_cache, cu = args[:6]
    attention_wgmma_persistent.launch(q, k, v, torch.empty_like(q), cu, 0.1, 128, 8, 2, key_cache, value_cache)
    (descriptors, constants), = [(a[:3], k) for a, k in calls]
    assert [(d.shape, d.block_shape) for d in descriptors] == [([21, 240], [128, 128])] * 3
    assert (constants["HEAD_DIM"], constants["HEAD_PAD"]) == (80, 128)


def test_persistent_launch_refuses_slot_sets_past_shared_memory(monkeypatch):
    """Three slot sets at head 128 would need 320 KB: a ValueError naming num_stages, before
    any launch (the compile check builds only the candidates, and a launch would fail deep in
    the driver); the shared memory counted is what the compile check measures (2 sets at head
    128: 229392 B, within the 227 KB of an SM)."""
    monkeypatch.setattr(attention_wgmma_persistent, "_prefill_wgmma_persistent_kernel", type("Stub", (), {
        "__getitem__": lambda self, grid: lambda *a, **k: pytest.fail("launched")})())
    args, _ = context_free_case([16, 5], 2, 128, torch.float16, seed=23)
    q, k, v, key_cache, value_cache, cu = args[:6]
    with pytest.raises(ValueError, match=r"tiles.num_stages 3 gives the persistent Gluon kernel 320 KB"):
        attention_wgmma_persistent.launch(q, k, v, torch.empty_like(q), cu, 0.1, 128, 8, 3, key_cache, value_cache)
    assert attention_wgmma_persistent.shared_bytes(128, 128, 2, 2) == 229392


def test_warp_specialised_launch_refuses_tiles_past_shared_memory(monkeypatch):
    """128-key tiles in three stages at head 128 would need 240 KB: a ValueError naming the
    tiles, before any launch (Triton would fail it for want of resources); the count is what
    the compile check measures (next test), so two stages (176 KB) pass the check."""
    monkeypatch.setattr(attention_wgmma_ws, "_prefill_wgmma_ws_kernel", type("Stub", (), {
        "__getitem__": lambda self, grid: lambda *a, **k: launched.append(grid)})())
    launched = []
    args, _ = context_free_case([16, 5], 2, 128, torch.float16, seed=29)
    q, k, v, key_cache, value_cache, cu = args[:6]
    with pytest.raises(ValueError, match=r"tiles.num_stages 3 at tiles.block_n 128 gives the warp-specialised "
                                         r"Gluon kernel 240 KB of shared memory at head_dim 128"):
        attention_wgmma_ws.launch(q, k, v, torch.empty_like(q), cu, 0.1, 128, 3, (2, 1, 1), 0, 1, key_cache,
                                  value_cache)
    assert not launched
    attention_wgmma_ws.launch(q, k, v, torch.empty_like(q), cu, 0.1, 128, 2, (2, 1, 1), 0, 1, key_cache, value_cache)
    assert launched == [(2,)]


@compile_only
def test_compiled_warp_specialised_kernel_splits_its_warps():
    """The warp-specialised form compiled for sm_90 (no GPU needed), at the 128-key candidate
    and head 128: registers moved to both consumers (setmaxnreg 240: the worker raised to it,
    the default partition lowered to it) from the producer (24); the consumers' loop waiting
    for its QK^T with the previous PV in flight; TMA bulk copies; no spills. No bar.sync
    without a thread count (Triton's own barrier.sync at the region's entry and exit aside):
    each consumer's barriers are its own (two named 128-thread barriers), so neither waits on
    the other or on the producer but through the mbarriers; and every mbarrier arrival (one
    thread's) follows its partition's barrier, so the whole warpgroup is done with a slot when
    the producer hears of it. The pingpong form waits on its turns besides: more mbarrier
    waits than the plain form. Its shared memory is what the launcher counts (to 256 B above)."""
    script = (
        "import re\n"
        "from opt_fast.kernels import attention_wgmma_ws, compile_check as cc\n"
        "label = 'sweep ws d128 fp16 128x128 s2'\n"
        "plain, pingpong = [s for s in attention_wgmma_ws.compile_specs() if s.label in (label, label + ' pingpong')]\n"
        "r = cc.compile_one(plain, 90, 'sm_90')\n"
        "ptx = cc.compile_spec(plain, 90).asm['ptx']\n"
        "turns = cc.compile_spec(pingpong, 90).asm['ptx']\n"
        "has = lambda pattern: re.search(pattern, ptx) is not None\n"
        "lines = [l.strip() for l in ptx.splitlines() if l.strip() and not l.strip().startswith(('//', '.loc'))]\n"
        "arrivals = [i for i, l in enumerate(lines) if 'mbarrier.arrive.shared' in l]\n"
        "unguarded = [i for i in arrivals if not any(re.search(r'(?<![.\\w])bar\\.(sync\\s+\\d+, 128|warp\\.sync)', l)\n"
        "                                            for l in lines[max(0, i - 4):i])]\n"
        "print(r.ok, r.spill_bytes, has(r'setmaxnreg\\.inc\\.sync\\.aligned\\.u32\\s+240;'),\n"
        "      has(r'setmaxnreg\\.dec\\.sync\\.aligned\\.u32\\s+240;'),\n"
        "      has(r'setmaxnreg\\.dec\\.sync\\.aligned\\.u32\\s+24;'),\n"
        "      'wgmma.wait_group.sync.aligned 1;' in ptx,\n"
        "      'cp.async.bulk.tensor' in ptx, re.search(r'(?<![.\\w])bar\\.sync\\s+\\d+;', ptx) is None,\n"
        "      len(set(re.findall(r'(?<![.\\w])bar\\.sync\\s+(\\d+), 128;', ptx))),\n"
        "      len(arrivals) >= 8, unguarded == [],\n"
        "      turns.count('mbarrier.try_wait') > ptx.count('mbarrier.try_wait'),\n"
        "      r.shared_bytes <= attention_wgmma_ws.shared_bytes(128, 128, 2, 2) < r.shared_bytes + 256)\n")
    assert _compiled_output(script) == ["True", "0", "True", "True", "True", "True", "True", "True", "2", "True",
                                        "True", "True", "True"]


@compile_only
def test_compiled_persistent_kernel_streams_the_next_item_before_storing():
    """The persistent form compiled for sm_90 (no GPU needed) at head 128 and two slot sets:
    no spills, within an SM's 227 KB of shared memory (the compile check fails past it); TMA
    copies of q, k and v into each slot set before the loop and once in it (9); and in the
    loop the next item's copies come before this item's output stores (16-byte stores of
    whole rows: all the global stores without the cache write), so its bytes stream while the
    output is written. Issuing them after the stores, or once per item before the loop only,
    fails this."""
    script = (
        "from opt_fast.kernels import attention_wgmma_persistent as m, compile_check as cc\n"
        "spec = next(s for s in m.compile_specs() if s.label == 'sweep persistent d128 fp16 128x128 w8 b2 no-write')\n"
        "r = cc.compile_one(spec, 90, 'sm_90')\n"
        "lines = cc.compile_spec(spec, 90).asm['ptx'].splitlines()\n"
        "copies = [i for i, l in enumerate(lines) if 'cp.async.bulk.tensor' in l]\n"
        "stores = [i for i, l in enumerate(lines) if 'st.global' in l]\n"
        "print(r.ok, r.spill_bytes, r.error or '-', len(copies), bool(stores) and copies[-1] < stores[0],\n"
        "      all('st.global.v4' in lines[i] for i in stores))\n")
    assert _compiled_output(script) == ["True", "0", "-", "9", "True", "True"]


@compile_only
def test_compiled_kernel_overlaps_softmax_with_the_previous_pv():
    """Compiled for sm_90 (no GPU needed): the loop waits for its QK^T with one wgmma group still
    in flight (the PV of the tile before), the kernel has no spills, and the loads are TMA bulk
    copies. Without is_async on the QK^T, or with a wait for 0 there, this fails."""
    script = (
        "from opt_fast.kernels import attention_wgmma, compile_check as cc\n"
        "spec = next(s for s in attention_wgmma.compile_specs() if 'd128 fp16 128x128' in s.label)\n"
        "r = cc.compile_one(spec, 90, 'sm_90')\n"
        "ptx = cc.compile_spec(spec, 90).asm['ptx']\n"
        "print(r.ok, r.spill_bytes, 'wgmma.wait_group.sync.aligned 1;' in ptx, 'cp.async.bulk.tensor' in ptx)\n")
    assert _compiled_output(script) == ["True", "0", "True", "True"]


def _compiled_output(script: str) -> list[str]:
    """What a compile script prints, split into words: run outside the interpreter (which this
    process runs), where kernels compile for real GPUs."""
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, "TRITON_INTERPRET": "0"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split()


def test_sweep_times_only_candidates_the_probe_ran_right(monkeypatch):
    """On a GPU the tile sweep asks benchmarks/wgmma_probe.py once and keeps only the wgmma
    candidates it found right (a hang or a mismatch there keeps a candidate out of the sweep)."""
    sweep = load_benchmark("sweep_tiles.py", "sweep_tiles_wgmma_test")   # a fresh copy: no probe cached
    probe = load_benchmark("wgmma_probe.py", "wgmma_probe")
    calls = []
    right, wrong = attention_tiles.WGMMA_CANDIDATES[128][:2]

    def fake_probe(timeout=90.0):
        calls.append(timeout)
        return {probe._label(128, right): "", probe._label(128, wrong): "the probe did not finish"}, "note"
    monkeypatch.setattr(probe, "probe", fake_probe)
    monkeypatch.setitem(sys.modules, "wgmma_probe", probe)
    monkeypatch.setattr(sweep, "ON_GPU", True)
    monkeypatch.setattr(sweep, "CAPABILITY", 90)
    case = dict(model="opt-6.7b", heads=32, head_dim=128, batch=8, length=1024)
    timed = [Tiles(*c["tiles"]) for c in sweep.FAMILIES["prefill"].candidates(case, smoke=False)
             if "tiles" in c and Tiles(*c["tiles"]).wgmma]
    sweep.FAMILIES["prefill"].candidates(case, smoke=False)
    assert timed == [right] and len(calls) == 1
    head_80 = dict(case, model="opt-2.7b", head_dim=80)
    assert not [c for c in sweep.FAMILIES["prefill"].candidates(head_80, smoke=False)
                if "tiles" in c and Tiles(*c["tiles"]).wgmma]


def test_sweep_goes_on_when_the_probe_itself_fails(monkeypatch):
    """A probe that raises (not a candidate failing: the probe's own machinery) leaves the
    sweep running without the Gluon kernel, and the report says why."""
    sweep = load_benchmark("sweep_tiles.py", "sweep_tiles_probe_fails")
    probe = load_benchmark("wgmma_probe.py", "wgmma_probe")

    def broken(timeout=90.0):
        raise OSError("no such file")
    monkeypatch.setattr(probe, "probe", broken)
    monkeypatch.setitem(sys.modules, "wgmma_probe", probe)
    monkeypatch.setattr(sweep, "ON_GPU", True)
    monkeypatch.setattr(sweep, "CAPABILITY", 90)
    case = dict(model="opt-6.7b", heads=32, head_dim=128, batch=8, length=1024)
    candidates = sweep.FAMILIES["prefill"].candidates(case, smoke=False)
    assert candidates and not [c for c in candidates if "tiles" in c and Tiles(*c["tiles"]).wgmma]
    assert sweep.WGMMA_PROBE["note"] == "the probe itself failed: OSError: no such file"
    assert 0 <= sweep.WGMMA_PROBE["seconds"] < 60   # the probe's share of the sweep's budget


def test_probe_reports_each_child_on_its_own(monkeypatch):
    """Each probed launch runs in a child process of its own: its verdict comes back (here, off
    an sm_90 GPU: that the launcher ran the main kernel), one that crashes (here: a head size
    with no candidates) is reported with its error, one still running at the time limit is
    killed and reported as a hang, and the note counts the candidates right (not the diagnoses
    without overlap)."""
    probe = load_benchmark("wgmma_probe.py", "wgmma_probe_test")
    monkeypatch.setattr(probe, "cases", lambda: [("a", 64, 0, True), ("b" + probe.SYNC, 96, 0, False)])
    if not ON_HOPPER:
        results, note = probe.probe(timeout=120)
        assert set(results) == {"a", "b" + probe.SYNC} and note == "0 of 1 candidates right"
        assert results["a"] == "the launcher ran the main kernel, not the Gluon one"
        assert results["b" + probe.SYNC].startswith("exited with 1: KeyError"), results
    results, note = probe.probe(timeout=0.01)
    assert results == dict.fromkeys(["a", "b" + probe.SYNC], "did not finish in 0 s (a hang?)")


def test_probe_kills_a_child_left_running_long_after_the_others(monkeypatch):
    """A child still running `grace` seconds after the last of the others finished is killed
    and reported as a hang then, long before the time limit (a hang in one candidate would
    otherwise cost the tile sweep the whole limit); the others' verdicts stand, in the cases'
    order."""
    probe = load_benchmark("wgmma_probe.py", "wgmma_probe_grace")
    monkeypatch.setattr(probe, "cases", lambda: [("stuck", 64, 1, True), ("quick", 64, 0, True)])
    commands = {0: [sys.executable, "-c", "print('\"\"')"], 1: [sys.executable, "-c", "import time; time.sleep(60)"]}
    monkeypatch.setattr(probe, "child_command", lambda head_dim, index, overlap: commands[index])
    started = time.monotonic()
    results, note = probe.probe(timeout=50, grace=1)
    assert time.monotonic() - started < 25
    assert list(results) == ["stuck", "quick"] and results["quick"] == ""
    assert results["stuck"].startswith("did not finish in") and note == "1 of 2 candidates right"


def test_probe_says_where_a_launch_went_wrong():
    """A failing candidate's verdict names the (prompt length, query block) pairs that are off
    the reference or non-finite, nothing else."""
    probe = load_benchmark("wgmma_probe.py", "wgmma_probe_blocks")
    expected = torch.randn(sum(probe.LENGTHS), 3, 64, generator=gen(8))
    out = expected.clone()
    assert probe._wrong_blocks(out, expected, 64) == []
    starts = dict(zip(probe.LENGTHS, [0, *torch.tensor(probe.LENGTHS).cumsum(0).tolist()]))
    out[starts[200] + 70, 2, 5] += 0.5          # the second 64-row block of the 200-token prompt
    out[starts[129] + 128, 0, 0] = float("nan")  # the last (one-row) block of the 129-token prompt
    assert probe._wrong_blocks(out, expected, 64) == [(200, 1), (129, 2)]
    assert probe._wrong_blocks(out, expected, 128) == [(200, 0), (129, 1)]


def test_probe_checks_the_fused_cache_write(monkeypatch):
    """After the output, the probe launches each candidate again with slot_mapping (the fused
    KV-cache write, as the engine launches it): "" where the caches then hold the reference's
    slots and the output is unchanged, else what is off. The main kernel stands in for the
    Gluon one on any device: the probe itself runs that one, in a child with a time limit."""
    monkeypatch.setattr(attention, "_wgmma_takes", lambda *args: False)
    probe = load_benchmark("wgmma_probe.py", "wgmma_probe_write")
    args, _ = context_free_case([5, 17, 3], 2, 64, torch.float16, seed=9)
    tiles = attention_tiles.WGMMA_CANDIDATES[64][0]
    out = prefill_attention(*args, tiles=tiles, max_context_len=0).float()
    assert probe._cache_write_error(args, tiles, out) == ""
    real = attention.prefill_attention

    def storing_a_wrong_key(q, k, v, key_cache, *rest, **options):
        result = real(q, k, v, key_cache, *rest, **options)
        key_cache.view(-1, *key_cache.shape[2:])[options["slot_mapping"][1]] = 0.0
        return result
    monkeypatch.setattr(attention, "prefill_attention", storing_a_wrong_key)
    assert probe._cache_write_error(args, tiles, out) == "the fused cache write stored wrong keys"
    monkeypatch.setattr(attention, "prefill_attention", lambda *a, **k: real(*a, **k) + 1.0)
    assert probe._cache_write_error(args, tiles, out) == "the fused cache write changed the output"


def probe_child(monkeypatch, name: str):
    """benchmarks/wgmma_probe.py loaded as `name`, for running a child's run_case in this
    process: what run_case changes for good (as a child process's last acts: the module's
    launcher wrapped, the persistent kernels' SM counts) is undone after the test."""
    monkeypatch.setattr(attention_wgmma, "launch_prefill_wgmma", attention_wgmma.launch_prefill_wgmma)
    monkeypatch.setattr(attention_wgmma_persistent, "sm_count", attention_wgmma_persistent.sm_count)
    monkeypatch.setattr(attention_wgmma_ws, "sm_count", attention_wgmma_ws.sm_count)
    return load_benchmark("wgmma_probe.py", name)


def stub_gluon_launch(monkeypatch, record):
    """The Gluon path taken (as on an sm_90 GPU) and its launch stubbed by the reference,
    handing `record` each launch's arguments (reference_launch)."""
    monkeypatch.setattr(attention, "_wgmma_takes", lambda *args: True)
    monkeypatch.setattr(attention_wgmma, "launch_prefill_wgmma", reference_launch(record))


def test_probe_case_runs_both_block_layouts_and_the_cache_write(monkeypatch):
    """A probe child's run, with the Gluon launch stubbed by the reference (CPU): its verdict is ""
    only after the virtual and the uniform block layout (the grid the engine and the sweep
    launch) and the cache write reached the Gluon launch; where the launcher ran the main
    kernel instead it says so."""
    probe = probe_child(monkeypatch, "wgmma_probe_case")
    # the launcher falls back to the main kernel (as on CPU; on an sm_90 GPU the Gluon one runs)
    monkeypatch.setattr(attention, "_wgmma_takes", lambda *args: False)
    assert probe.run_case(64, 0, True) == "the launcher ran the main kernel, not the Gluon one"
    seen = []
    stub_gluon_launch(monkeypatch, lambda call: seen.append((call["blocks_per_seq"], call["grid"],
                                                             call["slot_mapping"] is not None, call["overlap"])))
    tiles = attention_tiles.WGMMA_CANDIDATES[64][0]
    assert probe.run_case(64, 0, False) == ""
    per_seq = -(-max(probe.UNIFORM_LENGTHS) // tiles.block_m)
    assert [(bound, writes) for bound, _, writes, _ in seen] == [(0, False), (0, True), (per_seq, False),
                                                               (per_seq, True)]
    assert seen[2][1] == (3, len(probe.UNIFORM_LENGTHS) * per_seq, 1) and not any(o for *_, o in seen)


def test_probe_runs_the_persistent_form_on_short_prompts_and_few_programs(monkeypatch):
    """A persistent candidate's probe child, with the Gluon launch stubbed by the reference
    (CPU): it runs SHORT_LENGTHS (empty prompts among them) with their bound, through the
    persistent path, on PERSISTENT_PROGRAMS programs (several items each), then again with the
    cache write; "" where both match."""
    probe = probe_child(monkeypatch, "wgmma_probe_persistent")
    seen = []
    stub_gluon_launch(monkeypatch, lambda call: seen.append((tuple((call["cu"][1:] - call["cu"][:-1]).tolist()),
                                                             call["persistent"], call["slot_mapping"] is not None,
                                                             attention_wgmma_persistent.sm_count(call["cu"].device))))
    head_dim, index = next((d, i) for d, candidates in sorted(attention_tiles.WGMMA_CANDIDATES.items())
                           for i, t in enumerate(candidates) if attention_tiles.one_tile_per_prompt(t))
    assert probe.run_case(head_dim, index, True) == ""
    assert 0 in probe.SHORT_LENGTHS and max(probe.SHORT_LENGTHS) <= 128
    assert seen == [(probe.SHORT_LENGTHS, True, writes, probe.PERSISTENT_PROGRAMS) for writes in (False, True)]


def test_probe_runs_the_persistent_warp_specialised_form_on_few_programs(monkeypatch):
    """A persistent warp-specialised candidate's probe child, with the Gluon launch stubbed by
    the reference (CPU): both block layouts' batches and the cache write, launched persistent
    on PERSISTENT_PROGRAMS programs, so that each takes many query blocks in turn."""
    probe = probe_child(monkeypatch, "wgmma_probe_ws_persistent")
    seen = []
    stub_gluon_launch(monkeypatch, lambda call: seen.append((call["persistent"], call["blocks_per_seq"],
                                                             call["slot_mapping"] is not None,
                                                             attention_wgmma_ws.sm_count(call["cu"].device))))
    head_dim, index = next((d, i) for d, candidates in sorted(attention_tiles.WGMMA_CANDIDATES.items())
                           for i, t in enumerate(candidates) if t.warp_specialize and t.persistent)
    assert probe.run_case(head_dim, index, True) == ""
    per_seq = -(-max(probe.UNIFORM_LENGTHS) // 128)
    assert seen == [(True, blocks, writes, probe.PERSISTENT_PROGRAMS) for blocks in (0, per_seq)
                    for writes in (False, True)]


def test_the_tile_sweeps_probe_verdicts_stand_in(monkeypatch, tmp_path):
    """Where gpu_check.sh points to the sweep's report, the CUDA tests take its probe's verdicts
    instead of probing again; without one, or where the sweep's probe itself failed (no
    results), they probe."""
    report = tmp_path / "sweep.json"
    monkeypatch.setenv("WGMMA_PROBE_VERDICTS", str(report))
    assert saved_verdicts() is None
    report.write_text(json.dumps(dict(meta=dict(wgmma_probe=dict(results={}, note="the probe itself failed")))))
    assert saved_verdicts() is None
    report.write_text(json.dumps(dict(meta=dict(wgmma_probe=dict(results={"d64 a": "", "d64 b": "hang"},
                                                                  note="1 of 2 candidates right")))))
    assert saved_verdicts() == ({"d64 a": "", "d64 b": "hang"}, "1 of 2 candidates right (the tile sweep's probe)")
    monkeypatch.delenv("WGMMA_PROBE_VERDICTS")
    assert saved_verdicts() is None


def test_probe_covers_every_candidate():
    probe = load_benchmark("wgmma_probe.py", "wgmma_probe_cases")
    labels = [label for label, *_ in probe.cases()]
    assert labels == list(dict.fromkeys(labels))   # no two the same
    # the diagnosis without overlap: each head size's first candidate that has one to turn off
    # (head 80 has only the persistent form, one key tile an item: none)
    diagnosed = {d: next(t for t in c if not t.persistent) for d, c in attention_tiles.WGMMA_CANDIDATES.items()
                 if d != 80}
    assert {probe._label(d, t) for d, candidates in attention_tiles.WGMMA_CANDIDATES.items()
            for t in candidates} | {probe._label(d, t) + probe.SYNC for d, t in diagnosed.items()} == set(labels)


# --------------------------------------------------------------------------------------------
# On an sm_90 GPU
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    """The probe's verdicts, from child processes with a time limit: a hang fails these tests
    instead of hanging them. Under pytest-xdist the first worker to get here probes and the
    others read its verdicts from this run's shared temporary directory (the probe starts a
    process per candidate; eight workers doing so at once would be too many)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from wgmma_probe import _label, probe
    saved = saved_verdicts()
    if saved:
        return Verdicts(*saved, _label)
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return Verdicts(*probe(timeout=240), _label)
    shared = tmp_path_factory.getbasetemp().parent / "wgmma_probe.json"
    with open(shared.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)   # released when the file closes
        if not shared.exists():
            shared.write_text(json.dumps(probe(timeout=240)))
        results, note = json.loads(shared.read_text())
    return Verdicts(results, note, _label)


def saved_verdicts() -> tuple[dict, str] | None:
    """(results, note) of the probe that this machine's tile sweep ran minutes before, where
    benchmarks/gpu_check.sh points to its report (WGMMA_PROBE_VERDICTS: the sweep.json): the
    same probe of the same checkout, whose children need not compile and run again. None
    where there is none, or the sweep's probe itself failed."""
    path = os.environ.get("WGMMA_PROBE_VERDICTS")
    if not path or not Path(path).is_file():
        return None
    found = json.loads(Path(path).read_text()).get("meta", {}).get("wgmma_probe") or {}
    if not found.get("results"):
        return None
    return found["results"], f"{found['note']} (the tile sweep's probe)"


class Verdicts(NamedTuple):
    """The probe's verdicts (label -> "" or what went wrong), its note, and its label rule."""
    results: dict
    note: str
    label: object

    def of(self, head_dim: int, tiles: Tiles) -> str:
        return self.results[self.label(head_dim, tiles)]

    def require_right(self, head_dim: int, tiles: Tiles) -> None:
        """Fail (never launch in this process) a candidate the probe found wrong or hanging."""
        if self.of(head_dim, tiles):
            pytest.fail(f"the probe found this candidate wrong: {self.of(head_dim, tiles)} ({self.note})")


@needs_hopper
@pytest.mark.parametrize("head_dim, tiles", CANDIDATES)
def test_probe_runs_each_candidate_right(probed, head_dim, tiles):
    assert probed.of(head_dim, tiles) == "", probed.note


@needs_hopper
def test_probe_runs_each_head_size_right_without_the_overlap(probed):
    """The diagnosis: the first candidate of each head size with every PV waited for before the
    next softmax (if only this passes, the fault is in the overlap)."""
    wrong = {label: error for label, error in probed.results.items() if label.endswith(" without overlap") and error}
    assert not wrong, probed.note


@needs_hopper
@pytest.mark.parametrize("head_dim, tiles, dtype",
                         [pytest.param(*c.values, torch.float16, id=f"{c.id}-fp16") for c in CANDIDATES]
                         + [pytest.param(*c.values, torch.bfloat16, id=f"{c.id}-bf16") for c in FORMS])
def test_matches_the_reference(probed, monkeypatch, head_dim, tiles, dtype):
    """Prompts of 1 token, block sizes +-1 (64, 128), several blocks with a partial last one, a
    long one; NaN in the rows past the last prompt (TMA boxes reach into them) and in every
    element torch.empty returns (each output element written). Every candidate in fp16, each
    kernel form in bf16."""
    probed.require_right(head_dim, tiles)
    launches = record_gluon_launches(monkeypatch)
    lengths, bound = fitted(tiles, [1, 63, 64, 65, 127, 128, 129, 300, 1031, 2])
    args, expected = context_free_case(lengths, 3, head_dim, dtype, seed=3, padding_tokens=37)
    fill_empty(monkeypatch, float("nan"))
    out = prefill_attention(*args, tiles=tiles, max_context_len=0, max_query_len=bound)
    assert len(launches) == 1
    rows = expected.shape[0]
    assert torch.isfinite(out[:rows]).all()
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out[:rows].double().cpu(), expected, atol=atol, rtol=rtol)


@needs_hopper
@pytest.mark.parametrize("head_dim, tiles", FORMS)
def test_takes_its_scale_and_the_strides_of_v(probed, monkeypatch, head_dim, tiles):
    """Every other test passes head_dim ** -0.5 and a v of k's strides (the model's packed qkv):
    each kernel form's launcher must pass its scale on and build v's descriptor from v's own."""
    probed.require_right(head_dim, tiles)
    launches = record_gluon_launches(monkeypatch)
    lengths, bound = fitted(tiles, [1, 64, 129, 300, 7])
    args, expected = context_free_case(lengths, 2, head_dim, torch.float16, seed=8, scale=0.3, own_v=True)
    assert args[2].stride(0) != args[1].stride(0)
    out = prefill_attention(*args, tiles=tiles, max_context_len=0, max_query_len=bound)
    assert len(launches) == 1
    atol, rtol = TOLERANCES[torch.float16]
    torch.testing.assert_close(out[:expected.shape[0]].double().cpu(), expected, atol=atol, rtol=rtol)


@needs_hopper
@pytest.mark.parametrize("head_dim, tiles", [c for c in CANDIDATES if c not in PERSISTENT_CANDIDATES])
def test_matches_the_reference_in_the_uniform_layout(probed, monkeypatch, head_dim, tiles):
    """Prompts of about one length launched with their bound (max_query_len, as the engine and
    the sweep launch them) run in the uniform block layout (no search of cu_seqlens); NaN past
    the last prompt and in every element torch.empty returns. (The persistent form has no
    block layouts.)"""
    probed.require_right(head_dim, tiles)
    launches = record_gluon_launches(monkeypatch)
    lengths = [130, 129, 128, 127, 100, 130]
    args, expected = context_free_case(lengths, 3, head_dim, torch.float16, seed=13, padding_tokens=37)
    fill_empty(monkeypatch, float("nan"))
    out = prefill_attention(*args, tiles=tiles, max_context_len=0, max_query_len=max(lengths))
    assert [kwargs["UNIFORM"] for *_, kwargs in launches] == [True]
    rows = expected.shape[0]
    assert torch.isfinite(out[:rows]).all()
    atol, rtol = TOLERANCES[torch.float16]
    torch.testing.assert_close(out[:rows].double().cpu(), expected, atol=atol, rtol=rtol)


@needs_hopper
@pytest.mark.parametrize("head_dim, tiles", CANDIDATES[:1] + CANDIDATES[3:4] + WS_CANDIDATES[:1])
def test_matches_the_reference_in_head_groups(probed, monkeypatch, head_dim, tiles):
    """With an L2 too small for the batch the grid runs 6 heads in groups of 2 (grid (2, blocks,
    3)): every head of every prompt matches the reference, in both block layouts."""
    probed.require_right(head_dim, tiles)
    launches = record_gluon_launches(monkeypatch)
    # 519 tokens: at 64- and 128-row blocks the bound 130 gives as many programs as the virtual
    # axis (4 x 3 <= 8 + 4, 4 x 2 <= 4 + 4), so the second launch takes the uniform layout
    lengths = [130, 129, 128, 127]
    args, expected = context_free_case(lengths, 6, head_dim, torch.float16, seed=17, padding_tokens=5)
    per_head = (sum(lengths) + 5) * head_dim * 2 * 2
    monkeypatch.setattr(attention, "l2_bytes", lambda device: 5 * per_head)   # 2 heads fit half of it
    fill_empty(monkeypatch, float("nan"))
    rows = expected.shape[0]
    for bound in (None, max(lengths)):
        out = prefill_attention(*args, tiles=tiles, max_context_len=0, max_query_len=bound)
        (name, grid, launch_args, constants), = launches
        launches.clear()
        grid = launched_grid(name, grid, launch_args)
        assert grid[0] == 2 and grid[2] == 3 and constants["UNIFORM"] == (bound is not None)
        assert torch.isfinite(out[:rows]).all()
        atol, rtol = TOLERANCES[torch.float16]
        torch.testing.assert_close(out[:rows].double().cpu(), expected, atol=atol, rtol=rtol)


@needs_hopper
@pytest.mark.parametrize("head_dim, tiles",
                         CANDIDATES[:1] + CANDIDATES[3:4] + WS_CANDIDATES[:1] + PERSISTENT_CANDIDATES[:1])
def test_nan_in_the_next_prompt_stays_out(probed, monkeypatch, head_dim, tiles):
    """A prompt ending inside a key tile: the box holds the next prompt's values there, with
    weight 0; NaN in them must not reach this prompt (their rows are cleared, not multiplied)."""
    probed.require_right(head_dim, tiles)
    launches = record_gluon_launches(monkeypatch)
    args, expected = context_free_case([70, 50], 2, head_dim, torch.float16, seed=4)
    q, k, v = args[:3]
    k.data[70:] = float("nan")
    v.data[70:] = float("nan")
    q.data[70:] = float("nan")
    out = prefill_attention(*args, tiles=tiles, max_context_len=0, max_query_len=fitted(tiles, [70, 50])[1])
    assert len(launches) == 1 and torch.isfinite(out[:70]).all()
    torch.testing.assert_close(out[:70].double().cpu(), expected[:70], atol=3e-3, rtol=3e-3)


@needs_hopper
@pytest.mark.parametrize("head_dim, tiles, cache_dtype",
                         [pytest.param(*c.values, None, id=f"{c.id}-fused") for c in CANDIDATES]
                         + [pytest.param(*c.values, torch.float8_e4m3fn, id=f"{c.id}-fp8-written-first")
                            for c in FORMS])
def test_stores_the_new_tokens_in_the_cache(probed, monkeypatch, head_dim, tiles, cache_dtype):
    """With slot_mapping each new token's key and value reach the cache once, at its slot: from
    the Gluon kernel's shared memory where the cache has the inputs' dtype (no launch of
    write_kv_cache; every candidate), by a write_kv_cache launch before the kernel for a float8
    cache (each kernel form). Tokens past
    the last prompt (NaN) and negative slots are not stored (the caches hold a finite sentinel
    elsewhere); prompts spanning several query blocks, ending inside a key tile, of one token."""
    probed.require_right(head_dim, tiles)
    launches = record_gluon_launches(monkeypatch)
    if cache_dtype is None:
        monkeypatch.setattr(attention, "write_kv_cache",
                            lambda *a: pytest.fail("the fused write launched write_kv_cache"))
    lengths, bound = fitted(tiles, [20, 45, 130, 1])
    args, expected = context_free_case(lengths, 2, head_dim, torch.float16, seed=5, padding_tokens=9)
    q, k, v = args[:3]
    key_cache = torch.full((16, 16, 2, head_dim), -3.0, device=DEVICE).to(cache_dtype or q.dtype)
    value_cache = key_cache.clone()
    slots = torch.randperm(16 * 16, generator=gen(6))[:q.shape[0]].to(DEVICE)
    slots[3] = -1
    want_k, want_v = key_cache.clone(), value_cache.clone()
    out = prefill_attention(q, k, v, key_cache, value_cache, *args[5:], tiles=tiles, max_context_len=0,
                            slot_mapping=slots, max_query_len=bound)
    assert [kwargs["WRITE_KV"] for *_, kwargs in launches] == [cache_dtype is None]
    attention.prefill_attention_ref(q, k, v, want_k, want_v, *args[5:], slot_mapping=slots)
    assert torch.equal(key_cache.float(), want_k.float()) and torch.equal(value_cache.float(), want_v.float())
    rows = expected.shape[0]
    torch.testing.assert_close(out[:rows].double().cpu(), expected, atol=3e-3, rtol=3e-3)


@needs_hopper
@pytest.mark.parametrize("programs", [1, 2, 3, 7])
@pytest.mark.parametrize("head_dim, tiles", PERSISTENT_CANDIDATES)
def test_persistent_programs_take_many_items_in_turn(probed, monkeypatch, head_dim, tiles, programs):
    """The persistent form on a few programs, each taking many (prompt, head) items in turn
    (more than its slot sets; item counts that do not divide among the programs; with 7, some
    programs fewer items than the other's sets): 40 prompts of up to 128 tokens, empty ones
    among them (the last too), NaN past the last prompt and in every element torch.empty
    returns; with the cache write and without."""
    probed.require_right(head_dim, tiles)
    launches = record_gluon_launches(monkeypatch)
    monkeypatch.setattr(attention_wgmma_persistent, "sm_count", lambda device: programs)
    lengths = torch.randint(0, tiles.block_m + 1, (40,), generator=gen(31 + programs)).tolist()
    lengths[5] = lengths[-1] = 0
    lengths[7] = tiles.block_m

    def check(name, grid, constants, bound, writes):
        assert grid == (programs,) and constants["WRITE_KV"] == writes
    run_many_items(monkeypatch, launches, tiles, head_dim, lengths, 32, [tiles.block_m], check)


@needs_hopper
@pytest.mark.parametrize("programs", [1, 3, 7])
@pytest.mark.parametrize("head_dim, tiles", WS_PERSISTENT_CANDIDATES)
def test_warp_specialised_programs_take_many_query_blocks_in_turn(probed, monkeypatch, head_dim, tiles, programs):
    """The warp-specialised form on a few programs, each taking many 128-row query blocks in
    turn, their key tiles counted across them in the ring (blocks of 1 to 9 tiles, empty
    prompts, prompts ending inside a tile), with the cache write and without; NaN past the last
    prompt and in every element torch.empty returns. Mixed lengths without a bound (the virtual
    block layout), then long prompts of about one length with theirs (the uniform layout, which
    the launcher takes only where it has no more blocks than the virtual one)."""
    probed.require_right(head_dim, tiles)
    launches = record_gluon_launches(monkeypatch)
    monkeypatch.setattr(attention_wgmma_ws, "sm_count", lambda device: programs)

    def check(name, grid, constants, bound, writes):
        assert (name, grid) == ("_prefill_wgmma_ws_kernel", (programs, ))
        assert constants["UNIFORM"] == (bound is not None) and constants["WRITE_KV"] == writes
    run_many_items(monkeypatch, launches, tiles, head_dim, [1031, 0, 64, 65, 200, 1, 129, 0, 513, 7], 41 + programs,
                   [None], check)
    run_many_items(monkeypatch, launches, tiles, head_dim, [1024, 1024, 1000, 1023], 51 + programs, [1024], check)


def run_many_items(monkeypatch, launches, tiles, head_dim, lengths, seed, bounds, check_launch):
    """prefill_attention at `tiles` on prompts of `lengths` (3 heads, fp16; NaN past the last
    prompt and in every element torch.empty returns) at each max_query_len of `bounds`,
    without the cache write, then with it: every output against the float64 reference, each
    launch (the one `launches` records) by check_launch(name, grid, constants, bound, writes),
    and the caches, after, against the reference's write."""
    args, expected = context_free_case(lengths, 3, head_dim, torch.float16, seed=seed, padding_tokens=11)
    q, k, v = args[:3]
    fill_empty(monkeypatch, float("nan"))
    rows = expected.shape[0]
    key_cache = torch.full((rows // 16 + 2, 16, 3, head_dim), -3.0, device=DEVICE, dtype=q.dtype)
    value_cache = key_cache.clone()
    slots = torch.randperm(key_cache.shape[0] * 16, generator=gen(seed + 1))[:q.shape[0]].to(DEVICE)
    want_k, want_v = key_cache.clone(), value_cache.clone()
    for slot_mapping in (None, slots):
        for bound in bounds:
            out = prefill_attention(q, k, v, key_cache, value_cache, *args[5:], tiles=tiles, max_context_len=0,
                                    max_query_len=bound, slot_mapping=slot_mapping)
            (name, grid, _, constants), = launches
            launches.clear()
            check_launch(name, grid, constants, bound, slot_mapping is not None)
            assert torch.isfinite(out[:rows]).all()
            torch.testing.assert_close(out[:rows].double().cpu(), expected, atol=3e-3, rtol=3e-3)
    attention.prefill_attention_ref(q, k, v, want_k, want_v, *args[5:], slot_mapping=slots)
    assert torch.equal(key_cache, want_k) and torch.equal(value_cache, want_v)
