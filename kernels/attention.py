"""Prefill attention over packed variable-length sequences: a Triton flash-attention kernel and
the torch reference op.

Each sequence's new queries attend causally to its own new keys and to the context already in
the paged cache, which covers plain prefill (no context), chunked prefill and recompute after
preemption with one signature.

Kernel design. One program per (head, query block of one sequence), in one of two layouts of
the query blocks, and in neither does the launcher need a device->host sync:
- uniform, for a batch without cached context where the host knows a bound on any sequence's
  new tokens (max_query_len, which the engine passes) and it costs no more programs than the
  virtual axis (not in the warp-specialised kernel): ceil(bound / BLOCK_M)
  programs a sequence, block-major from the last block, so a program's sequence is its place
  modulo the sequences (two loads of cu_seqlens) and the blocks that see the most keys start
  first. For equal-length prompts no program is idle.
- the virtual block axis otherwise, where sequence s starts at `cu_seqlens[s] // BLOCK_M + s`:
  these starts grow strictly and leave room for the `ceil(len_s / BLOCK_M)` blocks of each
  sequence, so `tokens // BLOCK_M + seqs` programs per head cover every block, and a program
  finds its sequence by counting the starts at or before its block (whole chunks of cu_seqlens
  per memory round trip); at most `seqs` programs per head find no block and exit.
The grid is (heads of a group, query blocks, head groups), which the GPU starts in that order:
where a batch's keys and values outgrow L2 (eight 1024-token prompts of OPT-6.7B: 134 MB), the
heads run in groups whose keys and values fit half of it, so the programs running at once share
them (_head_group); otherwise one group of every head, whose query blocks all start before any
block after them.
A head of two powers of two (OPT-2.7B's 80 = 64 + 16) runs as
two exact tiles side by side; any other head width is padded to a power of two and its tail
masked. Each program runs an online softmax (base 2, fp32) over three key
ranges: the cached context through the block table (masked only in its partial tile), the new
tokens before the query block (no mask), and the diagonal tiles (causal mask). Fully masked tiles
are never visited. Loads are masked so that unused cache slots, which may hold NaN, never enter
the sums (a select, never a multiplication by zero).

Three more kernels serve batches known to have no cached context, each in a file of its own,
and prefill_attention below picks among the four. On sm_90, the same blocks and online softmax
as one warp-specialised loop over all key tiles, with K and V from per-sequence TMA descriptors
(tiles.warp_specialize; attention_ws.py). For short prompts, one tile per sequence and head,
taken in turn by a fixed number of programs that prefetch their next tile's rows into L2 while
they compute (tiles.persistent; attention_persistent.py). On sm_90, in Gluon, with the wgmma
pipeline written out (tiles.wgmma; attention_wgmma.py); its warp-specialised form, a TMA
producer warp feeding two 64-row consumer warpgroups (tiles.wgmma with tiles.warp_specialize;
attention_wgmma_ws.py); and its persistent form for short prompts, one program an SM with the
next items' q, k and v in flight by TMA while one computes (tiles.wgmma with tiles.persistent;
attention_wgmma_persistent.py). The Triton kernels share their pieces through
attention_parts.py.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from . import attention_persistent, attention_wgmma, attention_ws
from .attention_parts import (LOG2E, SEQ_CHUNK, _find_query_block, _grid_head, _head_columns, _load_cached_head,
                              _load_head, _output_rows, _softmax_step, _store_new_rows, _store_rows)
from .attention_tiles import (_DEFAULT_CAPABILITY, _PERSISTENT_TILES_SM90, _TILES_FP32, _TMA_CAPABILITY,
                              _WS_TILES_SM90, ONE_LOOP_CANDIDATES, PADDED_80_CANDIDATES, PERSISTENT_CANDIDATES,
                              Q_SMEM_CANDIDATES, TMA_CANDIDATES, WS_CANDIDATES, Tiles, _check_tiles, _fail,
                              _head_split, _padded_class, _q_box_2d, _tile_head_dim, default_tiles,
                              one_tile_per_prompt, tile_table)
from .device import INTERPRETED as _INTERPRETED
from .device import l2_bytes, nvidia_capability, tma_addressable as _tma_addressable
from .kv_cache import (FP8, check_cache_dtype, check_slot_mapping, gather_cached_kv, write_kv_cache,
                       write_kv_cache_ref)
from .launch_math import cdiv as _cdiv


# num_seqs and blocks_per_seq are never specialised: Triton would turn a 1 into a constant (one
# more compiled variant), and the sequence search loops to a bound derived from num_seqs.
@triton.jit(do_not_specialize=["num_seqs", "blocks_per_seq"])
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
    num_seqs, blocks_per_seq, qk_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch, stride_ot, stride_oh, stride_bt,
    HEAD_DIM: tl.constexpr, D_LO: tl.constexpr, D_HI: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST_DOT: tl.constexpr, USE_TMA: tl.constexpr,
    SEQ_CHUNK: tl.constexpr, HAS_CONTEXT: tl.constexpr, ONE_LOOP: tl.constexpr, WRITE_KV: tl.constexpr,
    Q_2D: tl.constexpr, UNIFORM: tl.constexpr,
):
    head = _grid_head()
    seq, q_start, q_len, block_m = _find_query_block(cu_seqlens_ptr, num_seqs, blocks_per_seq, BLOCK_M, SEQ_CHUNK,
                                                     UNIFORM)
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
    offs_d, d_ok, offs_h = _head_columns(HEAD_DIM, D_LO, D_HI)
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
    in the caches at these slots (negative: not stored), as `write_kv_cache_ref` stores them.
    The new tokens' attention reads them from k and v, never back from the cache, so no slot
    may hold context that a sequence of the batch reads (the engine's slots lie past each
    sequence's context, and it shares only full blocks).
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
    one_loop[, persistent[, q_smem[, max_registers[, wgmma[, pingpong]]]]]]]]]) overrides
    `default_tiles`, for tests and the tile sweep.
    `max_context_len`: an upper bound of context_lens known on the host (None: unknown). Only 0
    changes anything today: then the main kernel is compiled without its context loops (never
    reading context_lens or block_tables), the defaults may come from the warp-specialised table
    (_WS_TILES_SM90), and tiles with warp_specialize run the context-free warp-specialised
    kernel. Where that kernel cannot run (context possible, float32, or q/k/v no TMA descriptor
    can describe), a warp-specialised override is replaced as a whole by the main kernel's
    default tiles. `max_query_len`: an upper bound of every sequence's new tokens known on the
    host (None: unknown); with max_context_len 0 and max_query_len <= block_m, persistent tiles
    that take a prompt a tile (one_tile_per_prompt; from an override or _PERSISTENT_TILES_SM90)
    run the persistent kernel, otherwise the main kernel's default tiles replace them. Tiles
    with wgmma run the Gluon kernel (kernels/attention_wgmma.py; with warp_specialize too, its
    warp-specialised form, attention_wgmma_ws.py, not Triton's, on one program an SM with
    persistent; with persistent alone, its persistent form, attention_wgmma_persistent.py, not
    Triton's) where max_context_len is 0 on an sm_90 GPU and its
    `takes` holds (there a float8 cache is written by a launch of its own before it); elsewhere
    the main kernel's default tiles replace them. A bound below a real length leaves that sequence's
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
    if tiles.wgmma and not (max_context_len == 0 and _wgmma_takes(q, k, v, capability, one_tile_per_prompt(tiles))):
        tiles = default_tiles(head_dim, q.dtype, tokens, seqs, capability)
    if tiles.warp_specialize and not (max_context_len == 0 and q.dtype != torch.float32
                                      and all(_tma_addressable(t) for t in (q, k, v))):
        # the main kernel at its own tiles: warp-specialised ones are checked for their kernel only
        tiles = default_tiles(head_dim, q.dtype, tokens, seqs, capability)
    if one_tile_per_prompt(tiles):
        if not (max_context_len == 0 and max_query_len is not None and max_query_len <= tiles.block_m):
            tiles = default_tiles(head_dim, q.dtype, tokens, seqs, capability)
        elif tiles.wgmma:   # its own grid: one program an SM, no query blocks
            attention_wgmma.launch_prefill_wgmma(q, k, v, out, cu_seqlens_q, scale * LOG2E, tiles.block_m,
                                                 tiles.block_n, tiles.num_warps, tiles.num_stages, None, 0, SEQ_CHUNK,
                                                 key_cache, value_cache,
                                                 _gluon_slot_mapping(k, v, key_cache, value_cache, cu_seqlens_q,
                                                                     slot_mapping), persistent=True)
            return out
        else:
            attention_persistent.launch(q, k, v, out, cu_seqlens_q, scale, tiles, key_cache, value_cache, slot_mapping)
            return out
    d_lo, d_hi = _head_split(head_dim, tiles.split_head)
    # the uniform layout only for batches without context (a variant fewer of every other tile
    # to compile) and not in Triton's warp-specialised kernel (attention_ws.py)
    triton_ws = tiles.warp_specialize and not tiles.wgmma
    uniform_bound = max_query_len if max_context_len == 0 and not triton_ws else None
    programs, blocks_per_seq = _block_layout(tokens, seqs, tiles.block_m, uniform_bound)
    if programs > 65535:   # CUDA's limit on the second grid dimension
        _fail(f"{tokens} tokens in {seqs} sequences make more than 65535 query blocks")
    keys_per_head = tokens + seqs * (max_context_len or 0)
    group = _head_group(heads, keys_per_head * head_dim * 2 * k.element_size(), l2_bytes(q.device))
    grid = (group, programs, heads // group)
    if tiles.wgmma:
        attention_wgmma.launch_prefill_wgmma(q, k, v, out, cu_seqlens_q, scale * LOG2E, tiles.block_m,
                                             tiles.block_n, tiles.num_warps, tiles.num_stages, grid, blocks_per_seq,
                                             SEQ_CHUNK, key_cache, value_cache,
                                             _gluon_slot_mapping(k, v, key_cache, value_cache, cu_seqlens_q,
                                                                 slot_mapping),
                                             warp_specialize=tiles.warp_specialize, pingpong=tiles.pingpong,
                                             persistent=tiles.persistent)
        return out
    if tiles.warp_specialize:
        attention_ws.launch(q, k, v, out, cu_seqlens_q, scale, tiles, grid, key_cache, value_cache, slot_mapping)
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
        seqs, blocks_per_seq, scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), out.stride(0), out.stride(1),
        block_tables.stride(0),
        HEAD_DIM=head_dim, D_LO=d_lo, D_HI=d_hi, BLOCK_SIZE=key_cache.shape[1],
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, UPCAST_DOT=_INTERPRETED and q.dtype == torch.bfloat16,
        USE_TMA=descs[0] is not None, SEQ_CHUNK=SEQ_CHUNK, HAS_CONTEXT=max_context_len != 0,
        ONE_LOOP=tiles.one_loop, WRITE_KV=slot_mapping is not None, Q_2D=q_2d and descs[0] is not None,
        UNIFORM=blocks_per_seq > 0,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages, maxnreg=tiles.max_registers or None)
    return out


def _gluon_slot_mapping(k: torch.Tensor, v: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                        cu_seqlens_q: torch.Tensor, slot_mapping: torch.Tensor | None) -> torch.Tensor | None:
    """The slot_mapping a Gluon kernel gets. They store rows as they are: a float8 cache is
    written here instead, before the kernel, of the tokens inside the sequences only (as the
    kernels store them), masked on the device, where their bounds are; the kernel then gets
    None."""
    if slot_mapping is None or key_cache.dtype == k.dtype:
        return slot_mapping
    token = torch.arange(k.shape[0], device=k.device)
    inside = (token >= cu_seqlens_q[0]) & (token < cu_seqlens_q[-1])
    write_kv_cache(k, v, key_cache, value_cache, torch.where(inside, slot_mapping, -1))
    return None


def _head_group(heads: int, kv_bytes_per_head: int, l2: int) -> int:
    """Heads a group of the grid (the module docstring): all of them where the batch's keys and
    values fit L2; else the most, dividing heads, whose keys and values fit half of it (the
    other half for the queries and outputs streaming past, and the next group's first tiles),
    at least one. Groups of equal size: a small last group would start its longest query
    blocks last, a tail no other program fills."""
    if heads * kv_bytes_per_head <= l2:
        return heads
    fits = max(1, l2 // 2 // max(kv_bytes_per_head, 1))
    return max(g for g in range(1, min(heads, fits) + 1) if heads % g == 0)


def _block_layout(tokens: int, seqs: int, block_m: int, max_query_len: int | None) -> tuple[int, int]:
    """(programs per head, blocks_per_seq) of a launch's query blocks (module docstring): the
    uniform layout, blocks_per_seq = ceil(max_query_len / block_m) programs a sequence, where the
    host's bound on any sequence's new tokens makes that no more programs than the virtual block
    axis; else that axis (tokens // block_m + seqs programs; blocks_per_seq 0)."""
    virtual = tokens // block_m + seqs
    per_seq = _cdiv(max_query_len, block_m) if max_query_len else 0
    if per_seq and seqs * per_seq <= virtual:
        return seqs * per_seq, per_seq
    return virtual, 0


def _wgmma_takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, capability: int, padded: bool = False) -> bool:
    """Whether the Gluon wgmma kernel runs this launch: compiled Gluon on an sm_90 GPU (the
    interpreter runs no Gluon; later GPUs have no wgmma), on inputs it takes as they lie
    (`padded`: the persistent form, which also takes heads in a padded box)."""
    return (q.is_cuda and not _INTERPRETED and capability == attention_wgmma.WGMMA_CAPABILITY
            and attention_wgmma.takes(q, k, v, padded))


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
    benchmarks do); the sweep's candidates store them where they read context. Every variant
    without context also in the uniform block layout."""
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
        signature.update(num_seqs="i32", blocks_per_seq="i32", qk_scale="fp32")
        signature.update({name: "i32" for name in (
            "stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh",
            "stride_cb", "stride_cs", "stride_ch", "stride_ot", "stride_oh", "stride_bt")})
        constexprs = dict(HEAD_DIM=head_dim, D_LO=d_lo, D_HI=d_hi, BLOCK_SIZE=block_size,
                          BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, UPCAST_DOT=False, USE_TMA=tiles.tma,
                          SEQ_CHUNK=SEQ_CHUNK, HAS_CONTEXT=has_context, ONE_LOOP=tiles.one_loop,
                          WRITE_KV=write_kv, Q_2D=q_2d, UNIFORM=False)
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
    # Batches without context run in the uniform block layout where the host's bound allows it
    # (_block_layout): each of those variants also so.
    specs += [dataclasses.replace(s, label=s.label + " uniform", constexprs={**s.constexprs, "UNIFORM": True})
              for s in specs if not s.constexprs["HAS_CONTEXT"]]
    # The warp-specialised kernel at its sweep candidates and its table's entries (sm_90; no
    # block size: no cache).
    for pad, candidates in WS_CANDIDATES.items():
        chosen = list(dict.fromkeys(t for (_, table_pad), t in _WS_TILES_SM90.items()
                                    if table_pad == pad and t not in candidates))
        for head_dim in (d for d in (64, 80, 128) if _padded_class(d) == pad):
            # with the store (the engine), and without (the sweep and the benchmarks)
            specs += [attention_ws.compile_spec(dtype, head_dim, tiles, write_kv) for tiles in candidates + chosen
                      for dtype in ("fp16", "bf16") for write_kv in (True, False)]
    # The persistent kernel likewise, at PERSISTENT_CANDIDATES and _PERSISTENT_TILES_SM90 (whose
    # Gluon entries, wgmma, attention_wgmma_persistent.py builds).
    for pad, candidates in PERSISTENT_CANDIDATES.items():
        for head_dim in (d for d in (64, 80, 128) if _padded_class(d) == pad):
            chosen = [t for head_class, t in _PERSISTENT_TILES_SM90.items()
                      if head_class == _tile_head_dim(head_dim) and t not in candidates and not t.wgmma]
            specs += [attention_persistent.compile_spec(dtype, head_dim, tiles, write_kv)
                      for tiles in candidates + chosen
                      for dtype in ("fp16", "bf16") for write_kv in (True, False)]
    return specs


