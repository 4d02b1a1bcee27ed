"""Prefill attention for Hopper (sm_90) in Gluon, with the wgmma pipeline written out by hand.

Why a second kernel: Triton 3.6 compiles the main kernel (kernels/attention.py) so that each
QK^T wgmma is waited for at once, and the softmax of a key tile never overlaps a matrix multiply
of its own program. Here the order is explicit, as in FlashAttention-3's intra-warpgroup
pipelining: the QK^T of key tile j is issued, then the PV of tile j-1, and the softmax of tile j
runs while that PV is still on the tensor cores. K and V arrive by TMA into a ring of
`num_stages` shared-memory slots, each with its own mbarrier; q stays in shared memory as the
QK^T operand, P goes to the PV wgmma from registers.

Scope: fp16 / bf16, head_dim 64 or 128 (no padding: a 2-D TMA box is exactly one head), batches
with no cached context (the launcher knows it: max_context_len=0), q, k, v rows whose heads sit
back to back and that a TMA descriptor can address. The KV-cache write is fused (WRITE_KV): each
program stores its query block's own keys and values from the shared-memory slots of its
diagonal tiles, for caches of the inputs' dtype; a float8 cache is written by kernels/kv_cache.py
before the launch. Gluon does not run in the Triton interpreter, so on CPU this kernel is only
compiled (kernels/compile_check.py); it is tested against the reference on CUDA
(tests/kernels/test_attention_wgmma.py). It is a sweep candidate (Tiles.wgmma), never a default
until a GPU has shown it right and faster.
"""
from __future__ import annotations

import itertools

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .attention_tiles import _WGMMA_TILES_SM90, WGMMA_CANDIDATES, WGMMA_CAPABILITY, _fail
from .device import SHARED_LIMITS, tma_addressable

# Head sizes the kernel takes: a TMA box and a wgmma N of exactly one head, 16-byte rows.
WGMMA_HEAD_DIMS = (64, 128)
_GL_DTYPES = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}


