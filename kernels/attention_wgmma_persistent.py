"""Prefill attention for short prompts on Hopper (sm_90) in Gluon: one tile per sequence and
head, taken in turn by one program an SM, each item's q, k and v arriving by TMA while the item
before it computes.

Why: at 128 new tokens attention moves more bytes than it does math. On the NVIDIA H200 of
2026-11-27 SDPA ran 64 prompts of 128 tokens at opt-6.7b in 66.7 us (about 4 TB/s of q, k, v and
output), our fastest launch (attention_wgmma.py's 64x64 tiles, two programs an SM) in 83.2. There
a program finds its sequence, issues its loads and waits for them: an SM whose programs are
computing has nothing of the next tile in flight. The Triton persistent kernel
(attention_persistent.py) asked L2 for the next item's rows while it computed, and still loaded
them into registers only when it got there (114.5 us). Here each program has `BUFFERS` sets of
q, k and v slots, each with an mbarrier: item i lands in slot set i % BUFFERS, and as soon as
item i's wgmmas and cache write are done with its set, the TMA copies of item i + BUFFERS go
into it, so the next items' bytes stream while this one computes and stores its output.

An item is a (sequence, head) pair, heads fastest (item = program + i * programs), so the
programs at work at once read the same rows of a few sequences. Every sequence has at most
BLOCK new tokens, so one [BLOCK, HEAD_PAD] box each of q, k and v holds all of an item: one
QK^T, a causal softmax of one step (key 0 is visible to every query row: every row's max is
finite), one PV. The boxes start at the sequence's first token and reach into the next
sequence's rows (or past the tensor, where TMA reads zeros): those rows are computed and never
stored, and the value rows past the sequence are cleared before the PV (0 times a NaN there
would be NaN).

Scope as attention_wgmma.py's: fp16 / bf16, no cached context, rows TMA can address, the fused
KV-cache write (each item stores its sequence's keys and values for its head from the slots they
arrived in); and besides heads 64 and 128, any head up to 128 columns that starts 16-byte
aligned (OPT-2.7B's 80) in a box of HEAD_PAD columns (attention_wgmma.padded_width): the box
brings the next head's first columns along (zeros past the last head's), which are zeroed in q
and k before the QK^T and stored neither as output nor in the cache. The launcher runs it only where the host knows every prompt
fits (max_query_len <= BLOCK). Gluon does not run in the Triton interpreter: on CPU it is only
compiled. A sweep candidate (Tiles.wgmma with Tiles.persistent), never a default until a GPU has
shown it right and faster.
"""
from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

from .attention_wgmma import (_clear_rows_past, _row_layout, _softmax_tile, _store_output, _store_tile_rows,
                              _wgmma_layout, head_descriptor, padded_width, refuse_past_shared_memory, variant_specs)
from .device import sm_count

# One program an SM: two slot sets of a 128-row item at head 128 take 192 KB of the 227 KB an SM
# has for a program.
PROGRAMS_PER_SM = 1


def shared_bytes(block: int, width: int, buffers: int, itemsize: int) -> int:
    """Shared memory of a program: `buffers` sets of q, k and v slots of [block, width] and
    their mbarriers, and one more such tile for the output's conversion to whole rows."""
    return (3 * buffers + 1) * block * width * itemsize + 8 * buffers


@gluon.jit
def _bounds(cu_seqlens_ptr,   # [seqs + 1] int32 offset of each sequence's new tokens
            item, items, heads):
    """(first token, token past the last) of item `item`'s sequence (of the last item's, past
    the last: addresses inside cu_seqlens either way)."""
    seq = gl.minimum(item, items - 1) // heads
    return gl.load(cu_seqlens_ptr + seq), gl.load(cu_seqlens_ptr + seq + 1)


@gluon.jit
def _clear_columns_past(slot,   # [BLOCK, HEAD_PAD] shared-memory slot of one item's q or k
                        HEAD_DIM: gl.constexpr):
    """Zero a padded slot's columns past the head: the box brought the next head's first
    columns there (zeros past the last head's), which must not enter this head's QK^T."""
    rows_layout: gl.constexpr = _row_layout(slot.shape[1], gl.num_warps())
    values = slot.load(rows_layout)
    cols = gl.arange(0, slot.shape[1], layout=gl.SliceLayout(0, rows_layout))
    slot.store(gl.where((cols < HEAD_DIM)[None, :], values, gl.zeros_like(values)))


