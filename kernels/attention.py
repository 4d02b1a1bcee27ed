"""Prefill attention over packed variable-length sequences: a Triton flash-attention kernel and
the torch reference op.

Each sequence's new queries attend causally to its own new keys and to the context already in
the paged cache, which covers plain prefill (no context), chunked prefill and recompute after
preemption with one signature.

Kernel design. One program per (head, query block of one sequence). The query blocks of all
sequences are laid out on a virtual axis where sequence s starts at `cu_seqlens[s] // BLOCK_M + s`:
these starts grow strictly and leave room for the `ceil(len_s / BLOCK_M)` blocks of each sequence,
so `tokens // BLOCK_M + seqs` programs per head cover every block, a program finds its sequence by
counting the starts at or before its block (whole chunks of cu_seqlens per memory round trip),
and the launcher needs no device->host sync (at most `seqs` programs
per head find no block and exit). A head of two powers of two (OPT-2.7B's 80 = 64 + 16) runs as
two exact tiles side by side; any other head width is padded to a power of two and its tail
masked. Each program runs an online softmax (base 2, fp32) over three key
ranges: the cached context through the block table (masked only in its partial tile), the new
tokens before the query block (no mask), and the diagonal tiles (causal mask). Fully masked tiles
are never visited. Loads are masked so that unused cache slots, which may hold NaN, never enter
the sums (a select, never a multiplication by zero).

A second kernel serves batches known to have no cached context on sm_90 (tiles.warp_specialize):
the same blocks and online softmax as one warp-specialised loop over all key tiles, with K and V
from per-sequence TMA descriptors (_prefill_attention_ws_kernel explains why it is separate).
A third serves short prompts without cached context (tiles.persistent): one tile per sequence
and head, taken in turn by a fixed number of programs that prefetch their next tile's rows into
L2 while they compute (_prefill_persistent_kernel). A fourth, in Gluon, serves batches without
cached context on sm_90 with its wgmma pipeline written out (tiles.wgmma, kernels/attention_wgmma.py).
"""
from __future__ import annotations

import contextvars
import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from . import attention_wgmma
from .attention_tiles import (_DEFAULT_CAPABILITY, _PERSISTENT_TILES_SM90, _TILES_FP32, _TMA_CAPABILITY,
                              _WS_TILES_SM90, ONE_LOOP_CANDIDATES, PADDED_80_CANDIDATES, PERSISTENT_CANDIDATES,
                              Q_SMEM_CANDIDATES, TMA_CANDIDATES, WS_CANDIDATES, Tiles, _check_tiles, _fail,
                              _head_dim_pad, _head_split, _padded_class, _q_box_2d, _tile_head_dim, default_tiles,
                              tile_table)
from .device import INTERPRETED as _INTERPRETED
from .device import nvidia_capability, sm_count, tma_addressable as _tma_addressable
from .kv_cache import (FP8, check_cache_dtype, check_slot_mapping, gather_cached_kv, slot_offset, to_cache,
                       write_kv_cache, write_kv_cache_ref)
from .launch_math import cdiv as _cdiv, next_pow2 as _next_pow2

_LOG2E = 1.4426950408889634
_INT32_MAX = tl.constexpr(2 ** 31 - 1)   # a constexpr: compiled kernels may read no other global
# cu_seqlens entries a program reads per round trip while finding its sequence (kernel comment).
_SEQ_CHUNK = 128