@gluon.jit
def _find_query_block(cu_seqlens_ptr,   # [seqs + 1] int32 offset of each sequence's new tokens
                      num_seqs, blocks_per_seq, place, places, BLOCK_M: gl.constexpr, SEQ_CHUNK: gl.constexpr,
                      UNIFORM: gl.constexpr):
    """(sequence, its first token, its length, query block within it) at `place` of `places`
    on the grid's block axis (a program's program_id(1) of num_programs(1)), as
    kernels/attention_parts.py's _find_query_block (same two block layouts, same grid): the
    block is < 0 or past the sequence's blocks where the place has none."""
    if UNIFORM:   # blocks_per_seq places a sequence, block-major from the last block
        seq = place % num_seqs
        block = blocks_per_seq - 1 - place // num_seqs
        q_start = gl.load(cu_seqlens_ptr + seq)
        q_len = gl.load(cu_seqlens_ptr + seq + 1) - q_start
    else:   # the virtual block axis, searched a chunk of cu_seqlens at a time
        chunk_layout: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
        vblock = places - 1 - place   # last blocks first: they see the most keys
        seq = num_seqs * 0 - 1      # int32 scalars from the start, as the loop carries them
        q_start = num_seqs * 0
        q_end = num_seqs * 0 + 2147483647
        for s0 in range(0, num_seqs + 1, SEQ_CHUNK):
            s = s0 + gl.arange(0, SEQ_CHUNK, layout=chunk_layout)
            bounds = gl.load(cu_seqlens_ptr + s, mask=s <= num_seqs, other=2147483647)
            qualifies = (s < num_seqs) & ((bounds // BLOCK_M + s <= vblock) | (s == 0))
            seq += gl.sum(qualifies.to(gl.int32), axis=0)
            q_start = gl.maximum(q_start, gl.max(gl.where(qualifies, bounds, 0), axis=0))
            q_end = gl.minimum(q_end, gl.min(gl.where(qualifies, 2147483647, bounds), axis=0))
        q_len = q_end - q_start
        block = vblock - (q_start // BLOCK_M + seq)
    return seq, q_start, q_len, block


@gluon.constexpr_function
def _wgmma_layout(columns, num_warps):
    """Registers of a wgmma result [rows, columns] (scores, accumulator): one row block of 16
    per warp, warps stacked down the rows, so that each warpgroup owns 64 rows."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, columns, 16])


@gluon.constexpr_function
def _row_layout(head_dim, num_warps):
    """Registers for whole rows of a [rows, head_dim] tile: 8 columns (16 bytes) a thread, a
    warp across whole rows, warps stacked down the rows (the row clearing, the cache write and
    the output store each move whole rows)."""
    return gl.BlockedLayout([1, 8], [32 * 8 // head_dim, head_dim // 8], [num_warps, 1], [1, 0])


@gluon.jit
def _issue_kv_tile(k_desc, v_desc, k_slots, v_slots, k_ready, v_ready, tile, n_tiles, row0, col,
                   BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """Start the TMA copies of key tile `tile` and its values into ring slot tile % STAGES;
    nothing past the query block's last tile (n_tiles)."""
    slot = tile % STAGES
    wanted = tile < n_tiles
    row = row0 + tile * BLOCK_N
    mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes, pred=wanted)
    tma.async_copy_global_to_shared(k_desc, [row, col], k_ready.index(slot), k_slots.index(slot), pred=wanted)
    mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes, pred=wanted)
    tma.async_copy_global_to_shared(v_desc, [row, col], v_ready.index(slot), v_slots.index(slot), pred=wanted)


@gluon.jit
def _wait_kv_tile(ready, tile, STAGES: gl.constexpr):
    """Wait for tile `tile`'s copy into its slot (the slot's (tile // STAGES)-th use)."""
    mbarrier.wait(ready.index(tile % STAGES), (tile // STAGES) & 1)


@gluon.jit
def _clear_rows_past(v_slot,   # [BLOCK_N, HEAD_DIM] shared-memory slot of one value tile
                     first_key, q_len, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr):
    """Zero the rows of a value tile past its sequence. Their weights are exactly 0, but the box
    holds the next sequence's values there, and 0 times a non-finite one would leak NaN into
    this sequence. Only the tile where a sequence ends pays for it."""
    rows_layout: gl.constexpr = _row_layout(HEAD_DIM, gl.num_warps())
    values = v_slot.load(rows_layout)
    keys = first_key + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, rows_layout))
    v_slot.store(gl.where((keys < q_len)[:, None], values, gl.zeros_like(values)))
    # each thread's stores visible to the async proxy (the wgmma's reads), then every warp's done
    fence_async_shared()
    gl.thread_barrier()


@gluon.jit
def _store_tile_rows(k_slot,            # [BLOCK_N, width] shared-memory slot of one key tile (width >= HEAD_DIM)
                     v_slot,            # [BLOCK_N, width] shared-memory slot of its values
                     slot_ptr,          # [q_len] int64 cache slot of each of the sequence's new tokens
                     key_cache_ptr,     # [num_blocks, BLOCK_SIZE, heads, HEAD_DIM], unit stride along HEAD_DIM
                     value_cache_ptr,   # the same, with the key cache's strides
                     first_key, q_len, head_offset, stride_cb, stride_cs,
                     BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_SIZE: gl.constexpr):
    """Store the tile's keys and values in the caches, each row inside the sequence at its slot
    (rows past the sequence, and slots < 0, not at all), as write_kv_cache does; the caches are
    of the inputs' dtype, so the rows go as they are. Read from the shared-memory slots the
    tile already sits in: the KV-cache write costs no second read of k and v from memory. (Rows
    past the sequence may have been cleared already: they are never stored.) A slot wider than
    the head (a padded one) has its first HEAD_DIM columns stored."""
    WIDTH: gl.constexpr = k_slot.shape[1]
    rows_layout: gl.constexpr = _row_layout(WIDTH, gl.num_warps())
    keys = first_key + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, rows_layout))
    in_seq = keys < q_len
    slots = gl.load(slot_ptr + keys, mask=in_seq, other=-1)
    cols = gl.arange(0, WIDTH, layout=gl.SliceLayout(0, rows_layout))
    if WIDTH == HEAD_DIM:
        keep = (in_seq & (slots >= 0))[:, None]
    else:
        keep = (in_seq & (slots >= 0))[:, None] & (cols < HEAD_DIM)[None, :]
    # as kv_cache.slot_offset (a Gluon kernel cannot call a triton.jit function)
    rows = (slots // BLOCK_SIZE) * stride_cb + (slots % BLOCK_SIZE) * stride_cs + head_offset
    # each row starts 16-byte aligned (the launcher checks the caches' rows): 16-byte stores
    offsets = gl.multiple_of(rows, 8)[:, None] + cols[None, :]
    gl.store(key_cache_ptr + offsets, k_slot.load(rows_layout), mask=keep)
    gl.store(value_cache_ptr + offsets, v_slot.load(rows_layout), mask=keep)


@gluon.jit
def _store_output(out_ptr,   # [tokens, heads, HEAD_DIM] output, unit stride along HEAD_DIM
                  acc, l_i, first_row, q_start, q_len, head, stride_ot, stride_oh, HEAD_DIM: gl.constexpr):
    """The rows of a query block from first_row on (within its sequence): the accumulator `acc`
    ([rows, width], width >= HEAD_DIM) over the softmax sums `l_i`, as 16-byte stores of whole
    rows; rows past the sequence are not the block's to write, and a padded accumulator's
    columns past HEAD_DIM not the head's."""
    WIDTH: gl.constexpr = acc.shape[1]
    out_layout: gl.constexpr = _row_layout(WIDTH, gl.num_warps())
    l_rows = gl.convert_layout(l_i, gl.SliceLayout(1, acc.type.layout))
    out = gl.convert_layout((acc / l_rows[:, None]).to(out_ptr.dtype.element_ty), out_layout)
    rows = first_row + gl.arange(0, acc.shape[0], layout=gl.SliceLayout(1, out_layout))
    cols = gl.arange(0, WIDTH, layout=gl.SliceLayout(0, out_layout))
    ptrs = out_ptr + (q_start + rows).to(gl.int64)[:, None] * stride_ot + head * stride_oh + cols[None, :]
    if WIDTH == HEAD_DIM:
        gl.store(ptrs, out, mask=(rows < q_len)[:, None])
    else:
        gl.store(ptrs, out, mask=(rows < q_len)[:, None] & (cols < HEAD_DIM)[None, :])


@gluon.jit
def _softmax_tile(s, m_i, l_i, qk_scale, first_key, queries, MASKED: gl.constexpr):
    """Fold the scores `s` ([BLOCK_M, BLOCK_N] fp32) of one key tile into the running max and
    sum of an online softmax in base 2; returns (p, new max, new sum, alpha: how much the
    accumulator shrinks). With MASKED the causal mask applies (query row index `queries`, key
    index first_key + column)."""
    if MASKED:
        keys = first_key + gl.arange(0, s.shape[1], layout=gl.SliceLayout(0, s.type.layout))
        s = gl.where(keys[None, :] <= queries[:, None], s * qk_scale, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, axis=1))
        p = gl.exp2(s - m_new[:, None])
    else:
        m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
        p = gl.exp2(s * qk_scale - m_new[:, None])
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(p, axis=1)
    return p, m_new, l_i, alpha