@gluon.jit
def _issue_item(q_desc, k_desc, v_desc, q_slots, k_slots, v_slots, ready, item, items, heads, row, row_end,
                buffer, HEAD_DIM: gl.constexpr):
    """Start the TMA copies of item `item`'s q, k and v boxes (from its sequence's first token
    `row`, its head's columns) into slot set `buffer`, all three counted on ready[buffer];
    nothing for an item past the last (`items`). A sequence without new tokens (row ==
    row_end) gets no copy, whose box could lie wholly past the tensor, only the barrier's
    arrival: its item computes on what the slots hold and stores nothing."""
    wanted = item < items
    copied = wanted & (row_end > row)
    col = (item % heads) * HEAD_DIM
    bar = ready.index(buffer)
    mbarrier.expect(bar, q_desc.block_type.nbytes + k_desc.block_type.nbytes + v_desc.block_type.nbytes,
                    pred=copied)
    tma.async_copy_global_to_shared(q_desc, [row, col], bar, q_slots.index(buffer), pred=copied)
    tma.async_copy_global_to_shared(k_desc, [row, col], bar, k_slots.index(buffer), pred=copied)
    tma.async_copy_global_to_shared(v_desc, [row, col], bar, v_slots.index(buffer), pred=copied)
    mbarrier.arrive(bar, pred=wanted & (row_end == row))