@triton.jit
def _load_rows(row_ptrs, offs_d, rows_ok, d_ok, MASK_ROWS: tl.constexpr, MASK_D: tl.constexpr):
    """A [rows, len(offs_d)] tile from one pointer per row, zero where masked. Masks are emitted
    only where needed, so full tiles of unpadded heads stay plain vector loads."""
    ptrs = row_ptrs[:, None] + offs_d[None, :]
    if MASK_ROWS:
        if MASK_D:
            tile = tl.load(ptrs, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            tile = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
    else:
        if MASK_D:
            tile = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


@triton.jit
def _store_rows(row_ptrs, offs_d, tile, rows_ok, d_ok, MASK_D: tl.constexpr):
    """Store a [rows, len(offs_d)] tile through one pointer per row, masked like _load_rows."""
    ptrs = row_ptrs[:, None] + offs_d[None, :]
    if MASK_D:
        tl.store(ptrs, tile, mask=rows_ok[:, None] & d_ok[None, :])
    else:
        tl.store(ptrs, tile, mask=rows_ok[:, None])


@triton.jit
def _load_head(row_ptrs, offs_d, offs_h, rows_ok, d_ok, MASK_ROWS: tl.constexpr, MASK_D: tl.constexpr,
               D_HI: tl.constexpr):
    """One tile of heads as its (first D_LO columns, last D_HI columns); without a split the
    second is the first again, never read."""
    lo = _load_rows(row_ptrs, offs_d, rows_ok, d_ok, MASK_ROWS, MASK_D)
    if D_HI > 0:
        hi = _load_rows(row_ptrs, offs_h, rows_ok, d_ok, MASK_ROWS, False)
    else:
        hi = lo
    return lo, hi


@triton.jit
def _load_cached_head(cache_ptr, rows, offs_d, offs_h, rows_ok, d_ok, MASK_ROWS: tl.constexpr,
                      MASK_D: tl.constexpr, D_HI: tl.constexpr, DTYPE: tl.constexpr):
    """_load_head of cache rows (`rows`: element offsets of each token's head), in DTYPE (the
    query's): a float8 cache is widened before its tiles meet the query's in a dot."""
    lo, hi = _load_head(tl.multiple_of(cache_ptr + rows, 16), offs_d, offs_h, rows_ok, d_ok, MASK_ROWS, MASK_D,
                        D_HI)
    return lo.to(DTYPE), hi.to(DTYPE)


@triton.jit
def _store_new_rows(slot_ptr,          # [q_len] int64 cache slot of each of the sequence's new tokens
                    offs, rows_ok, key_cache_ptr, value_cache_ptr, head_offset, stride_cb, stride_cs,
                    k, k_hi, v, v_hi, offs_d, offs_h, d_ok, MASK_D: tl.constexpr, D_HI: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr):
    """Store the new tokens `offs` (where rows_ok and their slot is >= 0) of one head, loaded as
    _load_head tiles, in the caches at their slots, rounded as write_kv_cache rounds them."""
    slots = tl.load(slot_ptr + offs, mask=rows_ok, other=-1)
    keep = rows_ok & (slots >= 0)
    rows = slot_offset(slots, BLOCK_SIZE, stride_cb, stride_cs) + head_offset
    cache_dtype: tl.constexpr = key_cache_ptr.dtype.element_ty
    # cache rows start 16-byte aligned (the launcher checks it), as for the context loads
    key_rows, value_rows = tl.multiple_of(key_cache_ptr + rows, 16), tl.multiple_of(value_cache_ptr + rows, 16)
    _store_rows(key_rows, offs_d, to_cache(k, cache_dtype), keep, d_ok, MASK_D)
    _store_rows(value_rows, offs_d, to_cache(v, cache_dtype), keep, d_ok, MASK_D)
    if D_HI > 0:
        _store_rows(key_rows, offs_h, to_cache(k_hi, cache_dtype), keep, d_ok, False)
        _store_rows(value_rows, offs_h, to_cache(v_hi, cache_dtype), keep, d_ok, False)


@triton.jit
def _dot(a, b, acc, UPCAST_DOT: tl.constexpr):
    """a @ b + acc. UPCAST_DOT multiplies in fp32, for the Triton interpreter, which multiplies
    bfloat16 tiles as their raw uint16 bits; products of bf16 values are exact in fp32, as on
    tensor cores. ieee: fp32 inputs must not silently drop to TF32 on GPUs (fp16 / bf16 use
    tensor cores anyway)."""
    if UPCAST_DOT:
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _softmax_step(acc, acc_hi, m_i, l_i, q, q_hi, k, k_hi, v, v_hi, qk_scale, visible,
                  MASKED: tl.constexpr, UPCAST_DOT: tl.constexpr, D_HI: tl.constexpr):
    """Fold one key tile into the running (acc, max, sum) of an online softmax in base 2.

    q: [BLOCK_M, D_LO]; k, v: [BLOCK_N, D_LO]; with D_HI > 0 the head's last D_HI columns come
    apart as q_hi, k_hi, v_hi and accumulate into acc_hi (otherwise those are never read);
    qk_scale: softmax scale * log2(e); visible: which keys each query may see (broadcastable to
    [BLOCK_M, BLOCK_N]), read only when MASKED.
    """
    qk = _dot(q, tl.trans(k), None, UPCAST_DOT)
    if D_HI > 0:
        qk = _dot(q_hi, tl.trans(k_hi), qk, UPCAST_DOT)
    if MASKED:
        # -inf weighs a hidden key exactly 0. The caller visits first a tile in which every row
        # sees a key, so the running max is finite from then on and exp2 never sees -inf - -inf.
        qk = tl.where(visible, qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    p = p.to(v.dtype)
    acc = _dot(p, v, acc * alpha[:, None], UPCAST_DOT)
    if D_HI > 0:
        acc_hi = _dot(p, v_hi, acc_hi * alpha[:, None], UPCAST_DOT)
    return acc, acc_hi, m_new, l_i


@triton.jit
def _output_rows(out_ptr,   # [tokens, heads, head_dim] the launcher's contiguous output
                 q_start, head, offs_m, stride_ot, stride_oh, HEAD_DIM: tl.constexpr):
    """One pointer per query row `offs_m` of `head` in the sequence starting at token q_start,
    computed afresh at the store: reusing q's kept them live through every loop (spills on
    sm_80), and a block pointer's 64-bit bounds checks held 64-bit row pointers across the
    diagonal tile (spills with one 4-warp warpgroup at head_dim 128)."""
    rows = out_ptr + q_start.to(tl.int64) * stride_ot + head * stride_oh + offs_m.to(tl.int64) * stride_ot
    # The output's rows start 16-byte aligned where a head's bytes are a multiple of 16 (every
    # OPT head), which the compiler cannot see ahead of time.
    if HEAD_DIM * out_ptr.dtype.element_ty.primitive_bitwidth % 128 == 0:
        rows = tl.multiple_of(rows, 16)
    return rows


@triton.jit
def _find_query_block(cu_seqlens_ptr,   # [seqs + 1] int32 offset of each sequence's new tokens
                      num_seqs, BLOCK_M: tl.constexpr, SEQ_CHUNK: tl.constexpr):
    """This program's (sequence, its first token, its length, query block within it) from its
    position on the virtual block axis (module docstring); the block is < 0 or past the
    sequence's blocks where the program has none.

    The sequence is the last s with cu_seqlens[s] // BLOCK_M + s <= vblock, or s = 0 (the left
    side grows strictly with s). Counted over whole chunks of cu_seqlens at once rather than by
    binary search: one memory round trip per SEQ_CHUNK sequences instead of one per halving,
    which a short program (128-token prompts in a batch of 64) would otherwise spend most of
    its time waiting on. With cu_seqlens non-decreasing, the sequence's start is the largest
    entry that qualifies, its end the smallest one past it."""
    # Last blocks first: they see the most keys, and starting them early shortens the tail.
    vblock = tl.num_programs(1) - 1 - tl.program_id(1)
    seq = tl.full((), -1, tl.int32)
    q_start = tl.full((), 0, tl.int32)
    q_end = tl.full((), _INT32_MAX, tl.int32)
    for s0 in range(0, num_seqs + 1, SEQ_CHUNK):
        s = s0 + tl.arange(0, SEQ_CHUNK)
        bounds = tl.load(cu_seqlens_ptr + s, mask=s <= num_seqs, other=_INT32_MAX)
        # s = 0 qualifies whatever its start: packed tokens may begin after an offset
        qualifies = (s < num_seqs) & ((bounds // BLOCK_M + s <= vblock) | (s == 0))
        seq += tl.sum(qualifies.to(tl.int32))
        q_start = tl.maximum(q_start, tl.max(tl.where(qualifies, bounds, 0)))
        q_end = tl.minimum(q_end, tl.min(tl.where(qualifies, _INT32_MAX, bounds)))
    return seq, q_start, q_end - q_start, vblock - (q_start // BLOCK_M + seq)


# num_seqs is never specialised: Triton would turn a 1 into a constant, and the sequence search
# below loops to a bound derived from it.
@triton.jit(do_not_specialize=["num_seqs"])
def _prefill_attention_kernel(
    q_ptr,             # [tokens, heads, head_dim] new queries, any token/head strides
    k_ptr,             # [tokens, heads, head_dim] new keys
    v_ptr,             # [tokens, heads, head_dim] new values
    key_cache_ptr,     # [num_blocks, block_size, heads, head_dim]
    value_cache_ptr,   # [num_blocks, block_size, heads, head_dim], the key cache's strides
    out_ptr,           # [tokens, heads, head_dim]
    q_desc,            # TMA descriptors of q, k, v [tokens, heads, head_dim] in boxes of
    k_desc,            # [BLOCK_M (q) or BLOCK_N, 1, D_LO] (columns past head_dim read as
    v_desc,            # zero), or None when USE_TMA is off; with Q_2D q_desc views q as
    q_hi_desc,         # [tokens, heads * HEAD_DIM] in [BLOCK_M, D_LO] boxes. The same for the
    k_hi_desc,         # last D_HI columns, from column D_LO; None without a split head or TMA
    v_hi_desc,
    cu_seqlens_ptr,    # [seqs + 1] int32 offset of each sequence's new tokens
    context_lens_ptr,  # [seqs] int32 tokens cached before the new ones
    block_tables_ptr,  # [seqs, max_blocks] int32 cache block ids
    slot_ptr,          # WRITE_KV: [tokens] int64 cache slot of each new token (< 0: not stored); else None
    num_seqs, qk_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch, stride_ot, stride_oh, stride_bt,
    HEAD_DIM: tl.constexpr, D_LO: tl.constexpr, D_HI: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST_DOT: tl.constexpr, USE_TMA: tl.constexpr,
    SEQ_CHUNK: tl.constexpr, HAS_CONTEXT: tl.constexpr, ONE_LOOP: tl.constexpr, WRITE_KV: tl.constexpr,
    Q_2D: tl.constexpr,
):
    head = tl.program_id(0)
    seq, q_start, q_len, block_m = _find_query_block(cu_seqlens_ptr, num_seqs, BLOCK_M, SEQ_CHUNK)
    # Past its sequence's blocks, or before the first sequence (tokens packed after an offset):
    # nothing to do.
    if (block_m < 0) | (block_m * BLOCK_M >= q_len):
        return

    # Off-diagonal tiles must end exactly where the query block starts.
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    # A head is either one power-of-two tile D_LO wide (padded past HEAD_DIM and masked), or,
    # where HEAD_DIM is two powers of two (80 = 64 + 16), two exact tiles: every dot then spends
    # its multiplies on real columns (80 of 80, not 80 of a padded 128).
    tl.static_assert(D_HI == 0 or D_LO + D_HI == HEAD_DIM)
    MASK_D: tl.constexpr = HEAD_DIM < D_LO
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)    # query index within the new tokens
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_LO)
    d_ok = offs_d < HEAD_DIM
    if D_HI > 0:
        offs_h = D_LO + tl.arange(0, D_HI)
    else:
        offs_h = offs_d
    m_ok = offs_m < q_len
    # int64 row offsets: tokens * stride of a packed qkv passes 2**31 in large batches. Each row
    # starts 16-byte aligned (the launcher checks it): saying so gives 16-byte vector loads and
    # cp.async even where Triton cannot see the arguments' alignment (the ahead-of-time compile).
    # The hints must sit here: on a helper's argument they are lost.
    if USE_TMA:
        # Rows past the sequence hold the next one's queries (or TMA's zeros past the last
        # token): their outputs are never stored, and no valid row reads them.
        q_row0 = q_start + block_m * BLOCK_M
        if Q_2D:
            # No reshape: q stays in shared memory, where the QK^T wgmma reads it (Tiles.q_smem).
            q = q_desc.load([q_row0, head * HEAD_DIM])
            if D_HI > 0:
                q_hi = q_hi_desc.load([q_row0, head * HEAD_DIM + D_LO])
            else:
                q_hi = q
        else:
            q = q_desc.load([q_row0, head, 0]).reshape(BLOCK_M, D_LO)
            if D_HI > 0:
                q_hi = q_hi_desc.load([q_row0, head, D_LO]).reshape(BLOCK_M, D_HI)
            else:
                q_hi = q
    else:
        q_rows = (q_start + offs_m).to(tl.int64)
        q_row_ptrs = tl.multiple_of(q_ptr + q_rows * stride_qt + head * stride_qh, 16)
        q, q_hi = _load_head(q_row_ptrs, offs_d, offs_h, m_ok, d_ok, True, MASK_D, D_HI)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_LO], tl.float32)
    if D_HI > 0:
        acc_hi = tl.zeros([BLOCK_M, D_HI], tl.float32)
    else:
        acc_hi = tl.zeros([1, 1], tl.float32)   # never read

    # 1. The cached context, visible to every query: the partial tile, then full tiles unmasked.
    # The partial tile goes first: after the loop, its set-up stays live through the loop and
    # spills registers on sm_80. Without HAS_CONTEXT (a batch the host knows has none) none of
    # it is compiled, and no program waits for its context length before its first key tile.
    if HAS_CONTEXT:
        ctx_len = tl.load(context_lens_ptr + seq)
        table = block_tables_ptr + seq.to(tl.int64) * stride_bt
        ctx_full = (ctx_len // BLOCK_N) * BLOCK_N
        if ctx_full < ctx_len:
            pos = ctx_full + offs_n
            in_ctx = pos < ctx_len
            # Table entries past the context may be stale: never follow them.
            blocks = tl.load(table + pos // BLOCK_SIZE, mask=in_ctx, other=0)
            rows = blocks.to(tl.int64) * stride_cb + (pos % BLOCK_SIZE) * stride_cs + head * stride_ch
            k, k_hi = _load_cached_head(key_cache_ptr, rows, offs_d, offs_h, in_ctx, d_ok, True, MASK_D, D_HI,
                                        q_ptr.dtype.element_ty)
            v, v_hi = _load_cached_head(value_cache_ptr, rows, offs_d, offs_h, in_ctx, d_ok, True, MASK_D, D_HI,
                                        q_ptr.dtype.element_ty)
            acc, acc_hi, m_i, l_i = _softmax_step(acc, acc_hi, m_i, l_i, q, q_hi, k, k_hi, v, v_hi, qk_scale,
                                                  in_ctx[None, :], True, UPCAST_DOT, D_HI)

        for start in range(0, ctx_full, BLOCK_N):
            pos = start + offs_n
            blocks = tl.load(table + pos // BLOCK_SIZE)
            rows = blocks.to(tl.int64) * stride_cb + (pos % BLOCK_SIZE) * stride_cs + head * stride_ch
            k, k_hi = _load_cached_head(key_cache_ptr, rows, offs_d, offs_h, pos, d_ok, False, MASK_D, D_HI,
                                        q_ptr.dtype.element_ty)
            v, v_hi = _load_cached_head(value_cache_ptr, rows, offs_d, offs_h, pos, d_ok, False, MASK_D, D_HI,
                                        q_ptr.dtype.element_ty)
            acc, acc_hi, m_i, l_i = _softmax_step(acc, acc_hi, m_i, l_i, q, q_hi, k, k_hi, v, v_hi, qk_scale,
                                                  0, False, UPCAST_DOT, D_HI)

    # 2. New tokens before this query block: all visible, all inside the sequence. With
    # ONE_LOOP they join the diagonal tiles' loop below instead (Tiles.one_loop).
    k_head = k_ptr + head * stride_kh
    v_head = v_ptr + head * stride_vh
    diag_start = block_m * BLOCK_M
    if ONE_LOOP:
        masked_start = 0
    else:
        masked_start = diag_start
        for start in range(0, diag_start, BLOCK_N):
            if USE_TMA:
                # one bulk copy per tile instead of a 16-byte copy per thread and row
                k = k_desc.load([q_start + start, head, 0]).reshape(BLOCK_N, D_LO)
                v = v_desc.load([q_start + start, head, 0]).reshape(BLOCK_N, D_LO)
                if D_HI > 0:
                    k_hi = k_hi_desc.load([q_start + start, head, D_LO]).reshape(BLOCK_N, D_HI)
                    v_hi = v_hi_desc.load([q_start + start, head, D_LO]).reshape(BLOCK_N, D_HI)
                else:
                    k_hi, v_hi = k, v
            else:
                kv_rows = (q_start + start + offs_n).to(tl.int64)
                k_rows, v_rows = k_head + kv_rows * stride_kt, v_head + kv_rows * stride_vt
                k, k_hi = _load_head(tl.multiple_of(k_rows, 16), offs_d, offs_h, offs_n, d_ok, False, MASK_D, D_HI)
                v, v_hi = _load_head(tl.multiple_of(v_rows, 16), offs_d, offs_h, offs_n, d_ok, False, MASK_D, D_HI)
            acc, acc_hi, m_i, l_i = _softmax_step(acc, acc_hi, m_i, l_i, q, q_hi, k, k_hi, v, v_hi, qk_scale,
                                                  0, False, UPCAST_DOT, D_HI)

    # 3. The diagonal tiles: causal mask; the sequence may end inside them. Key diag_start is
    # visible to every row of the block, so the first of these tiles gives each row a finite max.
    # Always masked pointer loads, also under USE_TMA: a bulk copy would bring in the next
    # sequence's values, and a non-finite one times its zero weight would leak NaN into this one.
    # With ONE_LOOP every new-token tile comes through here, from key 0 (visible to every row):
    # one pipelined loop, so the diagonal tiles' loads are in flight while the tiles before them
    # compute, where the split loops wait for them after the last unmasked tile; every tile pays
    # the mask instead.
    diag_end = tl.minimum(diag_start + BLOCK_M, q_len)
    for start in range(masked_start, diag_end, BLOCK_N):
        offs_kv = start + offs_n
        kv_rows = (q_start + offs_kv).to(tl.int64)
        in_seq = offs_kv < q_len
        k_rows, v_rows = k_head + kv_rows * stride_kt, v_head + kv_rows * stride_vt
        k, k_hi = _load_head(tl.multiple_of(k_rows, 16), offs_d, offs_h, in_seq, d_ok, True, MASK_D, D_HI)
        v, v_hi = _load_head(tl.multiple_of(v_rows, 16), offs_d, offs_h, in_seq, d_ok, True, MASK_D, D_HI)
        if WRITE_KV:
            # The KV-cache write, fused: this query block's own rows are its diagonal keys, so
            # each new token is stored once, by one program per head (from key diag_start: with
            # ONE_LOOP the tiles before it belong to earlier blocks). No program of this launch
            # reads them back from the cache: context reads stop before the new tokens.
            _store_new_rows(slot_ptr + q_start, offs_kv, in_seq & (offs_kv >= diag_start), key_cache_ptr,
                            value_cache_ptr, head * stride_ch, stride_cb, stride_cs, k, k_hi, v, v_hi, offs_d,
                            offs_h, d_ok, MASK_D, D_HI, BLOCK_SIZE)
        causal = offs_kv[None, :] <= offs_m[:, None]
        acc, acc_hi, m_i, l_i = _softmax_step(acc, acc_hi, m_i, l_i, q, q_hi, k, k_hi, v, v_hi, qk_scale,
                                              causal, True, UPCAST_DOT, D_HI)

    o_rows = _output_rows(out_ptr, q_start, head, offs_m, stride_ot, stride_oh, HEAD_DIM)
    _store_rows(o_rows, offs_d, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), m_ok, d_ok, MASK_D)
    if D_HI > 0:
        _store_rows(o_rows, offs_h, (acc_hi / l_i[:, None]).to(out_ptr.dtype.element_ty), m_ok, d_ok, False)


# num_seqs as in _prefill_attention_kernel; tokens only bounds q's descriptor (a specialisation
# on it would only compile more variants).
@triton.jit(do_not_specialize=["tokens", "num_seqs"])
def _prefill_attention_ws_kernel(
    q_ptr,             # [tokens, heads, head_dim] new queries, any token/head strides
    k_ptr,             # [tokens, heads, head_dim] new keys
    v_ptr,             # [tokens, heads, head_dim] new values
    out_ptr,           # [tokens, heads, head_dim]
    cu_seqlens_ptr,    # [seqs + 1] int32 offset of each sequence's new tokens
    key_cache_ptr,     # WRITE_KV: [num_blocks, block_size, heads, head_dim]
    value_cache_ptr,   # WRITE_KV: [num_blocks, block_size, heads, head_dim], the key cache's strides
    slot_ptr,          # WRITE_KV: [tokens] int64 cache slot of each new token (< 0: not stored); else None
    tokens, num_seqs, qk_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_cb, stride_cs, stride_ch,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST_DOT: tl.constexpr, SEQ_CHUNK: tl.constexpr, BLOCK_SIZE: tl.constexpr, WRITE_KV: tl.constexpr,
):
    """_prefill_attention_kernel for a batch with no cached context, as one warp-specialised
    loop (Triton's automatic split on sm_90: a 4-warp TMA producer feeds, through shared
    memory, two 4-warp consumer warpgroups of 64 query rows each, so K/V loads no longer wait
    in the softmax's instruction stream). Triton applies it only to a kernel whose one loop
    holds all its dots and that has no early exit, hence a second kernel: every key tile,
    diagonal ones included, goes through the same causally masked step, and a program without
    a query block runs no iterations and stores nothing. K and V come through per-sequence TMA
    descriptors, which read rows past the sequence as zeros: the next sequence's values, finite
    or not, never meet a zero weight (0 * inf is NaN). Columns past HEAD_DIM read as zeros too
    (head 80 runs padded to D_PAD)."""
    head = tl.program_id(0)
    _seq, q_start, q_len, block_m = _find_query_block(cu_seqlens_ptr, num_seqs, BLOCK_M, SEQ_CHUNK)
    # q through a descriptor over all tokens: rows outside this sequence (past it, or before
    # the first one) only make output rows that are never stored.
    q_desc = tl.make_tensor_descriptor(q_ptr + head * stride_qh, shape=[tokens, HEAD_DIM],
                                       strides=[stride_qt, 1], block_shape=[BLOCK_M, D_PAD])
    seq_rows = tl.maximum(q_len, 1)   # a sequence without tokens runs no iteration on them
    k_desc = tl.make_tensor_descriptor(k_ptr + q_start.to(tl.int64) * stride_kt + head * stride_kh,
                                       shape=[seq_rows, HEAD_DIM], strides=[stride_kt, 1],
                                       block_shape=[BLOCK_N, D_PAD])
    v_desc = tl.make_tensor_descriptor(v_ptr + q_start.to(tl.int64) * stride_vt + head * stride_vh,
                                       shape=[seq_rows, HEAD_DIM], strides=[stride_vt, 1],
                                       block_shape=[BLOCK_N, D_PAD])
    q = q_desc.load([q_start + block_m * BLOCK_M, 0])
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)    # query index within the new tokens
    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    # Keys 0 .. the query block's end: the first tile shows key 0 to every row, as
    # _softmax_step needs; no key past a valid row's own position is ever visible. None for a
    # block before the sequence or past its end.
    block_start = block_m * BLOCK_M
    kv_end = tl.where((block_start >= 0) & (block_start < q_len), tl.minimum(block_start + BLOCK_M, q_len), 0)
    for start in tl.range(0, kv_end, BLOCK_N, warp_specialize=True):
        k = k_desc.load([start, 0])
        v = v_desc.load([start, 0])
        visible = (start + offs_n)[None, :] <= offs_m[:, None]
        acc, _, m_i, l_i = _softmax_step(acc, acc, m_i, l_i, q, q, k, k, v, v, qk_scale, visible,
                                         True, UPCAST_DOT, 0)

    offs_d = tl.arange(0, D_PAD)
    rows_ok = (offs_m >= 0) & (offs_m < q_len)
    d_ok = offs_d < HEAD_DIM
    o_rows = _output_rows(out_ptr, q_start, head, offs_m, stride_ot, stride_oh, HEAD_DIM)
    _store_rows(o_rows, offs_d, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), rows_ok, d_ok, HEAD_DIM < D_PAD)
    if WRITE_KV:
        # The KV-cache write, fused: after the loop (a store in it would have to bring the TMA
        # tiles out of shared memory in the consumers' instruction stream), this block's own
        # rows once more by pointers, from L2 where the loop just read them.
        kv_rows = (q_start + offs_m).to(tl.int64)
        k, _ = _load_head(tl.multiple_of(k_ptr + kv_rows * stride_kt + head * stride_kh, 16), offs_d, offs_d,
                          rows_ok, d_ok, True, HEAD_DIM < D_PAD, 0)
        v, _ = _load_head(tl.multiple_of(v_ptr + kv_rows * stride_vt + head * stride_vh, 16), offs_d, offs_d,
                          rows_ok, d_ok, True, HEAD_DIM < D_PAD, 0)
        _store_new_rows(slot_ptr + q_start, offs_m, rows_ok, key_cache_ptr, value_cache_ptr, head * stride_ch,
                        stride_cb, stride_cs, k, k, v, v, offs_d, offs_d, d_ok, HEAD_DIM < D_PAD, 0, BLOCK_SIZE)


@triton.jit
def _prefetch_rows_l2(row_ptrs,   # [BLOCK] the first element of each head row to prefetch
                      HEAD_DIM: tl.constexpr, LINES: tl.constexpr):
    """Asks L2 for LINES 128-byte lines of each row, from its start, cut at its last element
    (a row that does not start on a line may leave part of its last line out); nothing waits
    on it."""
    LINE: tl.constexpr = 1024 // row_ptrs.dtype.element_ty.primitive_bitwidth   # elements a line
    cols = tl.minimum(tl.arange(0, LINES) * LINE, HEAD_DIM - 1)
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // dummy $0", "=r,l", [row_ptrs[:, None] + cols[None, :]],
                              dtype=tl.int32, is_pure=False, pack=1)


