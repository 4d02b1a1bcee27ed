"""Decode attention over the paged KV cache, one query token per sequence: the Triton kernels
(split-K over the context, then a merge), their launcher and the torch reference.

Decode is a GEMV per (sequence, head): every cached key and value is read once and used once, so
the kernel is bound by memory bandwidth and its job is to keep enough bytes in flight. A grid of
(seqs, heads) programs does that when there are many sequences; with few sequences and long
contexts each (sequence, head) is split over `kv_splits` programs that each walk one slice of the
block table and write a partial output with its log-sum-exp, merged by a second small kernel
(the flash-decoding scheme of vLLM / LightLLM / SGLang).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .kv_cache import (FP8, check_cache_pair, check_slot_mapping, slot_offset, to_cache, to_cache_ref,
                       write_kv_cache, write_kv_cache_ref)
from .device import DEFAULT_SMS as _DEFAULT_SMS, sm_count as _sm_count
from .launch_math import cdiv as _cdiv, next_pow2 as _next_pow2

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634
# Split only while (seqs x heads) programs are fewer than this many per SM...
_FILL_PER_SM = 2
# ...aiming for this many programs per SM once split, so that several tiles per SM are in flight.
_TARGET_PER_SM = 4
# A split shorter than this costs more in its partial write and merge than it gains in overlap.
# H100, 2026-11-26 (benchmarks/results/2026-11-26-h100/sweep.json), opt-1.3b b8 (256 programs):
# at ctx1024 one split of 1024 tokens takes 40.1 us, two of 512 43.8, three 45.2 (block_n 32,
# 2 warps, 5 stages); at ctx2048 two splits of 1024 take 67.5 us against 88.7 for one (block_n
# 128, 4 warps, 1 stage). opt-13b b8 (320 programs, not split) agrees: 1 split 81.3 us, 2 86.7.
_MIN_SPLIT_TOKENS = 1024
_MAX_SPLITS = 32


class _Tile(NamedTuple):
    k_tile_bytes: int   # one K (and one V) tile per loop iteration: block_n = bytes / row bytes
    num_warps: int
    # Software-pipeline depth of the loop over the context: with n > 1 the next n - 1 tiles' table
    # entries, K and V are in flight (cp.async into shared memory) while one tile is reduced.
    num_stages: int


class _Tier(NamedTuple):
    below_per_sm: int | None   # applies while seqs x heads x splits < this many per SM (None: any)
    head64: _Tile              # heads padded to at most 64 (OPT-125m ... 1.3b)
    head128: _Tile             # heads padded to 128 (OPT-2.7b's 80, 6.7b, 13b) or wider


# Loop tiles for 16-bit caches with 16-byte aligned rows, by how many programs share the SMs:
# the fewer there are, the more bytes each must keep in flight. Each entry is the fastest launch,
# or within 3% of it, at every shape the tile sweep timed in its tier: NVIDIA H100 80GB HBM3,
# fp16, block_size 16, 2026-11-26 (benchmarks/results/2026-11-26-h100/sweep.json, kernel
# medians, L2 flushed). Before it, every shape ran 16 KB tiles, 4 warps, 3 stages.
_TIERS = (
    # opt-1.3b b8 ctx1024 (256 programs, unsplit): 4 KB tiles (32 tokens) five stages deep,
    # 2 warps: 40.1 us (sdpa 36.5) against 81.9 before. No head-128 shape was this sparse: it
    # keeps the next tier's tile.
    _Tier(2, head64=_Tile(4096, 2, 5), head128=_Tile(16384, 2, 3)),
    # opt-1.3b b8 ctx2048 (2 splits, 512 programs): 16 KB tiles (128 tokens) unpipelined, 4
    # warps: 67.5 us, the best (70.2 before). opt-13b b8 (320 programs): 16 KB (64 tokens),
    # 2 warps, 3 stages: 81.3 / 143.2 us at ctx 1024 / 2048 (84.4 / 145.9 before; unpipelined
    # 121.8 at ctx1024), the best at ctx1024, 0.5% off it at ctx2048 (the same tile, 8 splits).
    _Tier(8, head64=_Tile(16384, 4, 1), head128=_Tile(16384, 2, 3)),
    # Head 64: 16 KB, 4 warps, 3 stages is the best of all 17 launches at opt-1.3b b64 / b256,
    # ctx 1024 / 2048 (211.8, 398.1, 767.1, 1505.8 us). Head 128: 8 KB (32 tokens), 2 warps,
    # 4 stages: the best at opt-6.7b b64 ctx1024, 388.1 us (407.5 before), and opt-13b b64
    # ctx1024 / 2048, 475.1 / 921.3 (477.0 / 930.9); 1809.6 / 3567.6 at b256 (best 1800.2 /
    # 3567.6). 16 KB / 2 warps / 3 stages is 0.5% faster to 3.5% slower there.
    _Tier(None, head64=_Tile(16384, 4, 3), head128=_Tile(8192, 2, 4)),
)
# float32 (tests, not a serving dtype): 16 KB tiles unpipelined, 4 warps; pipelined they spill at
# head_dim 80 on sm_80.
_FP32_TILE = _Tile(16384, 4, 1)
# Rows not 16-byte aligned cannot go through cp.async (4-byte minimum), and without the alignment
# hint every element needs its own address register: 2 KB tiles, 4 warps, 2 stages (only the
# table loads pipelined) is what ptxas compiles without spills for every head_dim on sm_80 and
# sm_90, where 1 stage spills at head_dim 80 and 128 (the compile check holds both).
_UNALIGNED_TILE = _Tile(2048, 4, 2)
# Launch options the sweep may pick (benchmarks/sweep_tiles.py); the launcher rejects others.
_BLOCK_N_CHOICES = (8, 16, 32, 64, 128, 256)
_WARP_CHOICES = (1, 2, 4, 8)
_STAGE_CHOICES = (1, 2, 3, 4, 5)
# The new keys' and values' strides where a launch has no new_kv (the kernel reads neither them
# nor the None pointers beside them).
_NO_STRIDES = (0,) * 6


@triton.jit
def _paged_decode_kernel(
    q_ptr,              # [seqs, heads, head_dim] any strides
    key_cache_ptr,      # [num_blocks, block_size, heads, head_dim]
    value_cache_ptr,    # [num_blocks, block_size, heads, head_dim], strides of key_cache
    block_tables_ptr,   # [seqs, max_blocks] int32
    seq_lens_ptr,       # [seqs] int32, keys per sequence (current token included)
    out_ptr,            # SPLIT: [seqs, heads, kv_splits, HEAD_DIM] fp32, else [seqs, heads, HEAD_DIM], contiguous
    lse_ptr,            # SPLIT: [seqs, heads, kv_splits] fp32 log2-sum-exp2 of each split; unused otherwise
    new_key_ptr,        # WRITE_NEW: [seqs, heads, head_dim] the current tokens' keys, any strides
    new_value_ptr,      # WRITE_NEW: [seqs, heads, head_dim] their values
    slot_ptr,           # WRITE_NEW: [seqs] int64 cache slot of each current token, < 0: not stored
    qk_scale,           # softmax scale * log2(e): the kernel works in base 2 (exp2 is one instruction)
    max_blocks, split_tokens,
    stride_qs, stride_qh, stride_qd,
    stride_bs, stride_bb,
    stride_cb, stride_cs, stride_ch, stride_cd,
    stride_ks, stride_kh, stride_kd, stride_vs, stride_vh, stride_vd,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,   # tokens per cache block
    BLOCK_N: tl.constexpr,      # tokens per loop iteration (may span several cache blocks)
    BLOCK_D: tl.constexpr,      # head_dim padded to a power of two (80 -> 128)
    SPLIT: tl.constexpr,        # write partial output + lse for the merge kernel
    ALIGNED: tl.constexpr,      # every cache row starts 16-byte aligned (checked by the launcher)
    NUM_STAGES: tl.constexpr,   # software-pipeline depth of the loop over the context
    WRITE_NEW: tl.constexpr,    # store the current tokens in the cache, and read them from registers
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    split = tl.program_id(2)
    # Clamped to the table width so a bad length can never index past a row of block_tables.
    seq_len = tl.minimum(tl.load(seq_lens_ptr + seq), max_blocks * BLOCK_SIZE)
    start = split * split_tokens
    end = tl.minimum(start + split_tokens, seq_len)
    if WRITE_NEW:
        # The current token (the last position) is not read from the cache: another program of
        # this launch may not have stored it yet. The split that holds it folds it in below.
        end = tl.minimum(end, seq_len - 1)

    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q = tl.load(q_ptr + seq * stride_qs + head * stride_qh + offs_d * stride_qd, mask=d_mask, other=0.0)
    q = q.to(tl.float32) * qk_scale
    table_row = block_tables_ptr + seq * stride_bs
    head_offset = head * stride_ch

    m_i = tl.full((), float("-inf"), tl.float32)
    l_i = tl.zeros((), tl.float32)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    # One table entry per token (repeated within a cache block; those loads hit L1), so a tile
    # can span several small cache blocks. Entries past the length are never read: padding
    # entries of a row may hold any block id. The pipeliner issues a later tile's table entries,
    # then its K and V (cp.async into shared memory), NUM_STAGES - 1 iterations ahead.
    for tile_start in tl.range(start, end, BLOCK_N, num_stages=NUM_STAGES):
        offs_n = tile_start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        block = tl.load(table_row + (offs_n // BLOCK_SIZE) * stride_bb, mask=n_mask, other=0)
        # int64: block * stride overflows int32 in a cache of more than 2**31 elements per layer.
        token_offset = block.to(tl.int64) * stride_cb + (offs_n % BLOCK_SIZE) * stride_cs + head_offset
        k_ptrs = key_cache_ptr + token_offset[:, None] + offs_d[None, :] * stride_cd
        v_ptrs = value_cache_ptr + token_offset[:, None] + offs_d[None, :] * stride_cd
        if ALIGNED:
            # The launcher checked 16-byte aligned rows; saying so here makes the loads 16-byte
            # vectors (and cp.async-able) whatever the JIT knows about the arguments.
            k_ptrs = tl.multiple_of(k_ptrs, [1, 16])
            v_ptrs = tl.multiple_of(v_ptrs, [1, 16])
        # Masked loads, never a multiply by zero: unused slots may hold NaN.
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        qk = tl.sum(k.to(tl.float32) * q[None, :], axis=1)
        qk = tl.where(n_mask, qk, float("-inf"))
        # Every iteration holds at least one valid token, so m_new is finite and no inf - inf.
        m_new = tl.maximum(m_i, tl.max(qk, axis=0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        m_i = m_new

    if WRITE_NEW:
        acc, m_i, l_i = _store_and_fold_new_token(
            new_key_ptr + seq * stride_ks + head * stride_kh, new_value_ptr + seq * stride_vs + head * stride_vh,
            stride_kd, stride_vd, slot_ptr + seq, key_cache_ptr, value_cache_ptr, head_offset, stride_cb,
            stride_cs, stride_cd, q, acc, m_i, l_i, offs_d, d_mask, split == 0,
            (seq_len > start) & (seq_len <= start + split_tokens), BLOCK_SIZE)

    # l_i is 0 only for an empty split (or a zero-length padding row): write zeros, not NaN.
    has_keys = l_i > 0
    out = tl.where(has_keys, acc / tl.where(has_keys, l_i, 1.0), 0.0)
    row = seq * tl.num_programs(1) + head
    if SPLIT:
        part = row * tl.num_programs(2) + split
        tl.store(out_ptr + part * HEAD_DIM + offs_d, out, mask=d_mask)
        tl.store(lse_ptr + part, tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf")))
    else:
        tl.store(out_ptr + row * HEAD_DIM + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def _store_and_fold_new_token(key_ptr,     # [head_dim] the current token's key in one head, stride stride_kd
                              value_ptr,   # [head_dim] its value, stride stride_vd
                              stride_kd, stride_vd,
                              slot_ptr,    # [1] int64 its cache slot, < 0: not stored
                              key_cache_ptr,    # [num_blocks, block_size, heads, head_dim]
                              value_cache_ptr,  # [num_blocks, block_size, heads, head_dim], the same strides
                              head_offset, stride_cb, stride_cs, stride_cd,
                              q, acc, m_i, l_i, offs_d, d_mask, STORE, FOLD, BLOCK_SIZE: tl.constexpr):
    """The KV-cache write of a decode step, fused into its attention: where STORE (one split
    per sequence and head), the current token's key and value go to their slot, rounded to the
    cache's dtype; where FOLD (the split whose range holds the last position), the same rounded
    values join the online softmax as that position's key, exactly what reading them back
    would give. Returns (acc, m_i, l_i)."""
    cache_dtype: tl.constexpr = key_cache_ptr.dtype.element_ty
    key = to_cache(tl.load(key_ptr + offs_d * stride_kd, mask=d_mask, other=0.0), cache_dtype)
    value = to_cache(tl.load(value_ptr + offs_d * stride_vd, mask=d_mask, other=0.0), cache_dtype)
    slot = tl.load(slot_ptr)
    # A negative slot (a padding row) stores nothing: every lane's mask is off, whatever address
    # the division gives.
    dst = slot_offset(slot, BLOCK_SIZE, stride_cb, stride_cs) + head_offset + offs_d * stride_cd
    keep = d_mask & STORE & (slot >= 0)
    tl.store(key_cache_ptr + dst, key, mask=keep)
    tl.store(value_cache_ptr + dst, value, mask=keep)
    if FOLD:
        qk = tl.sum(key.to(tl.float32) * q, axis=0)
        m_new = tl.maximum(m_i, qk)
        alpha = tl.exp2(m_i - m_new)   # 0 where no cached key came before (m_i = -inf)
        p = tl.exp2(qk - m_new)
        l_i = l_i * alpha + p
        acc = acc * alpha + p * value.to(tl.float32)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _merge_splits_kernel(
    part_ptr,           # [seqs, heads, kv_splits, HEAD_DIM] fp32 partial outputs, each normalised
    lse_ptr,            # [seqs, heads, kv_splits] fp32 log2-sum-exp2 per split
    seq_lens_ptr,       # [seqs] int32
    out_ptr,            # [seqs, heads, HEAD_DIM] contiguous, the query's dtype
    kv_splits, split_tokens, max_tokens,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,   # kv_splits padded to a power of two
):
    seq = tl.program_id(0)
    row = seq.to(tl.int64) * tl.num_programs(1) + tl.program_id(1)
    seq_len = tl.minimum(tl.load(seq_lens_ptr + seq), max_tokens)
    # Splits past the sequence's end wrote -inf and zeros; masking them here as well costs nothing.
    used = tl.cdiv(seq_len, split_tokens)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < tl.minimum(used, kv_splits)
    lse = tl.load(lse_ptr + row * kv_splits + offs_s, mask=s_mask, other=float("-inf"))
    part_ptrs = part_ptr + (row * kv_splits + offs_s)[:, None] * HEAD_DIM + offs_d[None, :]
    if HEAD_DIM % 4 == 0:
        # The launcher allocates the partials: fp32 rows of HEAD_DIM start 16-byte aligned.
        part_ptrs = tl.multiple_of(part_ptrs, [1, 16])
    part = tl.load(part_ptrs, mask=s_mask[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    lse_max = tl.max(lse, axis=0)
    # A zero-length row has every lse at -inf: weigh against 0 instead, giving zeros, not NaN.
    weight = tl.exp2(lse - tl.where(lse_max == float("-inf"), 0.0, lse_max))
    total = tl.sum(weight, axis=0)
    out = tl.sum(weight[:, None] * part, axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + row * HEAD_DIM + offs_d, out.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


class DecodeConfig(NamedTuple):
    """One launch of the decode kernel: kv splits (an upper bound, see the launcher), tokens per
    loop tile, warps, and software-pipeline stages of the loop over the context."""
    num_splits: int
    block_n: int
    num_warps: int
    num_stages: int


def _rows_aligned(cache: torch.Tensor) -> bool:
    """Whether every [head_dim] row of the cache starts on a 16-byte boundary and is contiguous."""
    size = cache.element_size()
    return (cache.data_ptr() % 16 == 0 and cache.stride(-1) == 1
            and all(stride * size % 16 == 0 for stride in cache.stride()[:-1]))


def choose_num_splits(seqs: int, heads: int, max_tokens: int, sms: int = _DEFAULT_SMS) -> int:
    """kv_splits from host-known shapes only (max_tokens = block_tables.shape[1] * block_size),
    never from the lengths on the device, so a CUDA graph captures a fixed grid. One split when
    seqs x heads programs already fill the SMs or the context is short."""
    programs = seqs * heads
    if programs >= _FILL_PER_SM * sms:
        return 1
    wanted = _cdiv(_TARGET_PER_SM * sms, programs)
    return max(1, min(wanted, max_tokens // _MIN_SPLIT_TOKENS, _MAX_SPLITS))


def _tile(programs: int, head_dim: int, dtype: torch.dtype, aligned: bool, sms: int) -> _Tile:
    if not aligned:
        return _UNALIGNED_TILE
    if dtype == torch.float32:
        return _FP32_TILE
    tier = next(t for t in _TIERS if t.below_per_sm is None or programs < t.below_per_sm * sms)
    return tier.head64 if _next_pow2(head_dim) <= 64 else tier.head128


def _config(num_splits: int, tile: _Tile, head_dim: int, dtype: torch.dtype, aligned: bool) -> DecodeConfig:
    # Unaligned tiles may be 8 tokens: 2 KB is 8 rows of a 128-wide fp16 head.
    block_n = max(16 if aligned else 8, min(128, tile.k_tile_bytes // (_next_pow2(head_dim) * dtype.itemsize)))
    return DecodeConfig(num_splits, block_n, tile.num_warps, tile.num_stages)


def default_config(seqs: int, heads: int, head_dim: int, dtype: torch.dtype, max_tokens: int,
                   aligned: bool = True, sms: int = _DEFAULT_SMS) -> DecodeConfig:
    """The launch the heuristics pick for these host-known shapes (what runs without overrides):
    the split count, then the loop tile for the seqs x heads x splits programs that makes."""
    num_splits = choose_num_splits(seqs, heads, max_tokens, sms)
    tile = _tile(seqs * heads * num_splits, head_dim, dtype, aligned, sms)
    return _config(num_splits, tile, head_dim, dtype, aligned)


def launch_tiles(head_dim: int, dtype: torch.dtype, aligned: bool) -> list[DecodeConfig]:
    """Every loop tile (block_n, num_warps, num_stages) default_config can pick for this head,
    dtype and alignment, whatever the batch, as configs of one split: what the compile check
    builds."""
    if not aligned:
        tiles = [_UNALIGNED_TILE]
    elif dtype == torch.float32:
        tiles = [_FP32_TILE]
    else:
        tiles = [tier.head64 if _next_pow2(head_dim) <= 64 else tier.head128 for tier in _TIERS]
    return sorted({_config(1, tile, head_dim, dtype, aligned) for tile in tiles})


def _check_overrides(num_splits, block_n, num_warps, num_stages) -> None:
    for name, value, allowed in (("num_splits", num_splits, range(1, _MAX_SPLITS + 1)),
                                 ("block_n", block_n, _BLOCK_N_CHOICES),
                                 ("num_warps", num_warps, _WARP_CHOICES),
                                 ("num_stages", num_stages, _STAGE_CHOICES)):
        if value is not None and (isinstance(value, bool) or value not in allowed):
            shown = f"1..{_MAX_SPLITS}" if name == "num_splits" else ", ".join(map(str, allowed))
            raise ValueError(f"{name} must be one of {shown}, got {value!r}")


def paged_decode_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           *, new_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                           num_splits: int | None = None, block_n: int | None = None,
                           num_warps: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """Triton version of `paged_decode_attention_ref` (same arguments and result), `new_kv`
    included: the step's KV-cache write then runs inside this launch.

    The keyword-only options override the launch heuristics (`default_config`), for tests and
    the tile sweep: `num_splits` (1..32) is an upper bound, lowered where needed so that every
    split holds whole loop tiles; `block_n` tokens per loop tile (a power of two, 8..256);
    `num_warps` (1, 2, 4, 8); `num_stages` (1..5, 1 = no software pipelining). Nothing here
    reads device memory, so the launch is CUDA-graph capturable. A sequence of length 0 (a
    padding row of a graph batch) gets zeros. Softmax in float32; cache slots past each
    sequence's length and block-table entries past its last block are never read. The caches
    may hold float8_e4m3fn (kv_cache.FP8) instead of q's dtype: read as float32 like any other.
    """
    if q.dim() != 3:
        raise ValueError(f"q must be [seqs, heads, head_dim], got {tuple(q.shape)}")
    check_cache_pair(key_cache, value_cache)
    seqs, heads, head_dim = q.shape
    if key_cache.shape[2:] != q.shape[1:]:
        raise ValueError(f"cache heads x head_dim {tuple(key_cache.shape[2:])} != q's {tuple(q.shape[1:])}")
    if q.dtype not in _DTYPES or key_cache.dtype not in (q.dtype, FP8):
        raise ValueError(f"q must be float16, bfloat16 or float32 and the caches of its dtype or float8_e4m3fn; "
                         f"got {q.dtype}, {key_cache.dtype}, {value_cache.dtype}")
    if block_tables.dim() != 2 or block_tables.shape[0] != seqs or block_tables.dtype != torch.int32:
        raise ValueError(f"block_tables must be [{seqs}, max_blocks] int32, got "
                         f"{tuple(block_tables.shape)} {block_tables.dtype}")
    if seq_lens.shape != (seqs,) or seq_lens.dtype != torch.int32:
        raise ValueError(f"seq_lens must be [{seqs}] int32, got {tuple(seq_lens.shape)} {seq_lens.dtype}")
    if seqs > 1 and seq_lens.stride(0) != 1:     # the kernels read sequence i's at seq_lens + i
        raise ValueError(f"seq_lens must be contiguous, got stride {seq_lens.stride(0)}")
    devices = {t.device for t in (q, key_cache, value_cache, block_tables, seq_lens)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    _check_overrides(num_splits, block_n, num_warps, num_stages)
    if new_kv is not None:
        new_key, new_value, slots = new_kv
        if new_key.shape != q.shape or new_value.shape != q.shape or not new_key.dtype == new_value.dtype == q.dtype:
            raise ValueError(f"new_kv keys and values must be {q.dtype} of q's shape {tuple(q.shape)}, got "
                             f"{new_key.dtype} {tuple(new_key.shape)} and {new_value.dtype} {tuple(new_value.shape)}")
        check_slot_mapping(slots, seqs, q.device)
        if not new_key.device == new_value.device == q.device:
            raise ValueError("new_kv keys and values must be on q's device")
        new_strides = (*new_key.stride(), *new_value.stride())
    else:
        new_key = new_value = slots = None
        new_strides = _NO_STRIDES

    out = torch.empty((seqs, heads, head_dim), dtype=q.dtype, device=q.device)
    max_blocks, block_size = block_tables.shape[1], key_cache.shape[1]
    max_tokens = max_blocks * block_size
    if seqs == 0 or heads == 0:
        return out
    if max_tokens == 0:
        if new_kv is not None:   # no table to read, but the slots may still name blocks
            write_kv_cache(new_key, new_value, key_cache, value_cache, slots)
        return out.zero_()
    aligned = _rows_aligned(key_cache) and _rows_aligned(value_cache)
    config = default_config(seqs, heads, head_dim, q.dtype, max_tokens, aligned, _sm_count(q.device))
    overrides = dict(num_splits=num_splits, block_n=block_n, num_warps=num_warps, num_stages=num_stages)
    config = config._replace(**{name: value for name, value in overrides.items() if value is not None})
    block_d = _next_pow2(head_dim)
    # Whole loop tiles per split, so only a sequence's last tile is partial.
    split_tokens = _cdiv(_cdiv(max_tokens, config.num_splits), config.block_n) * config.block_n
    splits = _cdiv(max_tokens, split_tokens)
    split = splits > 1
    if split:
        target = torch.empty((seqs, heads, splits, head_dim), dtype=torch.float32, device=q.device)
        lse = torch.empty((seqs, heads, splits), dtype=torch.float32, device=q.device)
    else:
        target, lse = out, out   # lse is never touched without SPLIT
    _paged_decode_kernel[(seqs, heads, splits)](
        q, key_cache, value_cache, block_tables, seq_lens, target, lse, new_key, new_value, slots,
        float(scale) * _LOG2E, max_blocks, split_tokens,
        *q.stride(), *block_tables.stride(), *key_cache.stride(),
        *new_strides,
        HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_N=config.block_n, BLOCK_D=block_d, SPLIT=split,
        ALIGNED=aligned, NUM_STAGES=config.num_stages, WRITE_NEW=new_kv is not None, num_warps=config.num_warps)
    if split:
        _merge_splits_kernel[(seqs, heads)](
            target, lse, seq_lens, out, splits, split_tokens, max_tokens,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=_next_pow2(splits), num_warps=4)
    return out


def compile_specs() -> list:
    """Every specialisation OPT runs with the default launch: head_dim 64/80/128 x fp16/bf16 x
    block_size 8/16/32 x each loop tile of `launch_tiles`, split and not, on an aligned cache,
    plus the merge; fp32 and the unaligned fallback at block_size 16; float8 caches on sm_90. Unit last-dim strides are
    constants, as the JIT makes them on a real launch."""
    from .compile_check import CompileSpec
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    cases = [(dtype, head_dim, block_size, aligned)
             for dtype in ("fp16", "bf16") for head_dim in (64, 80, 128) for block_size in (8, 16, 32)
             for aligned in (True, False) if aligned or block_size == 16]
    cases += [("fp32", head_dim, 16, aligned) for head_dim in (64, 80, 128) for aligned in (True, False)]
    cases = [(dtype, dtype, head_dim, block_size, aligned, (80, 90)) for dtype, head_dim, block_size, aligned in cases]
    # float8 caches (sm_89+; checked on sm_90) at the default block size: their rows are 16-byte
    # multiples at every OPT head_dim, so always aligned
    cases += [(dtype, "fp8e4nv", head_dim, 16, True, (90,)) for dtype in ("fp16", "bf16") for head_dim in (64, 80, 128)]
    specs = []
    for dtype, cache_dtype, head_dim, block_size, aligned, targets in cases:
        block_d = _next_pow2(head_dim)
        # the engine's launches store the current tokens (new_kv); the benchmarks' do not
        writes = (True, False) if block_size == 16 and aligned and cache_dtype == dtype else (True,)
        for config in launch_tiles(head_dim, torch_dtype[dtype], aligned):
            for split in (False, True):
                for write in writes:
                    specs.append(_decode_spec(dtype, cache_dtype, head_dim, block_size, block_d, aligned, config,
                                              split, write, targets))
    for dtype in ("fp16", "bf16", "fp32"):
        for head_dim in (64, 80, 128):
            sig = {"part_ptr": "*fp32", "lse_ptr": "*fp32", "seq_lens_ptr": "*i32", "out_ptr": f"*{dtype}",
                   "kv_splits": "i32", "split_tokens": "i32", "max_tokens": "i32",
                   "HEAD_DIM": "constexpr", "BLOCK_D": "constexpr", "BLOCK_S": "constexpr"}
            consts = dict(HEAD_DIM=head_dim, BLOCK_D=_next_pow2(head_dim), BLOCK_S=_MAX_SPLITS)
            label = f"{dtype} d{head_dim} splits<={_MAX_SPLITS}"
            specs.append(CompileSpec(_merge_splits_kernel, label, sig, consts))
    return specs


def _decode_spec(dtype: str, cache_dtype: str, head_dim: int, block_size: int, block_d: int, aligned: bool,
                 config: DecodeConfig, split: bool, write: bool, targets: tuple):
    """The compile-check specialisation of _paged_decode_kernel for one launch."""
    from .compile_check import CompileSpec
    sig = {"q_ptr": f"*{dtype}", "key_cache_ptr": f"*{cache_dtype}", "value_cache_ptr": f"*{cache_dtype}",
           "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32",
           "out_ptr": "*fp32" if split else f"*{dtype}", "lse_ptr": "*fp32" if split else f"*{dtype}"}
    new_args = ("new_key_ptr", "new_value_ptr", "slot_ptr")
    sig.update(dict(zip(new_args, (f"*{dtype}", f"*{dtype}", "*i64") if write else ("constexpr",) * 3)))
    sig.update(qk_scale="fp32", max_blocks="i32", split_tokens="i32")
    strides = ["stride_qs", "stride_qh", "stride_bs", "stride_cb", "stride_cs", "stride_ch"]
    strides += ["stride_ks", "stride_kh", "stride_vs", "stride_vh"] if write else []
    sig.update({name: "i32" for name in strides})
    # the new tokens' strides: unit along head_dim, or 0 (and never read) without them
    consts = dict(stride_qd=1, stride_bb=1, stride_cd=1, stride_kd=int(write), stride_vd=int(write))
    if not write:
        consts.update(dict.fromkeys(new_args), stride_ks=0, stride_kh=0, stride_vs=0, stride_vh=0)
    consts.update(HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_N=config.block_n, BLOCK_D=block_d, SPLIT=split,
                  ALIGNED=aligned, NUM_STAGES=config.num_stages, WRITE_NEW=write)
    sig.update({name: "constexpr" for name in consts if name not in sig or sig[name] == "constexpr"})
    label = (f"{dtype} d{head_dim} bs{block_size} n{config.block_n}w{config.num_warps}"
             f"s{config.num_stages} {'split' if split else 'direct'}")
    label += ("" if aligned else " unaligned") + ("" if cache_dtype == dtype else f" {cache_dtype} cache")
    label += "" if write else " no-write"
    return CompileSpec(_paged_decode_kernel, label, sig, consts, num_warps=config.num_warps, targets=targets)


def paged_decode_attention_ref(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                               block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                               *, new_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                               ) -> torch.Tensor:
    """q: `[seqs, heads, head_dim]`; key_cache, value_cache: `[num_blocks, block_size, heads,
    head_dim]`; block_tables: `[seqs, max_blocks]` int32; seq_lens: `[seqs]` int32 keys per
    sequence, the current token's included. Returns `[seqs, heads, head_dim]`.

    new_kv: (key, value, slot_mapping) of the current tokens, `[seqs, heads, head_dim]` twice and
    `[seqs]` int64: stored in the caches as `write_kv_cache_ref` stores them (a negative slot:
    not stored), and each sequence's last position (seq_lens[i] - 1, within its table) is its
    current token, as stored, whatever the cache holds there. So a slot >= 0 should be that
    position, as the engine's slot mapping makes it, and no other sequence of the batch may
    read its block (the engine shares only full blocks, never stored again): the Triton op
    stores in the same launch that reads.

    Gathers every sequence's blocks (vLLM's `ref_paged_attn` idea), batched: slots past a
    sequence's length are zeroed, not just masked, so NaN garbage there cannot leak in via 0*NaN.
    """
    seqs, max_blocks = block_tables.shape
    block_size = key_cache.shape[1]
    table = block_tables.long()
    if new_kv is not None:
        write_kv_cache_ref(*new_kv[:2], key_cache, value_cache, new_kv[2])
    keys = key_cache[table].flatten(1, 2).float()      # [seqs, max_blocks*block_size, heads, dim]
    values = value_cache[table].flatten(1, 2).float()
    if new_kv is not None and keys.shape[1]:
        # the current tokens as the cache holds them, at each sequence's last position
        last = (seq_lens.long().clamp(max=keys.shape[1]) - 1).clamp(min=0)
        rows = torch.arange(seqs, device=q.device)
        keys[rows, last] = to_cache_ref(new_kv[0], key_cache.dtype).float()
        values[rows, last] = to_cache_ref(new_kv[1], value_cache.dtype).float()
    valid = torch.arange(max_blocks * block_size, device=q.device)[None, :] < seq_lens[:, None]
    keys = torch.where(valid[:, :, None, None], keys, 0.0)
    values = torch.where(valid[:, :, None, None], values, 0.0)
    scores = torch.einsum("shd,skhd->shk", q.float(), keys) * scale
    scores.masked_fill_(~valid[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("shk,skhd->shd", probs, values).to(q.dtype)