@gluon.jit(do_not_specialize=["num_seqs", "blocks_per_seq"])
def _prefill_wgmma_kernel(
    q_desc,           # [tokens, heads * HEAD_DIM] queries, boxes of [BLOCK_M, HEAD_DIM] (one head)
    k_desc,           # [tokens, heads * HEAD_DIM] keys, boxes of [BLOCK_N, HEAD_DIM]
    v_desc,           # [tokens, heads * HEAD_DIM] values, boxes of [BLOCK_N, HEAD_DIM]
    out_ptr,          # [tokens, heads, HEAD_DIM] output, unit stride along HEAD_DIM
    cu_seqlens_ptr,   # [seqs + 1] int32 offset of each sequence's new tokens
    key_cache_ptr,    # WRITE_KV: [num_blocks, BLOCK_SIZE, heads, HEAD_DIM] of q's dtype, unit last stride
    value_cache_ptr,  # WRITE_KV: the same, with the key cache's strides
    slot_ptr,         # WRITE_KV: [tokens] int64 cache slot of each new token (< 0: not stored); else None
    num_seqs, blocks_per_seq, qk_scale, stride_ot, stride_oh, stride_cb, stride_cs, stride_ch,
    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    SEQ_CHUNK: gl.constexpr, OVERLAP: gl.constexpr, WRITE_KV: gl.constexpr, BLOCK_SIZE: gl.constexpr,
    UNIFORM: gl.constexpr,
):
    gl.static_assert(BLOCK_M % BLOCK_N == 0)   # the unmasked tiles end where the query block starts
    gl.static_assert(STAGES >= 2)              # a slot is refilled only after its tile's PV
    gl.static_assert(STAGES * BLOCK_N >= BLOCK_M)   # the diagonal tiles stay in their slots (WRITE_KV)
    head = gl.program_id(2) * gl.num_programs(0) + gl.program_id(0)   # (heads of a group, blocks, groups)
    seq, q_start, q_len, block_m = _find_query_block(cu_seqlens_ptr, num_seqs, blocks_per_seq, gl.program_id(1),
                                                     gl.num_programs(1), BLOCK_M, SEQ_CHUNK, UNIFORM)
    if (block_m < 0) | (block_m * BLOCK_M >= q_len):
        return

    # One wgmma row block of 16 per warp, warps stacked along the query rows: each warpgroup owns
    # 64 rows. Scores are [BLOCK_M, BLOCK_N] in s_layout, the accumulator [BLOCK_M, HEAD_DIM] in
    # o_layout; P feeds the PV wgmma from registers in p_layout.
    num_warps: gl.constexpr = gl.num_warps()
    s_layout: gl.constexpr = _wgmma_layout(BLOCK_N, num_warps)
    o_layout: gl.constexpr = _wgmma_layout(HEAD_DIM, num_warps)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)

    q_slot = gl.allocate_shared_memory(q_desc.dtype, [BLOCK_M, HEAD_DIM], q_desc.layout)
    k_slots = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_slots = gl.allocate_shared_memory(v_desc.dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_ready, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
    fence_async_shared()   # the barriers' initialisation visible to the TMA unit

    # Key tiles: [0, n_unmasked) before the query block, unmasked; then the diagonal ones up to
    # the block's last query (or the sequence's end), causally masked.
    diag_start = block_m * BLOCK_M
    n_unmasked = diag_start // BLOCK_N
    n_tiles = (gl.minimum(diag_start + BLOCK_M, q_len) + BLOCK_N - 1) // BLOCK_N
    col = head * HEAD_DIM
    mbarrier.expect(q_ready, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_start + diag_start, col], q_ready, q_slot)
    for t in gl.static_range(STAGES):
        _issue_kv_tile(k_desc, v_desc, k_slots, v_slots, k_ready, v_ready, t, n_tiles, q_start, col, BLOCK_N, STAGES)

    queries = diag_start + gl.arange(0, BLOCK_M, layout=s_rows)   # query index within the sequence
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, s_rows)
    l_i = gl.full([BLOCK_M], 0.0, gl.float32, s_rows)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)

    # Tile 0 alone: key 0 is visible to every query row, so every row's max is finite after it.
    mbarrier.wait(q_ready, 0)
    _wait_kv_tile(k_ready, 0, STAGES)
    s = warpgroup_mma(q_slot, k_slots.index(0).permute((1, 0)), s_zero, use_acc=False)
    if n_unmasked > 0:
        p, m_i, l_i, alpha = _softmax_tile(s, m_i, l_i, qk_scale, 0, queries, False)
    else:
        p, m_i, l_i, alpha = _softmax_tile(s, m_i, l_i, qk_scale, 0, queries, True)
    p = gl.convert_layout(p.to(q_desc.dtype), p_layout)

    for j in range(1, n_tiles):
        # QK^T of tile j, then PV of tile j-1, both in flight; the softmax of tile j waits only
        # for the first and runs beside the second.
        _wait_kv_tile(k_ready, j, STAGES)
        s_token = warpgroup_mma(q_slot, k_slots.index(j % STAGES).permute((1, 0)), s_zero, use_acc=False,
                                is_async=True)
        prev = j - 1
        # (no rows to clear here: only the last tile can reach past the sequence)
        _wait_kv_tile(v_ready, prev, STAGES)
        acc_token = warpgroup_mma(p, v_slots.index(prev % STAGES), acc, is_async=True)
        # OVERLAP off (a diagnosis of the probe, never a launcher's choice) waits for both here
        s = warpgroup_mma_wait(num_outstanding=1 if OVERLAP else 0, deps=(s_token, ))
        if j >= n_unmasked:
            p_next, m_i, l_i, alpha = _softmax_tile(s, m_i, l_i, qk_scale, j * BLOCK_N, queries, True)
        else:
            p_next, m_i, l_i, alpha = _softmax_tile(s, m_i, l_i, qk_scale, j * BLOCK_N, queries, False)
        acc, p = warpgroup_mma_wait(num_outstanding=0, deps=(acc_token, p))
        acc = acc * gl.convert_layout(alpha, o_rows)[:, None]
        p = gl.convert_layout(p_next.to(q_desc.dtype), p_layout)
        # tile j-1's slot is free (its QK^T and PV are done): refill it
        _issue_kv_tile(k_desc, v_desc, k_slots, v_slots, k_ready, v_ready, prev + STAGES, n_tiles, q_start, col,
                       BLOCK_N, STAGES)

    last = n_tiles - 1
    _wait_kv_tile(v_ready, last, STAGES)
    if (last + 1) * BLOCK_N > q_len:
        _clear_rows_past(v_slots.index(last % STAGES), last * BLOCK_N, q_len, BLOCK_N, HEAD_DIM)
    acc = warpgroup_mma(p, v_slots.index(last % STAGES), acc)

    if WRITE_KV:
        # The KV-cache write, fused: the diagonal tiles are this query block's own tokens, so each
        # token is stored once per head. They are the last BLOCK_M // BLOCK_N tiles at most, and
        # with at least as many slots none of them was refilled: all still sit in shared memory.
        # Stored here, after the loop, where the softmax's registers are free (inside it, the
        # 128x128 tile at head 128 spilled).
        for t in range(n_unmasked, n_tiles):
            _store_tile_rows(k_slots.index(t % STAGES), v_slots.index(t % STAGES), slot_ptr + q_start, key_cache_ptr,
                             value_cache_ptr, t * BLOCK_N, q_len, head * stride_ch, stride_cb, stride_cs, BLOCK_N,
                             HEAD_DIM, BLOCK_SIZE)

    mbarrier.invalidate(q_ready)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(k_ready.index(i))
        mbarrier.invalidate(v_ready.index(i))

    _store_output(out_ptr, acc, l_i, diag_start, q_start, q_len, head, stride_ot, stride_oh, HEAD_DIM)


def takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, padded: bool = False) -> bool:
    """Whether the kernel takes these `[tokens, heads, head_dim]` inputs as they lie: fp16 / bf16,
    a head of exactly one TMA box (WGMMA_HEAD_DIMS; with `padded`, for the persistent form, any
    head up to 128 columns that starts 16-byte aligned, in a box of padded_width), and rows
    whose heads sit back to back and that a TMA descriptor can address as [tokens, heads *
    head_dim] (the device is the caller's to check)."""
    head_dim = q.shape[2]
    fits = head_dim in WGMMA_HEAD_DIMS or (padded and head_dim <= max(WGMMA_HEAD_DIMS) and head_dim % 8 == 0)
    return (q.dtype in _GL_DTYPES and fits
            and all(t.stride(1) == head_dim and tma_addressable(t) for t in (q, k, v)))


def refuse_past_shared_memory(needed: int, tiles: str, kernel: str, head_dim: int) -> None:
    """A ValueError naming the `tiles` fields that give `kernel` `needed` bytes of shared memory,
    where that is more than one program may have on sm_90 (a launch would fail deep in Triton)."""
    limit = SHARED_LIMITS[WGMMA_CAPABILITY]
    if needed > limit:
        _fail(f"{tiles} gives the {kernel} {needed // 1024} KB of shared memory at head_dim {head_dim}, past the "
              f"{limit // 1024} KB of an SM")