# num_seqs as in _prefill_attention_kernel.
@triton.jit(do_not_specialize=["num_seqs"])
def _prefill_persistent_kernel(
    q_ptr,             # [tokens, heads, head_dim] new queries, any token/head strides
    k_ptr,             # [tokens, heads, head_dim] new keys
    v_ptr,             # [tokens, heads, head_dim] new values
    out_ptr,           # [tokens, heads, head_dim]
    cu_seqlens_ptr,    # [seqs + 1] int32 offset of each sequence's new tokens, at most BLOCK each
    key_cache_ptr,     # WRITE_KV: [num_blocks, block_size, heads, head_dim]
    value_cache_ptr,   # WRITE_KV: [num_blocks, block_size, heads, head_dim], the key cache's strides
    slot_ptr,          # WRITE_KV: [tokens] int64 cache slot of each new token (< 0: not stored); else None
    num_seqs, heads, qk_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_cb, stride_cs, stride_ch,
    HEAD_DIM: tl.constexpr, D_LO: tl.constexpr, D_HI: tl.constexpr, BLOCK: tl.constexpr,
    UPCAST_DOT: tl.constexpr, BLOCK_SIZE: tl.constexpr, WRITE_KV: tl.constexpr, PREFETCH_LINES: tl.constexpr,
):
    """Prefill of short prompts with no cached context (tiles.persistent): every sequence has
    at most BLOCK new tokens, so one BLOCK x BLOCK tile holds all of a (sequence, head)'s
    queries and keys. A fixed number of programs (_PERSISTENT_PROGRAMS_PER_SM per SM) take
    these items in turn, item = program id + i * programs, heads fastest.

    Why: at 128 tokens attention moves more bytes than it does math (an H200 ran the main
    kernel at b64 L128 at about half of its copy bandwidth, SDPA at 85%). A main-kernel program
    finds its sequence, waits for its own loads, then computes, so an SM that holds a program
    or two asks memory for little while they compute. Here each item first asks L2 for the
    next item's rows (PREFETCH_LINES lines a row; 0: none), for HBM to stream while this
    item's dots and softmax run, and reads the next item's bounds one item ahead: no item
    waits for cu_seqlens before its loads. Whether that wins is for the tile sweep to say.
    Each item also stores its k and v in the cache (WRITE_KV), once per token and head."""
    MASK_D: tl.constexpr = HEAD_DIM < D_LO
    offs = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D_LO)
    d_ok = offs_d < HEAD_DIM
    if D_HI > 0:
        offs_h = D_LO + tl.arange(0, D_HI)
    else:
        offs_h = offs_d
    causal = offs[None, :] <= offs[:, None]
    items = num_seqs * heads
    programs = tl.num_programs(0)
    first = tl.program_id(0)
    q_start = tl.load(cu_seqlens_ptr + first // heads, mask=first < items, other=0)
    q_end = tl.load(cu_seqlens_ptr + first // heads + 1, mask=first < items, other=0)
    for item in range(first, items, programs):
        head = item % heads
        later = item + programs
        has_next = later < items
        next_start = tl.load(cu_seqlens_ptr + later // heads, mask=has_next, other=0)
        next_end = tl.load(cu_seqlens_ptr + later // heads + 1, mask=has_next, other=0)
        if q_end > q_start:   # a sequence without new tokens has nothing to attend or store
            in_seq = offs < q_end - q_start
            rows = (q_start + offs).to(tl.int64)
            q, q_hi = _load_head(tl.multiple_of(q_ptr + rows * stride_qt + head * stride_qh, 16), offs_d, offs_h,
                                 in_seq, d_ok, True, MASK_D, D_HI)
            k, k_hi = _load_head(tl.multiple_of(k_ptr + rows * stride_kt + head * stride_kh, 16), offs_d, offs_h,
                                 in_seq, d_ok, True, MASK_D, D_HI)
            v, v_hi = _load_head(tl.multiple_of(v_ptr + rows * stride_vt + head * stride_vh, 16), offs_d, offs_h,
                                 in_seq, d_ok, True, MASK_D, D_HI)
            # After this item's loads, so they need not wait for the next item's bounds.
            if PREFETCH_LINES > 0 and next_end > next_start:
                # rows past the sequence repeat its last one: every address stays inside q, k, v
                next_rows = (next_start + tl.minimum(offs, next_end - next_start - 1)).to(tl.int64)
                next_head = later % heads
                _prefetch_rows_l2(q_ptr + next_rows * stride_qt + next_head * stride_qh, HEAD_DIM, PREFETCH_LINES)
                _prefetch_rows_l2(k_ptr + next_rows * stride_kt + next_head * stride_kh, HEAD_DIM, PREFETCH_LINES)
                _prefetch_rows_l2(v_ptr + next_rows * stride_vt + next_head * stride_vh, HEAD_DIM, PREFETCH_LINES)
            if WRITE_KV:
                _store_new_rows(slot_ptr + q_start, offs, in_seq, key_cache_ptr, value_cache_ptr, head * stride_ch,
                                stride_cb, stride_cs, k, k_hi, v, v_hi, offs_d, offs_h, d_ok, MASK_D, D_HI,
                                BLOCK_SIZE)
            # One masked step of the online softmax from an empty state: key 0 is visible to
            # every row, so each row's max is finite (rows past the sequence: computed, not stored).
            acc = tl.zeros([BLOCK, D_LO], tl.float32)
            if D_HI > 0:
                acc_hi = tl.zeros([BLOCK, D_HI], tl.float32)
            else:
                acc_hi = tl.zeros([1, 1], tl.float32)   # never read
            acc, acc_hi, _, l_i = _softmax_step(acc, acc_hi, tl.full([BLOCK], float("-inf"), tl.float32),
                                                tl.zeros([BLOCK], tl.float32), q, q_hi, k, k_hi, v, v_hi, qk_scale,
                                                causal & in_seq[None, :], True, UPCAST_DOT, D_HI)
            o_rows = _output_rows(out_ptr, q_start, head, offs, stride_ot, stride_oh, HEAD_DIM)
            _store_rows(o_rows, offs_d, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), in_seq, d_ok, MASK_D)
            if D_HI > 0:
                _store_rows(o_rows, offs_h, (acc_hi / l_i[:, None]).to(out_ptr.dtype.element_ty), in_seq, d_ok,
                            False)
        q_start, q_end = next_start, next_end


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  query_start: int) -> torch.Tensor:
    """Causal attention of one sequence in float32.

    q: `[q_len, heads, head_dim]`; k, v: `[kv_len, heads, head_dim]`; query i sits at position
    `query_start + i` and sees keys 0..query_start+i.
    """
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    q_pos = torch.arange(q.shape[0], device=q.device)[:, None] + query_start
    k_pos = torch.arange(k.shape[0], device=q.device)[None, :]
    scores.masked_fill_(k_pos > q_pos, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v.float()).to(q.dtype)


def prefill_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          key_cache: torch.Tensor, value_cache: torch.Tensor,
                          cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
                          block_tables: torch.Tensor, scale: float, *,
                          max_context_len: int | None = None,
                          slot_mapping: torch.Tensor | None = None,
                          max_query_len: int | None = None) -> torch.Tensor:
    """Attention for the new tokens of a batch of sequences, packed back to back.

    q, k, v: `[tokens, heads, head_dim]` new tokens; key_cache, value_cache:
    `[num_blocks, block_size, heads, head_dim]`; cu_seqlens_q: `[seqs + 1]` int32 offsets of each
    sequence in the packed tokens; context_lens: `[seqs]` int32 tokens already cached before the
    new ones; block_tables: `[seqs, max_blocks]` int32. Returns `[tokens, heads, head_dim]`.
    max_context_len and max_query_len (the launcher's host-side bounds of context_lens and of
    the new tokens per sequence) are not needed here: the reference reads the lengths.
    slot_mapping: `[tokens]` int64; where given, the k and v of every token of a sequence
    (tokens before cu_seqlens_q[0] or from cu_seqlens_q[-1] on belong to none) are also stored
    in the caches at these slots (negative: not stored), as `write_kv_cache_ref` stores them. The new tokens' attention reads them from k and v, never
    back from the cache, so no slot may hold context that a sequence of the batch reads (the
    engine's slots lie past each sequence's context, and it shares only full blocks).
    """
    starts = cu_seqlens_q.tolist()
    if slot_mapping is not None:
        first, end = starts[0], starts[-1]
        write_kv_cache_ref(k[first:end], v[first:end], key_cache, value_cache, slot_mapping[first:end])
    out = torch.empty_like(q)
    for i, context in enumerate(context_lens.tolist()):
        s, e = starts[i], starts[i + 1]
        keys, values = k[s:e], v[s:e]
        if context:
            keys = torch.cat([gather_cached_kv(key_cache, block_tables[i], context).to(k.dtype), keys])
            values = torch.cat([gather_cached_kv(value_cache, block_tables[i], context).to(v.dtype), values])
        out[s:e] = attention_ref(q[s:e], keys, values, scale, query_start=context)
    return out


# Persistent programs per SM: one is what a 128 x 128 tile's registers allow at 8 warps.
_PERSISTENT_PROGRAMS_PER_SM = 1
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _capability(device: torch.device) -> int:
    found = nvidia_capability(device)
    return _DEFAULT_CAPABILITY if found is None else found


def _rows_aligned(t: torch.Tensor, strides: tuple) -> bool:
    """Unit stride along the last dim (`strides` is t.stride()) and every row 16-byte aligned:
    the kernel promises both to the compiler."""
    if strides[-1] != 1 or t.data_ptr() % 16:
        return False
    item = t.element_size()
    return all(stride * item % 16 == 0 or size == 1 for stride, size in zip(strides[:-1], t.shape))


def _check_inputs(q, k, v, key_cache, value_cache, cu_seqlens_q, context_lens, block_tables) -> None:
    """Shapes, dtypes, strides and devices; messages are built only on failure, and each
    attribute is read once, as this runs for every layer of every prefill step."""
    shape = q.shape
    if len(shape) != 3 or k.shape != shape or v.shape != shape:
        _fail(f"q, k, v must share one [tokens, heads, head_dim] shape, got {tuple(shape)}, "
              f"{tuple(k.shape)}, {tuple(v.shape)}")
    _, heads, head_dim = shape
    dtype = q.dtype
    if dtype not in _SUPPORTED_DTYPES:
        _fail(f"dtype {dtype} is not float16, bfloat16 or float32")
    if not (k.dtype == v.dtype == dtype and key_cache.dtype == value_cache.dtype in (dtype, FP8)):
        _fail(f"q, k, v must share one dtype and the caches it or float8_e4m3fn, got {dtype}, {k.dtype}, "
              f"{v.dtype}, {key_cache.dtype}, {value_cache.dtype}")
    cache_shape, cache_strides = key_cache.shape, key_cache.stride()
    if len(cache_shape) != 4 or cache_shape[2:] != (heads, head_dim):
        _fail(f"key_cache must be [num_blocks, block_size, {heads}, {head_dim}], got {tuple(cache_shape)}")
    if value_cache.shape != cache_shape or value_cache.stride() != cache_strides:
        _fail("value_cache must have the key cache's shape and strides")
    check_cache_dtype(key_cache.dtype, key_cache.device)
    if head_dim > 256:
        _fail(f"head_dim {head_dim} > 256 is not supported")
    for name, t, strides in (("q", q, q.stride()), ("k", k, k.stride()), ("v", v, v.stride()),
                             ("key_cache", key_cache, cache_strides), ("value_cache", value_cache, cache_strides)):
        if not _rows_aligned(t, strides):
            _fail(f"{name} needs unit stride along head_dim and 16-byte aligned rows, got strides "
                  f"{t.stride()} at address {t.data_ptr():#x}")
    if not (cu_seqlens_q.dtype == context_lens.dtype == block_tables.dtype == torch.int32):
        _fail(f"cu_seqlens_q, context_lens, block_tables must be int32, got {cu_seqlens_q.dtype}, "
              f"{context_lens.dtype}, {block_tables.dtype}")
    seqs = context_lens.shape[0] if context_lens.dim() == 1 else -1
    if seqs < 0 or cu_seqlens_q.shape != (seqs + 1,) or block_tables.dim() != 2 or block_tables.shape[0] != seqs:
        _fail(f"need cu_seqlens_q [seqs + 1], context_lens [seqs], block_tables [seqs, max_blocks], got "
              f"{tuple(cu_seqlens_q.shape)}, {tuple(context_lens.shape)}, {tuple(block_tables.shape)}")
    if cu_seqlens_q.stride(0) != 1 or context_lens.stride(0) != 1 or block_tables.stride(1) != 1:
        _fail("cu_seqlens_q, context_lens and block_tables rows must be contiguous")
    device = q.device
    if any(t.device != device for t in (k, v, key_cache, value_cache, cu_seqlens_q, context_lens, block_tables)):
        _fail("all tensors must be on one device")


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      key_cache: torch.Tensor, value_cache: torch.Tensor,
                      cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
                      block_tables: torch.Tensor, scale: float, *, tiles: Tiles | None = None,
                      max_context_len: int | None = None, slot_mapping: torch.Tensor | None = None,
                      max_query_len: int | None = None) -> torch.Tensor:
    """Causal flash attention for the new tokens of a batch of sequences, packed back to back,
    each also attending to its `context_lens[i]` tokens already in the paged cache.

    Same shapes and semantics as `prefill_attention_ref`: q, k, v `[tokens, heads, head_dim]`
    (any token/head strides, unit stride along head_dim, 16-byte aligned rows); key_cache,
    value_cache `[num_blocks, block_size, heads, head_dim]` of q's dtype and identical strides;
    cu_seqlens_q `[seqs + 1]`, context_lens `[seqs]`, block_tables `[seqs, max_blocks]`, all int32
    with contiguous rows. Returns a contiguous `[tokens, heads, head_dim]` tensor of q's dtype.
    No device->host sync: `cu_seqlens_q[-1]` must not exceed `tokens`, and each table row must
    cover its sequence's context (neither is checked: both would need the values on the host).
    `tiles` (block_m, block_n, num_warps, num_stages[, tma[, split_head[, warp_specialize[,
    one_loop[, persistent[, q_smem[, max_registers[, wgmma]]]]]]]]) overrides `default_tiles`,
    for tests and the tile sweep.
    `max_context_len`: an upper bound of context_lens known on the host (None: unknown). Only 0
    changes anything today: then the main kernel is compiled without its context loops (never
    reading context_lens or block_tables), the defaults may come from the warp-specialised table
    (_WS_TILES_SM90), and tiles with warp_specialize run the context-free warp-specialised
    kernel. Where that kernel cannot run (context possible, float32, or q/k/v no TMA descriptor
    can describe), a warp-specialised override is replaced as a whole by the main kernel's
    default tiles. `max_query_len`: an upper bound of every sequence's new tokens known on the
    host (None: unknown); with max_context_len 0 and max_query_len <= block_m, persistent tiles
    (from an override or _PERSISTENT_TILES_SM90) run the persistent kernel, otherwise the main
    kernel's default tiles replace them. Tiles with wgmma run the Gluon kernel
    (kernels/attention_wgmma.py) where max_context_len is 0 on an sm_90 GPU and its `takes`
    holds (there the KV-cache write is a launch of its own before it); elsewhere the main
    kernel's default tiles replace them. A bound below a real length leaves that sequence's
    later tokens wrong and, with slot_mapping, unstored (like a table that does not cover its
    context, it is not checked: that would need the lengths on the host). Raises
    ValueError on any shape, dtype, device, stride or alignment mismatch, on tiles outside the
    choices the kernel supports, or on a max_context_len or max_query_len that is not None or
    an int >= 0.
    `slot_mapping` (`[tokens]` int64, as `prefill_attention_ref` takes it, with its limits): the
    KV-cache write of k and v runs inside this launch, each query block's program storing its
    own rows.
    """
    _check_inputs(q, k, v, key_cache, value_cache, cu_seqlens_q, context_lens, block_tables)
    if slot_mapping is not None:
        check_slot_mapping(slot_mapping, q.shape[0], q.device)
    for name, bound in (("max_context_len", max_context_len), ("max_query_len", max_query_len)):
        if bound is not None and (not isinstance(bound, int) or isinstance(bound, bool) or bound < 0):
            _fail(f"{name} must be None or an int >= 0, got {bound!r}")
    capability = _capability(q.device)
    if tiles is not None:
        tiles = _check_tiles(tiles, capability)
    tokens, heads, head_dim = q.shape
    seqs = context_lens.shape[0]
    out = torch.empty((tokens, heads, head_dim), dtype=q.dtype, device=q.device)
    if tokens == 0 or seqs == 0:   # without sequences no token is stored either
        return out
    if tiles is None:
        tiles = default_tiles(head_dim, q.dtype, tokens, seqs, capability, context_free=max_context_len == 0,
                              max_query_len=max_query_len)
    if tiles.wgmma and not (max_context_len == 0 and _wgmma_takes(q, k, v, capability)):
        tiles = default_tiles(head_dim, q.dtype, tokens, seqs, capability)
    if tiles.warp_specialize and not (max_context_len == 0 and q.dtype != torch.float32
                                      and all(_tma_addressable(t) for t in (q, k, v))):
        # the main kernel at its own tiles: warp-specialised ones are checked for their kernel only
        tiles = default_tiles(head_dim, q.dtype, tokens, seqs, capability)
    if tiles.persistent:
        if max_context_len == 0 and max_query_len is not None and max_query_len <= tiles.block_m:
            _launch_persistent(q, k, v, out, cu_seqlens_q, scale, tiles, key_cache, value_cache, slot_mapping)
            return out
        tiles = default_tiles(head_dim, q.dtype, tokens, seqs, capability)
    d_lo, d_hi = _head_split(head_dim, tiles.split_head)
    grid = (heads, tokens // tiles.block_m + seqs)
    if grid[1] > 65535:   # CUDA's limit on the second grid dimension
        _fail(f"{tokens} tokens in {seqs} sequences make more than 65535 query blocks")
    if tiles.wgmma:
        if slot_mapping is not None:   # not fused there: the new tokens go to the cache first
            write_kv_cache(k, v, key_cache, value_cache, slot_mapping)
        attention_wgmma.launch_prefill_wgmma(q, k, v, out, cu_seqlens_q, scale * _LOG2E, tiles.block_m,
                                             tiles.block_n, tiles.num_warps, tiles.num_stages, grid, _SEQ_CHUNK)
        return out
    if tiles.warp_specialize:
        _launch_warp_specialized(q, k, v, out, cu_seqlens_q, scale, tiles, grid, key_cache, value_cache,
                                 slot_mapping)
        return out
    descs = [None] * 6
    # q_smem's 2-D box of q's columns holds exactly one head where heads sit back to back in a row
    q_2d = _q_box_2d(tiles, head_dim) and q.stride(1) == head_dim
    if tiles.tma:
        names = _tma_operands(tiles)
        by_tma = [(t, tiles.block_m if name == "q" else tiles.block_n, q_2d and name == "q")
                  for name, t in zip("qkv", (q, k, v)) if name in names]
        if all(_tma_addressable(t) for t, _, _ in by_tma):
            for first, width in ((0, d_lo), (3, d_hi)):   # [q, k, v] over D_LO, then over D_HI
                if width:
                    for i, (t, rows, flat) in enumerate(by_tma):
                        descs[first + i] = _tma_descriptor(t, rows, width, flat)
    _prefill_attention_kernel[grid](
        q, k, v, key_cache, value_cache, out, *descs, cu_seqlens_q, context_lens, block_tables, slot_mapping,
        seqs, scale * _LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), out.stride(0), out.stride(1),
        block_tables.stride(0),
        HEAD_DIM=head_dim, D_LO=d_lo, D_HI=d_hi, BLOCK_SIZE=key_cache.shape[1],
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, UPCAST_DOT=_INTERPRETED and q.dtype == torch.bfloat16,
        USE_TMA=descs[0] is not None, SEQ_CHUNK=_SEQ_CHUNK, HAS_CONTEXT=max_context_len != 0,
        ONE_LOOP=tiles.one_loop, WRITE_KV=slot_mapping is not None, Q_2D=q_2d and descs[0] is not None,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages, maxnreg=tiles.max_registers or None)
    return out