@gluon.jit(do_not_specialize=["num_seqs", "heads"])
def _prefill_wgmma_persistent_kernel(
    q_desc,           # [tokens, heads * HEAD_DIM] queries, boxes of [BLOCK, HEAD_PAD] (one head's first)
    k_desc,           # [tokens, heads * HEAD_DIM] keys, boxes of [BLOCK, HEAD_PAD]
    v_desc,           # [tokens, heads * HEAD_DIM] values, boxes of [BLOCK, HEAD_PAD]
    out_ptr,          # [tokens, heads, HEAD_DIM] output, unit stride along HEAD_DIM
    cu_seqlens_ptr,   # [seqs + 1] int32 offset of each sequence's new tokens, at most BLOCK each
    key_cache_ptr,    # WRITE_KV: [num_blocks, BLOCK_SIZE, heads, HEAD_DIM] of q's dtype, unit last stride
    value_cache_ptr,  # WRITE_KV: the same, with the key cache's strides
    slot_ptr,         # WRITE_KV: [tokens] int64 cache slot of each new token (< 0: not stored); else None
    num_seqs, heads, qk_scale, stride_ot, stride_oh, stride_cb, stride_cs, stride_ch,
    HEAD_DIM: gl.constexpr, HEAD_PAD: gl.constexpr, BLOCK: gl.constexpr, BUFFERS: gl.constexpr,
    WRITE_KV: gl.constexpr, BLOCK_SIZE: gl.constexpr,
):
    gl.static_assert(BUFFERS >= 2)   # one item's copies in flight while another computes
    gl.static_assert(HEAD_PAD >= HEAD_DIM)
    # Layouts as attention_wgmma.py's: scores [BLOCK, BLOCK], accumulator [BLOCK, HEAD_PAD].
    num_warps: gl.constexpr = gl.num_warps()
    s_layout: gl.constexpr = _wgmma_layout(BLOCK, num_warps)
    o_layout: gl.constexpr = _wgmma_layout(HEAD_PAD, num_warps)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)
    dtype: gl.constexpr = q_desc.dtype

    q_slots = gl.allocate_shared_memory(dtype, [BUFFERS, BLOCK, HEAD_PAD], q_desc.layout)
    k_slots = gl.allocate_shared_memory(k_desc.dtype, [BUFFERS, BLOCK, HEAD_PAD], k_desc.layout)
    v_slots = gl.allocate_shared_memory(v_desc.dtype, [BUFFERS, BLOCK, HEAD_PAD], v_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [BUFFERS, 1], mbarrier.MBarrierLayout())
    for b in gl.static_range(BUFFERS):
        mbarrier.init(ready.index(b), count=1)
    fence_async_shared()   # the barriers' initialisation visible to the TMA unit

    items = num_seqs * heads
    programs = gl.num_programs(0)
    first = gl.program_id(0)
    for b in gl.static_range(BUFFERS):
        item = first + b * programs
        row, row_end = _bounds(cu_seqlens_ptr, item, items, heads)
        _issue_item(q_desc, k_desc, v_desc, q_slots, k_slots, v_slots, ready, item, items, heads, row, row_end, b,
                    HEAD_DIM)

    queries = gl.arange(0, BLOCK, layout=s_rows)
    s_zero = gl.zeros([BLOCK, BLOCK], gl.float32, s_layout)
    acc_zero = gl.zeros([BLOCK, HEAD_PAD], gl.float32, o_layout)
    for i in range((items - first + programs - 1) // programs):
        item = first + i * programs
        buffer = i % BUFFERS
        head = item % heads
        q_start, q_end = _bounds(cu_seqlens_ptr, item, items, heads)
        q_len = q_end - q_start
        # read now, used after the PV: their latency passes under the wait and the wgmmas
        later = item + BUFFERS * programs
        later_row, later_end = _bounds(cu_seqlens_ptr, later, items, heads)
        q_slot = q_slots.index(buffer)
        k_slot = k_slots.index(buffer)
        v_slot = v_slots.index(buffer)

        mbarrier.wait(ready.index(buffer), (i // BUFFERS) & 1)
        if HEAD_PAD != HEAD_DIM:   # the next head's columns out of both QK^T operands
            _clear_columns_past(q_slot, HEAD_DIM)
            _clear_columns_past(k_slot, HEAD_DIM)
            # each thread's stores visible to the wgmma (async proxy), then every warp's done
            fence_async_shared()
            gl.thread_barrier()
        s_token = warpgroup_mma(q_slot, k_slot.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        if q_len < BLOCK:   # beside the QK^T, which reads no value
            _clear_rows_past(v_slot, 0, q_len, BLOCK, HEAD_PAD)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s_token, ))
        p, _, l_i, _ = _softmax_tile(s, gl.full([BLOCK], float("-inf"), gl.float32, s_rows),
                                     gl.full([BLOCK], 0.0, gl.float32, s_rows), qk_scale, 0, queries, True)
        acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v_slot, acc_zero, use_acc=False)
        if WRITE_KV:
            # the sequence's keys and values for this head, from the slots they arrived in
            _store_tile_rows(k_slot, v_slot, slot_ptr + q_start, key_cache_ptr, value_cache_ptr, 0, q_len,
                             head * stride_ch, stride_cb, stride_cs, BLOCK, HEAD_DIM, BLOCK_SIZE)
        # Every warp is done with this slot set (its wgmmas waited for, its cache-write loads
        # returned): the item BUFFERS ahead may land in it while this one's output is stored.
        gl.thread_barrier()
        _issue_item(q_desc, k_desc, v_desc, q_slots, k_slots, v_slots, ready, later, items, heads, later_row,
                    later_end, buffer, HEAD_DIM)

        # (a padded accumulator's columns past the head hold the next head's values' share)
        _store_output(out_ptr, acc, l_i, 0, q_start, q_len, head, stride_ot, stride_oh, HEAD_DIM)

    for b in gl.static_range(BUFFERS):
        mbarrier.invalidate(ready.index(b))


def compile_specs() -> list:
    """The kernel at each persistent wgmma candidate (attention_tiles.WGMMA_CANDIDATES with
    persistent) and at each wgmma entry of the launcher's persistent table
    (_PERSISTENT_TILES_SM90, by head class: 64, 80, 128), for sm_90, in
    attention_wgmma.variant_specs's variants (it has no block layouts)."""
    from .attention_tiles import _PERSISTENT_TILES_SM90, WGMMA_CANDIDATES, one_tile_per_prompt
    specs = []
    for head_dim in (64, 80, 128):
        chosen = [t for head_class, t in _PERSISTENT_TILES_SM90.items() if head_class == head_dim and t.wgmma]
        for tiles in dict.fromkeys(t for t in WGMMA_CANDIDATES.get(head_dim, []) + chosen
                                   if one_tile_per_prompt(t)):
            shape = f"{tiles.block_m}x{tiles.block_m} w{tiles.num_warps} b{tiles.num_stages}"
            width = padded_width(head_dim)
            specs += variant_specs(_prefill_wgmma_persistent_kernel, f"sweep persistent d{head_dim}", head_dim,
                                   tiles.block_m, tiles, shape,
                                   dict(HEAD_PAD=width, BLOCK=tiles.block_m, BUFFERS=tiles.num_stages),
                                   block_layouts=False, width=width, num_warps=tiles.num_warps)
    return specs


def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, cu_seqlens_q: torch.Tensor,
           qk_scale: float, block: int, num_warps: int, buffers: int, key_cache: torch.Tensor,
           value_cache: torch.Tensor, slot_mapping: torch.Tensor | None = None) -> None:
    """Run the kernel on PROGRAMS_PER_SM programs an SM (fewer where there are fewer items), as
    attention_wgmma.launch_prefill_wgmma runs its own (which calls this for persistent tiles):
    inputs checked, the kernel known to take them, every sequence known to have at most `block`
    new tokens; `buffers` slot sets of q, k and v a program (Tiles.num_stages)."""
    seqs = cu_seqlens_q.shape[0] - 1
    heads = q.shape[1]
    width = padded_width(q.shape[2])
    refuse_past_shared_memory(shared_bytes(block, width, buffers, q.element_size()), f"tiles.num_stages {buffers}",
                              "persistent Gluon kernel", q.shape[2])
    grid = (min(seqs * heads, PROGRAMS_PER_SM * sm_count(q.device)),)
    _prefill_wgmma_persistent_kernel[grid](
        head_descriptor(q, block, width), head_descriptor(k, block, width), head_descriptor(v, block, width), out,
        cu_seqlens_q,
        key_cache, value_cache, slot_mapping, seqs, heads, qk_scale, out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        HEAD_DIM=q.shape[2], HEAD_PAD=width, BLOCK=block, BUFFERS=buffers, WRITE_KV=slot_mapping is not None,
        BLOCK_SIZE=key_cache.shape[1], num_warps=num_warps)