def padded_width(head_dim: int) -> int:
    """Columns of the box and tile a head takes: the smallest of WGMMA_HEAD_DIMS that holds it
    (OPT-2.7B's 80 in 128)."""
    return min(width for width in WGMMA_HEAD_DIMS if width >= head_dim)


def shared_layout(block: list, dtype: torch.dtype) -> gl.NVMMASharedLayout:
    """The swizzled shared-memory layout of a [rows, head_dim] TMA box of `dtype`."""
    return gl.NVMMASharedLayout.get_default_for(block, _GL_DTYPES[dtype])


def head_descriptor(t: torch.Tensor, rows: int, width: int | None = None) -> TensorDescriptor:
    """`t` ([tokens, heads, head_dim], heads back to back in a row) as [tokens, heads * head_dim]
    in boxes of `rows` tokens of one head; TMA reads zeros past the last token. A `width` past
    head_dim takes the next head's first columns too (zeros past the last head's)."""
    tokens, heads, head_dim = t.shape
    block = [rows, width or head_dim]
    return TensorDescriptor(t, [tokens, heads * head_dim], [t.stride(0), 1], block, shared_layout(block, t.dtype))


def compile_specs() -> list:
    """The kernel at each of the sweep's candidates (attention_tiles.WGMMA_CANDIDATES) and of
    the launcher's table (_WGMMA_TILES_SM90), for sm_90, in fp16 and bf16, at head_dim 64 and
    128 (OPT-1.3B; 6.7B and 13B), with the fused KV-cache write (the engine's launches; block
    size 16) and without (the sweep's and the benchmarks'), in each block layout."""
    specs = []
    for head_dim in WGMMA_HEAD_DIMS:
        chosen = [t for (_, table_head), t in _WGMMA_TILES_SM90.items() if table_head == head_dim]
        # (warp-specialised and persistent tiles run kernels of their own, which list their own)
        for tiles in dict.fromkeys(t for t in WGMMA_CANDIDATES[head_dim] + chosen
                                   if not (t.warp_specialize or t.persistent)):
            specs += variant_specs(_prefill_wgmma_kernel, f"sweep d{head_dim}", head_dim, tiles.block_m, tiles,
                                   f"{tiles.block_m}x{tiles.block_n} w{tiles.num_warps}s{tiles.num_stages}",
                                   dict(BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, STAGES=tiles.num_stages),
                                   num_warps=tiles.num_warps)
    return specs