def _wgmma_takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, capability: int) -> bool:
    """Whether the Gluon wgmma kernel runs this launch: compiled Gluon on an sm_90 GPU (the
    interpreter runs no Gluon; later GPUs have no wgmma), on inputs it takes as they lie."""
    return (q.is_cuda and not _INTERPRETED and capability == attention_wgmma.WGMMA_CAPABILITY
            and attention_wgmma.takes(q, k, v))


def _launch_warp_specialized(q, k, v, out, cu_seqlens_q, scale: float, tiles: Tiles, grid: tuple,
                             key_cache, value_cache, slot_mapping) -> None:
    tokens, _, head_dim = q.shape

    def launch():
        _prefill_attention_ws_kernel[grid](
            q, k, v, out, cu_seqlens_q, key_cache, value_cache, slot_mapping, tokens, cu_seqlens_q.shape[0] - 1,
            scale * _LOG2E, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
            HEAD_DIM=head_dim, D_PAD=_head_dim_pad(head_dim), BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
            UPCAST_DOT=_INTERPRETED and q.dtype == torch.bfloat16, SEQ_CHUNK=_SEQ_CHUNK,
            BLOCK_SIZE=key_cache.shape[1], WRITE_KV=slot_mapping is not None, num_warps=tiles.num_warps,
            num_stages=tiles.num_stages, maxnreg=tiles.max_registers or None)
    if q.is_cuda:
        # The kernel builds its TMA descriptors on the device, in scratch memory that Triton asks
        # its allocator for at launch. Ours is set in a copy of the context (Triton keeps the
        # allocator in a ContextVar), for this launch only: whatever allocator the process set
        # stays in force for every other kernel.
        contextvars.copy_context().run(_with_allocator, functools.partial(_descriptor_scratch, q.device), launch)
    else:
        launch()


