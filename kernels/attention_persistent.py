"""Prefill attention for short prompts with no cached context, one tile per sequence and head
taken in turn by a fixed number of programs (Tiles.persistent): the Triton kernel, its launcher
and its compile-check specialisation. kernels/attention.py's prefill_attention decides when it
runs."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_parts import (LOG2E, _head_columns, _load_head, _output_rows, _softmax_step, _store_new_rows,
                              _store_rows, context_free_spec)
from .attention_tiles import Tiles, _head_split
from .device import INTERPRETED, nvidia_capability, sm_count
from .launch_math import cdiv as _cdiv, next_pow2 as _next_pow2

# Persistent programs per SM: one is what a 128 x 128 tile's registers allow at 8 warps.
PROGRAMS_PER_SM = 1


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


# num_seqs as in kernels/attention.py's _prefill_attention_kernel.
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
    queries and keys. A fixed number of programs (PROGRAMS_PER_SM per SM) take
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
    offs_d, d_ok, offs_h = _head_columns(HEAD_DIM, D_LO, D_HI)
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


def launch(q, k, v, out, cu_seqlens_q, scale: float, tiles: Tiles, key_cache, value_cache, slot_mapping) -> None:
    """Run the kernel on PROGRAMS_PER_SM programs an SM (fewer where there are fewer items);
    prefill_attention has checked every input and that the batch fits the tile."""
    tokens, heads, head_dim = q.shape
    seqs = cu_seqlens_q.shape[0] - 1
    d_lo, d_hi = _head_split(head_dim, tiles.split_head)
    # L2 prefetch is inline PTX: NVIDIA GPUs only (the interpreter and ROCm run without it).
    lines = _next_pow2(_cdiv(head_dim * q.element_size(), 128)) if nvidia_capability(q.device) else 0
    grid = (min(seqs * heads, PROGRAMS_PER_SM * sm_count(q.device)),)
    _prefill_persistent_kernel[grid](
        q, k, v, out, cu_seqlens_q, key_cache, value_cache, slot_mapping, seqs, heads, scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        HEAD_DIM=head_dim, D_LO=d_lo, D_HI=d_hi, BLOCK=tiles.block_m,
        UPCAST_DOT=INTERPRETED and q.dtype == torch.bfloat16, BLOCK_SIZE=key_cache.shape[1],
        WRITE_KV=slot_mapping is not None, PREFETCH_LINES=lines, num_warps=tiles.num_warps,
        num_stages=tiles.num_stages, maxnreg=tiles.max_registers or None)


def compile_spec(dtype: str, head_dim: int, tiles: Tiles, write_kv: bool):
    """The compile-check specialisation of _prefill_persistent_kernel at `tiles`, with its L2
    prefetch (block size 16 where it stores the new tokens)."""
    d_lo, d_hi = _head_split(head_dim, tiles.split_head)
    label = f"persistent d{head_dim} {dtype} {tiles.block_m}x{tiles.block_n} w{tiles.num_warps}s{tiles.num_stages}"
    return context_free_spec(_prefill_persistent_kernel, label, dtype, tiles, write_kv,
                             dict(num_seqs="i32", heads="i32", qk_scale="fp32"),
                             dict(HEAD_DIM=head_dim, D_LO=d_lo, D_HI=d_hi, BLOCK=tiles.block_m,
                                  PREFETCH_LINES=_next_pow2(_cdiv(head_dim * 2, 128))))

