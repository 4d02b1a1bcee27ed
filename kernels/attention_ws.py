"""Prefill attention as one warp-specialised loop (sm_90), for batches with no cached context:
the Triton kernel (Tiles.warp_specialize), its launcher and its compile-check specialisation.
kernels/attention.py's prefill_attention decides when it runs."""
from __future__ import annotations

import contextvars
import functools

import torch
import triton
import triton.language as tl

from .attention_parts import (LOG2E, SEQ_CHUNK, _find_query_block, _grid_head, _load_head, _output_rows,
                              _softmax_step, _store_new_rows, _store_rows, context_free_spec)
from .attention_tiles import Tiles, _head_dim_pad
from .device import INTERPRETED


# num_seqs as in kernels/attention.py's _prefill_attention_kernel; tokens only bounds q's
# descriptor (a specialisation on it would only compile more variants).
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
    """kernels/attention.py's _prefill_attention_kernel for a batch with no cached context, as
    one warp-specialised loop (Triton's automatic split on sm_90: a 4-warp TMA producer feeds, through shared
    memory, two 4-warp consumer warpgroups of 64 query rows each, so K/V loads no longer wait
    in the softmax's instruction stream). Triton applies it only to a kernel whose one loop
    holds all its dots and that has no early exit, hence a second kernel: every key tile,
    diagonal ones included, goes through the same causally masked step, and a program without
    a query block runs no iterations and stores nothing. K and V come through per-sequence TMA
    descriptors, which read rows past the sequence as zeros: the next sequence's values, finite
    or not, never meet a zero weight (0 * inf is NaN). Columns past HEAD_DIM read as zeros too
    (head 80 runs padded to D_PAD)."""
    head = _grid_head()
    # the virtual block axis only: Triton leaves a loop whole that sits beside a second layout's
    # code (compile check: not warp-specialised)
    _seq, q_start, q_len, block_m = _find_query_block(cu_seqlens_ptr, num_seqs, 0, BLOCK_M, SEQ_CHUNK, False)
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


def launch(q, k, v, out, cu_seqlens_q, scale: float, tiles: Tiles, grid: tuple, key_cache, value_cache,
           slot_mapping) -> None:
    """Run the kernel on `grid` (the main kernel's); prefill_attention has checked every input
    and chosen this kernel."""
    tokens, _, head_dim = q.shape

    def run():
        _prefill_attention_ws_kernel[grid](
            q, k, v, out, cu_seqlens_q, key_cache, value_cache, slot_mapping, tokens, cu_seqlens_q.shape[0] - 1,
            scale * LOG2E, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
            HEAD_DIM=head_dim, D_PAD=_head_dim_pad(head_dim), BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
            UPCAST_DOT=INTERPRETED and q.dtype == torch.bfloat16, SEQ_CHUNK=SEQ_CHUNK,
            BLOCK_SIZE=key_cache.shape[1], WRITE_KV=slot_mapping is not None, num_warps=tiles.num_warps,
            num_stages=tiles.num_stages, maxnreg=tiles.max_registers or None)
    if q.is_cuda:
        # The kernel builds its TMA descriptors on the device, in scratch memory that Triton asks
        # its allocator for at launch. Ours is set in a copy of the context (Triton keeps the
        # allocator in a ContextVar), for this launch only: whatever allocator the process set
        # stays in force for every other kernel.
        contextvars.copy_context().run(_with_allocator, functools.partial(_descriptor_scratch, q.device), run)
    else:
        run()


def _with_allocator(allocator, run) -> None:
    triton.set_allocator(allocator)
    run()


def _descriptor_scratch(device: torch.device, size: int, alignment: int, stream) -> torch.Tensor:
    """Device memory for a launch's on-device TMA descriptors, from torch's caching allocator
    (its blocks are 512-byte aligned, past any alignment Triton asks for; CUDA-graph capture
    records it like any other allocation)."""
    return torch.empty(size, dtype=torch.int8, device=device)


def compile_spec(dtype: str, head_dim: int, tiles: Tiles, write_kv: bool):
    """The compile-check specialisation of _prefill_attention_ws_kernel at `tiles` (block size
    16 where it stores the new tokens)."""
    label = (f"ws d{head_dim} {dtype} {tiles.block_m}x{tiles.block_n} w{tiles.num_warps}s{tiles.num_stages}"
             f"{' padded' if head_dim != _head_dim_pad(head_dim) else ''}")
    return context_free_spec(_prefill_attention_ws_kernel, label, dtype, tiles, write_kv,
                             dict(tokens="i32", num_seqs="i32", qk_scale="fp32"),
                             dict(HEAD_DIM=head_dim, D_PAD=_head_dim_pad(head_dim), BLOCK_M=tiles.block_m,
                                  BLOCK_N=tiles.block_n, SEQ_CHUNK=SEQ_CHUNK),
                             uses_tma=True, uses_warp_specialize=True)