def _launch_persistent(q, k, v, out, cu_seqlens_q, scale: float, tiles: Tiles, key_cache, value_cache,
                       slot_mapping) -> None:
    tokens, heads, head_dim = q.shape
    seqs = cu_seqlens_q.shape[0] - 1
    d_lo, d_hi = _head_split(head_dim, tiles.split_head)
    # L2 prefetch is inline PTX: NVIDIA GPUs only (the interpreter and ROCm run without it).
    lines = _next_pow2(_cdiv(head_dim * q.element_size(), 128)) if nvidia_capability(q.device) else 0
    grid = (min(seqs * heads, _PERSISTENT_PROGRAMS_PER_SM * sm_count(q.device)),)
    _prefill_persistent_kernel[grid](
        q, k, v, out, cu_seqlens_q, key_cache, value_cache, slot_mapping, seqs, heads, scale * _LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        HEAD_DIM=head_dim, D_LO=d_lo, D_HI=d_hi, BLOCK=tiles.block_m,
        UPCAST_DOT=_INTERPRETED and q.dtype == torch.bfloat16, BLOCK_SIZE=key_cache.shape[1],
        WRITE_KV=slot_mapping is not None, PREFETCH_LINES=lines, num_warps=tiles.num_warps,
        num_stages=tiles.num_stages, maxnreg=tiles.max_registers or None)