def variant_specs(kernel, prefix: str, head_dim: int, q_rows: int, tiles, shape: str, constexprs: dict,
                  block_layouts: bool = True, width: int | None = None, item_args: tuple = (), **options) -> list:
    """Compile-check specialisations (sm_90) of a Gluon prefill kernel with this module's kernel
    arguments: in fp16 and bf16, with the fused KV-cache write (block size 16) and without, in
    each block layout; q in boxes of `q_rows` rows, k and v of tiles.block_n; `constexprs` and
    `options` (CompileSpec fields) the kernel's own, labelled "`prefix` <dtype> `shape`...".
    Without `block_layouts`, a kernel that finds its work by (sequence, head) items instead
    (attention_wgmma_persistent.py): `heads` in place of blocks_per_seq, and no SEQ_CHUNK,
    OVERLAP or UNIFORM. `width`: the boxes' columns where they are wider than the head (a padded
    head). `item_args`: int32 arguments of the kernel's own after the strides
    (attention_wgmma_ws.py's description of its work items)."""
    from .attention_parts import SEQ_CHUNK   # the main kernel's chunk, which the launcher passes
    from .compile_check import CompileSpec
    specs = []
    for (dtype, name), write_kv, uniform in itertools.product(
            ((torch.float16, "fp16"), (torch.bfloat16, "bf16")), (True, False),
            (False, True) if block_layouts else (False,)):
        signature = {f"{operand}_desc": f"tensordesc<{name}[{rows},{width or head_dim}],"
                                        f"{shared_layout([rows, width or head_dim], dtype)!r}>"
                     for operand, rows in (("q", q_rows), ("k", tiles.block_n), ("v", tiles.block_n))}
        signature.update(out_ptr=f"*{name}", cu_seqlens_ptr="*i32", key_cache_ptr=f"*{name}",
                         value_cache_ptr=f"*{name}", slot_ptr="*i64" if write_kv else "constexpr",
                         num_seqs="i32", **{"blocks_per_seq" if block_layouts else "heads": "i32"}, qk_scale="fp32")
        signature.update(dict.fromkeys(("stride_ot", "stride_oh", "stride_cb", "stride_cs", "stride_ch"), "i32"))
        signature.update(dict.fromkeys(item_args, "i32"))
        values = dict(HEAD_DIM=head_dim, **constexprs, WRITE_KV=write_kv, BLOCK_SIZE=16)
        if block_layouts:
            values.update(SEQ_CHUNK=SEQ_CHUNK, OVERLAP=True, UNIFORM=uniform)
        signature.update(dict.fromkeys(values, "constexpr"))
        if not write_kv:
            values["slot_ptr"] = None
        label = f"{prefix} {name} {shape}{'' if write_kv else ' no-write'}{' uniform' if uniform else ''}"
        # row strides of the output and of the caches are multiples of 16 elements at OPT's heads
        specs.append(CompileSpec(kernel, label, signature, values, uses_mma=True, uses_tma=True,
                                 num_stages=tiles.num_stages, targets=(WGMMA_CAPABILITY,),
                                 divisible_by_16=("stride_ot", "stride_oh", "stride_cb", "stride_cs", "stride_ch"),
                                 **options))
    return specs