def _with_allocator(allocator, launch) -> None:
    triton.set_allocator(allocator)
    launch()


def _descriptor_scratch(device: torch.device, size: int, alignment: int, stream) -> torch.Tensor:
    """Device memory for a launch's on-device TMA descriptors, from torch's caching allocator
    (its blocks are 512-byte aligned, past any alignment Triton asks for; CUDA-graph capture
    records it like any other allocation)."""
    return torch.empty(size, dtype=torch.int8, device=device)


def _tma_operands(tiles: Tiles) -> tuple[str, ...]:
    """Which of q, k, v the main kernel loads by TMA where tiles.tma holds: all three, or with
    one_loop q alone (every K/V tile there is a masked pointer load)."""
    return ("q",) if tiles.one_loop else ("q", "k", "v")


def _tma_descriptor(t: torch.Tensor, rows: int, width: int, flat: bool = False) -> TensorDescriptor:
    """[tokens, heads, head_dim] in boxes of one head's `rows` tokens and `width` columns; TMA
    fills what a box holds past the tensor (past head_dim, past the last token) with zeros.
    `flat`: the same rows as [tokens, heads * head_dim] (heads back to back in a row) in 2-D
    [rows, width] boxes, which the kernel need not reshape (Tiles.q_smem)."""
    if flat:
        return TensorDescriptor(t, shape=[t.shape[0], t.shape[1] * t.shape[2]], strides=[t.stride(0), 1],
                                block_shape=[rows, width])
    return TensorDescriptor(t, shape=list(t.shape), strides=list(t.stride()), block_shape=[rows, 1, width])


def compile_specs() -> list:
    """Every specialisation the launcher can pick for OPT's head_dim 64, 80 (64 + 16) and 128 at
    block_size 8, 16, 32: each tile-table entry in fp16 and bf16 (tensor cores) for the
    targets whose table holds it, and the fp32 tiles (CUDA cores, by design) at block_size 16;
    and on sm_90 the sweep's candidates with an option (PADDED_80_CANDIDATES, TMA_CANDIDATES,
    ONE_LOOP_CANDIDATES, Q_SMEM_CANDIDATES; on sm_80 the one-loop 64x64 tile at head 128 spills 40 B),
    and the warp-specialised kernel at WS_CANDIDATES and _WS_TILES_SM90. Each main-kernel tile
    also without its context loops (HAS_CONTEXT off), as batches without context run it, and
    the sm_90 table's tiles reading a float8 cache. The table's tiles store the new tokens in the
    cache (WRITE_KV, as the engine launches them), and without context also not (as the
    benchmarks do); the sweep's candidates store them where they read context."""
    from .compile_check import TARGETS, CompileSpec

    def spec(dtype: str, head_dim: int, block_size: int, tiles: Tiles, label: str,
             targets: tuple, has_context: bool = True, cache_dtype: str | None = None,
             write_kv: bool = True) -> CompileSpec:
        d_lo, d_hi = _head_split(head_dim, tiles.split_head)
        signature = {name: f"*{dtype}" for name in ("q_ptr", "k_ptr", "v_ptr", "out_ptr")}
        signature.update({name: f"*{cache_dtype or dtype}" for name in ("key_cache_ptr", "value_cache_ptr")})
        unused = []
        q_2d = _q_box_2d(tiles, head_dim)   # as the launcher decides for packed heads
        for part, width in (("", d_lo), ("_hi", d_hi)):
            for name, rows in (("q", tiles.block_m), ("k", tiles.block_n), ("v", tiles.block_n)):
                if tiles.tma and width and name in _tma_operands(tiles):
                    box = f"{rows},{width}" if q_2d and name == "q" else f"{rows},1,{width}"
                    signature[f"{name}{part}_desc"] = f"tensordesc<{dtype}[{box}]>"
                else:
                    signature[f"{name}{part}_desc"] = "constexpr"
                    unused.append(f"{name}{part}_desc")
        signature.update({name: "*i32" for name in ("cu_seqlens_ptr", "context_lens_ptr", "block_tables_ptr")})
        signature["slot_ptr"] = "*i64" if write_kv else "constexpr"
        if not write_kv:
            unused.append("slot_ptr")
        signature.update(num_seqs="i32", qk_scale="fp32")
        signature.update({name: "i32" for name in (
            "stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh",
            "stride_cb", "stride_cs", "stride_ch", "stride_ot", "stride_oh", "stride_bt")})
        constexprs = dict(HEAD_DIM=head_dim, D_LO=d_lo, D_HI=d_hi, BLOCK_SIZE=block_size,
                          BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, UPCAST_DOT=False, USE_TMA=tiles.tma,
                          SEQ_CHUNK=_SEQ_CHUNK, HAS_CONTEXT=has_context, ONE_LOOP=tiles.one_loop,
                          WRITE_KV=write_kv, Q_2D=q_2d)
        signature.update({name: "constexpr" for name in constexprs})
        constexprs.update(dict.fromkeys(unused))
        label = (f"{label} d{head_dim} {dtype} bs{block_size} {tiles.block_m}x{tiles.block_n} "
                 f"w{tiles.num_warps}s{tiles.num_stages}{' tma' if tiles.tma else ''}"
                 f"{' padded' if d_hi == 0 and head_dim != d_lo else ''}{'' if has_context else ' no-ctx'}"
                 f"{' one-loop' if tiles.one_loop else ''}{' q-smem' if q_2d else ''}"
                 f"{f' maxnreg{tiles.max_registers}' if tiles.max_registers else ''}"
                 f"{f' {cache_dtype} cache' if cache_dtype else ''}{'' if write_kv else ' no-write'}")
        return CompileSpec(_prefill_attention_kernel, label, signature, constexprs, uses_mma=dtype != "fp32",
                           uses_tma=tiles.tma, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
                           max_registers=tiles.max_registers, targets=targets)

    # Each distinct (entry, tiles) once, for the targets whose table picks it.
    entries: dict = {}
    for capability, _ in TARGETS:
        for key, tiles in tile_table(capability).items():
            # a TMA entry runs without TMA below _TMA_MIN_TOKENS
            for launched in dict.fromkeys((tiles, tiles._replace(tma=False))):
                entries.setdefault((key, launched), []).append(capability)
    specs = []
    # Batches known to have no context (max_context_len=0) run each tile without its context
    # loops, which never read the cache: one block size stands for all. The engine's launches
    # store the new tokens (slot_mapping); the benchmarks' and the sweep's, without context,
    # do not (write_kv=False).
    for ((kind, tile_head_dim), tiles), targets in entries.items():
        for head_dim in (d for d in (64, 80, 128) if _tile_head_dim(d) == tile_head_dim):
            specs += [spec(dtype, head_dim, block_size, tiles, kind, tuple(targets))
                      for dtype in ("fp16", "bf16") for block_size in (8, 16, 32)]
            specs += [spec(dtype, head_dim, 16, tiles, kind, tuple(targets), has_context=False, write_kv=write_kv)
                      for dtype in ("fp16", "bf16") for write_kv in (True, False)]
            # a float8 cache (sm_89+; checked on sm_90 at the default block size)
            if 90 in targets:
                specs += [spec(dtype, head_dim, 16, tiles, kind, (90,), cache_dtype="fp8e4nv")
                          for dtype in ("fp16", "bf16")]
    specs += [spec("fp32", head_dim, 16, _TILES_FP32, "ieee", tuple(cap for cap, _ in TARGETS), has_context)
              for head_dim in (64, 80, 128) for has_context in (True, False)]
    # The sweep's candidates with an option, on sm_90 (on sm_80 the padded 128x64 tile spills 24 B),
    # as the sweep runs them (no context, no store) and as the engine would once in a table.
    specs += [spec(dtype, 80, 16, tiles, "sweep", (_TMA_CAPABILITY,), has_context, write_kv=has_context)
              for tiles in PADDED_80_CANDIDATES for dtype in ("fp16", "bf16") for has_context in (True, False)]
    for pad, candidates in [*TMA_CANDIDATES.items(), *ONE_LOOP_CANDIDATES.items(), *Q_SMEM_CANDIDATES.items()]:
        for head_dim in (d for d in (64, 80, 128) if _padded_class(d) == pad):
            specs += [spec(dtype, head_dim, 16, tiles, "sweep", (_TMA_CAPABILITY,), has_context,
                           write_kv=has_context)
                      for tiles in candidates for dtype in ("fp16", "bf16") for has_context in (True, False)]
    # The warp-specialised kernel at its sweep candidates and its table's entries (sm_90; no
    # block size: no cache).
    for pad, candidates in WS_CANDIDATES.items():
        chosen = list(dict.fromkeys(t for (_, table_pad), t in _WS_TILES_SM90.items()
                                    if table_pad == pad and t not in candidates))
        for head_dim in (d for d in (64, 80, 128) if _padded_class(d) == pad):
            # with the store (the engine), and without (the sweep and the benchmarks)
            specs += [_ws_spec(dtype, head_dim, tiles, write_kv) for tiles in candidates + chosen
                      for dtype in ("fp16", "bf16") for write_kv in (True, False)]
    # The persistent kernel likewise, at PERSISTENT_CANDIDATES and _PERSISTENT_TILES_SM90.
    for pad, candidates in PERSISTENT_CANDIDATES.items():
        chosen = [t for table_pad, t in _PERSISTENT_TILES_SM90.items() if table_pad == pad and t not in candidates]
        for head_dim in (d for d in (64, 80, 128) if _padded_class(d) == pad):
            specs += [_persistent_spec(dtype, head_dim, tiles, write_kv) for tiles in candidates + chosen
                      for dtype in ("fp16", "bf16") for write_kv in (True, False)]
    return specs