def launch_prefill_wgmma(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                         cu_seqlens_q: torch.Tensor, qk_scale: float, block_m: int, block_n: int, num_warps: int,
                         num_stages: int, grid: tuple, blocks_per_seq: int, seq_chunk: int,
                         key_cache: torch.Tensor, value_cache: torch.Tensor, slot_mapping: torch.Tensor | None = None,
                         overlap: bool = True, warp_specialize: bool = False, pingpong: bool = False,
                         persistent: bool = False) -> None:
    """Run the kernel; the caller (kernels/attention.py's prefill_attention) has checked every
    input, that the kernel takes them (`takes`) and that the device runs it, and chosen the grid
    and its block layout (blocks_per_seq, as kernels/attention_parts.py's _find_query_block
    reads it). With slot_mapping the kernel also stores k and v in the caches, which must then
    be of q's dtype (the caller writes a float8 cache itself). `overlap=False` waits for each
    PV before the softmax after it (benchmarks/wgmma_probe.py's diagnosis: right without the
    overlap, wrong with it, puts a fault in the overlap). `warp_specialize` runs the
    warp-specialised form (kernels/attention_wgmma_ws.py; block_m 128, num_warps 4) instead,
    its consumers taking turns with `pingpong`. `persistent` runs the short-prompt form
    (kernels/attention_wgmma_persistent.py; block_m == block_n, num_stages slot sets, every
    sequence known to fit one block) on a grid of its own: `grid` and `blocks_per_seq` unused,
    and no overlap to turn off; with warp_specialize, the warp-specialised form on one program
    an SM, each taking the grid's query blocks in turn."""
    if persistent and not warp_specialize:
        # imported here, as attention_wgmma_ws below: that module builds on this one's pieces
        from . import attention_wgmma_persistent
        attention_wgmma_persistent.launch(q, k, v, out, cu_seqlens_q, qk_scale, block_m, num_warps, num_stages,
                                          key_cache, value_cache, slot_mapping)
        return
    if warp_specialize:
        # imported here: that module builds on this one's pieces
        from . import attention_wgmma_ws
        attention_wgmma_ws.launch(q, k, v, out, cu_seqlens_q, qk_scale, block_n, num_stages, grid, blocks_per_seq,
                                  seq_chunk, key_cache, value_cache, slot_mapping, overlap, pingpong, persistent)
        return
    _prefill_wgmma_kernel[grid](
        head_descriptor(q, block_m), head_descriptor(k, block_n), head_descriptor(v, block_n), out, cu_seqlens_q,
        key_cache, value_cache, slot_mapping, cu_seqlens_q.shape[0] - 1, blocks_per_seq, qk_scale, out.stride(0),
        out.stride(1), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        HEAD_DIM=q.shape[2], BLOCK_M=block_m, BLOCK_N=block_n, STAGES=num_stages, SEQ_CHUNK=seq_chunk,
        OVERLAP=overlap, WRITE_KV=slot_mapping is not None, BLOCK_SIZE=key_cache.shape[1],
        UNIFORM=blocks_per_seq > 0, num_warps=num_warps)