def _ws_spec(dtype: str, head_dim: int, tiles: Tiles, write_kv: bool):
    """The compile-check specialisation of _prefill_attention_ws_kernel at `tiles` (block size
    16 where it stores the new tokens)."""
    label = (f"ws d{head_dim} {dtype} {tiles.block_m}x{tiles.block_n} w{tiles.num_warps}s{tiles.num_stages}"
             f"{' padded' if head_dim != _head_dim_pad(head_dim) else ''}")
    return _context_free_spec(_prefill_attention_ws_kernel, label, dtype, tiles, write_kv,
                              dict(tokens="i32", num_seqs="i32", qk_scale="fp32"),
                              dict(HEAD_DIM=head_dim, D_PAD=_head_dim_pad(head_dim), BLOCK_M=tiles.block_m,
                                   BLOCK_N=tiles.block_n, SEQ_CHUNK=_SEQ_CHUNK),
                              uses_tma=True, uses_warp_specialize=True)


def _persistent_spec(dtype: str, head_dim: int, tiles: Tiles, write_kv: bool):
    """The compile-check specialisation of _prefill_persistent_kernel at `tiles`, with its L2
    prefetch (block size 16 where it stores the new tokens)."""
    d_lo, d_hi = _head_split(head_dim, tiles.split_head)
    label = f"persistent d{head_dim} {dtype} {tiles.block_m}x{tiles.block_n} w{tiles.num_warps}s{tiles.num_stages}"
    return _context_free_spec(_prefill_persistent_kernel, label, dtype, tiles, write_kv,
                              dict(num_seqs="i32", heads="i32", qk_scale="fp32"),
                              dict(HEAD_DIM=head_dim, D_LO=d_lo, D_HI=d_hi, BLOCK=tiles.block_m,
                                   PREFETCH_LINES=_next_pow2(_cdiv(head_dim * 2, 128))))


def _context_free_spec(kernel, label: str, dtype: str, tiles: Tiles, write_kv: bool, scalars: dict,
                       constexprs: dict, **options):
    """A compile-check specialisation (sm_90) of a kernel for batches without cached context (the
    warp-specialised and the persistent one), which share their pointer and stride arguments:
    q, k, v, out and the caches of `dtype`, cu_seqlens, and slot_mapping (None without
    write_kv); `scalars` types their other runtime arguments."""
    from .compile_check import CompileSpec
    signature = {name: f"*{dtype}" for name in ("q_ptr", "k_ptr", "v_ptr", "out_ptr",
                                                 "key_cache_ptr", "value_cache_ptr")}
    signature.update(cu_seqlens_ptr="*i32", slot_ptr="*i64" if write_kv else "constexpr", **scalars)
    signature.update({name: "i32" for name in ("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt",
                                                "stride_vh", "stride_ot", "stride_oh", "stride_cb", "stride_cs",
                                                "stride_ch")})
    constexprs = dict(constexprs, UPCAST_DOT=False, BLOCK_SIZE=16, WRITE_KV=write_kv)
    signature.update({name: "constexpr" for name in constexprs})
    if not write_kv:
        constexprs["slot_ptr"] = None
    # row strides of OPT's packed qkv and of the output are multiples of 16 elements
    return CompileSpec(kernel, label + ("" if write_kv else " no-write"), signature, constexprs, uses_mma=True,
                       num_warps=tiles.num_warps, num_stages=tiles.num_stages, targets=(_TMA_CAPABILITY,),
                       divisible_by_16=("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt",
                                        "stride_vh", "stride_ot", "stride_oh"), **options)
