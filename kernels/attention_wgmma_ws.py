"""Prefill attention for Hopper (sm_90) in Gluon, warp-specialised: one TMA producer warp and two
consumer warpgroups per program, as FlashAttention-3 splits its forward kernel.

Why beside attention_wgmma.py: there a program's own warps issue their TMA copies, and Gluon puts
a CTA-wide barrier before each copy and before each wait on one, so the two warpgroups of an
8-warp program move in lockstep and neither's softmax runs beside the other's wgmmas; 4-warp
programs avoid that only by running two an SM, each loading every key and value tile itself.
Here a work item is 128 query rows of one sequence and head: each consumer warpgroup owns 64
of them and runs attention_wgmma.py's loop (the QK^T of key tile j and the PV of tile j-1 in
flight together, the softmax of tile j beside the PV) on key and value tiles that one producer
warp streams into a ring of `STAGES` shared-memory slots for both. Each slot has a ready
barrier (the copy's bytes) and an empty barrier that both consumers arrive on once their wgmmas
have read it; the producer refills a slot only after both. The consumers copy nothing and wait
on no CTA-wide barrier, so the warp scheduler interleaves the two warpgroups; and 128-key tiles
fit a consumer (64 registers of scores a thread beside the 64 of its accumulator).

Registers move to the consumers (setmaxnreg, through gl.warp_specialize): the producer warp's
warpgroup keeps _PRODUCER_REGS a thread, each consumer warpgroup gets _CONSUMER_REGS, within
the 64K registers an SM has for the program's 12 warps.

Work items are the programs of attention_wgmma.py's grid (heads of a group, query blocks,
groups) in launch order, longest blocks first. A program takes items program, program +
programs, ...: one each on a grid of one program an item, several on a persistent grid of one
program an SM (Tiles.persistent), where the producer copies the next item's query rows and first
key tiles while the consumers finish one and store its output and its keys and values, so that
an item's start need not wait on its first loads. The producer finds each item's query block
(in the virtual layout a search of cu_seqlens) and hands it to each consumer with its query
rows: (head, first token, length, first query row) in a small shared-memory slot, released by
the query barrier's arrival, so the consumers search nothing and wait on no load of their own
between items. All three count what they have used across the items: the ring's tiles (slot
g % STAGES, its (g // STAGES)-th use), the query slots' uses (each consumer's own, with a
ready and an empty barrier; an item without rows is handed over too, as length 0), the
pingpong rounds.

A consumer whose 64 rows start past its sequence's end (the last block of a sequence, with at
most 64 rows in it) gets no query copy and computes on whatever its slot holds, storing nothing:
its arrivals keep the barriers' phases, and its rows never mix with the other consumer's. With
64-key tiles consumer 0 reads one tile fewer than consumer 1 where both have rows; it releases
that tile once it has landed (a release before would count towards the slot's previous use).
The sequence's last value tile has its rows past the sequence cleared by consumer 1 (which reads
every tile) before either consumer's PV on it: 0 times another sequence's value (or NaN padding)
would otherwise be NaN. Consumer 1 arrives on a per-slot `cleared` barrier for every tile before
its PV, so consumer 0 can wait on it by the tile's ring position, as on the ready barriers.

Scope as attention_wgmma.py's: fp16 / bf16, head_dim 64 or 128, no cached context, rows TMA can
address, the fused KV-cache write (each consumer stores its own 64 new keys and values from the
slots of its last key tile, which it releases only then). Gluon does not run in the Triton
interpreter: on CPU it is only compiled. A sweep candidate (Tiles.wgmma with
Tiles.warp_specialize), never a default until a GPU has shown it right and faster.
"""
from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

from .attention_wgmma import (_clear_rows_past, _find_query_block, _softmax_tile, _store_output, _store_tile_rows,
                              _wgmma_layout, head_descriptor, refuse_past_shared_memory, variant_specs)
from .device import sm_count

# Query rows of a consumer warpgroup (one wgmma row block of 16 per warp) and of a program.
CONSUMER_ROWS = gl.constexpr(64)
BLOCK_M = gl.constexpr(2 * CONSUMER_ROWS)
NUM_WARPS = gl.constexpr(4)   # the default partition (consumer 0); the workers add 4 + 1
# setmaxnreg budgets, multiples of 8: three warpgroups x 128 threads within 65536 registers. The
# launch's cap is what 12 warps may hold at once (168 x 384 = 64512); gl.warp_specialize gives
# the default partition what the workers leave of it: 168 x 12 - 240 x 4 - 24 x 4 = 240 x 4.
_PRODUCER_REGS = gl.constexpr(24)
_CONSUMER_REGS = gl.constexpr(240)
MAX_REGISTERS = 168
# Persistent launches (Tiles.persistent): one program an SM holds 176 KB of shared memory at
# 128-key tiles and head 128, and the registers of 12 warps.
PROGRAMS_PER_SM = 1
# Shared memory the compiler adds past the q, k and v slots (barriers, the item slot, the
# epilogue's scratch): 16552 to 16632 B in every compiled candidate (compile check, sm_90).
_SCRATCH_BYTES = 16640


def shared_bytes(head_dim: int, block_n: int, stages: int, itemsize: int) -> int:
    """Shared memory of a program, to within the scratch's rounding up: both consumers' q slots of
    [CONSUMER_ROWS, head_dim], `stages` k and v slots of [block_n, head_dim], the scratch."""
    return (2 * CONSUMER_ROWS.value + 2 * stages * block_n) * head_dim * itemsize + _SCRATCH_BYTES


@gluon.jit
def _item_block(cu_seqlens_ptr,   # [seqs + 1] int32 offset of each sequence's new tokens
                item, num_seqs, blocks_per_seq, heads_per_group, places, SEQ_CHUNK: gl.constexpr,
                UNIFORM: gl.constexpr):
    """(head, its sequence's first token, the sequence's length, the block's first query row
    within it, whether the block has rows) of work item `item`. Items are the programs of the
    other Gluon kernels' grid (heads of a group, places on the block axis, groups) in their launch
    order: heads of a group fastest, then places (the longest query blocks first), then groups."""
    rest = item // heads_per_group
    head = (rest // places) * heads_per_group + item % heads_per_group
    seq, q_start, q_len, block = _find_query_block(cu_seqlens_ptr, num_seqs, blocks_per_seq, rest % places, places,
                                                   BLOCK_M, SEQ_CHUNK, UNIFORM)
    return head, q_start, q_len, block * BLOCK_M, (block >= 0) & (block * BLOCK_M < q_len)


@gluon.constexpr_function
def _item_layout(num_warps):
    """Registers of an item's four fields as they go to and from its shared-memory slot: every
    thread all four, so a lane stores or loads them as one 16-byte access."""
    return gl.BlockedLayout([4], [32], [num_warps], [0])


@gluon.jit
def _issue_query(q_desc, q_slots, q_ready, q_empty, items_slot,
                 c: gl.constexpr, taken, head, q_start, q_len, first_query, HEAD_DIM: gl.constexpr):
    """Hand consumer c the program's item `taken` (counted from 0), once it has released the
    item before's query slot: the item's (head, first token, length, first query row) into its
    slot of `items_slot` ([2, 4] int32 in shared memory), and its 64 query rows into its query
    slot, both counted on its query barrier (the arrival releases the stores). An item without
    rows (q_len 0) or a consumer whose rows all lie past the sequence gets no copy (its box
    could lie wholly past the tensor), only the barrier's arrival: its rows are never stored."""
    # a fresh mbarrier reads as having completed the phase before its first: the first wait passes
    mbarrier.wait(q_empty.index(c), (taken & 1) ^ 1)
    layout: gl.constexpr = _item_layout(gl.num_warps())
    field = gl.arange(0, 4, layout=layout)
    items_slot.index(c).store(gl.where(field == 0, head, gl.where(field == 1, q_start,
                                                                  gl.where(field == 2, q_len, first_query))))
    # every lane's store before the one lane's releasing arrival below (Triton 3.6 puts no
    # barrier before mbarrier.expect, as it does before mbarrier.arrive)
    gl.thread_barrier()
    inside = first_query + c * CONSUMER_ROWS < q_len
    mbarrier.expect(q_ready.index(c), q_desc.block_type.nbytes, pred=inside)
    tma.async_copy_global_to_shared(q_desc, [q_start + first_query + c * CONSUMER_ROWS, head * HEAD_DIM],
                                    q_ready.index(c), q_slots.index(c), pred=inside)
    mbarrier.arrive(q_ready.index(c), pred=first_query + c * CONSUMER_ROWS >= q_len)


@gluon.jit
def _take_item(items_slot, q_ready, C: gl.constexpr, taken):
    """Consumer C's item `taken` as _issue_query handed it over: (head, first token, length,
    first query row), once its query barrier says the rows have landed."""
    mbarrier.wait(q_ready.index(C), taken & 1)
    layout: gl.constexpr = _item_layout(gl.num_warps())
    fields = items_slot.index(C).load(layout)
    field = gl.arange(0, 4, layout=layout)
    return (gl.sum(gl.where(field == 0, fields, 0), axis=0), gl.sum(gl.where(field == 1, fields, 0), axis=0),
            gl.sum(gl.where(field == 2, fields, 0), axis=0), gl.sum(gl.where(field == 3, fields, 0), axis=0))


@gluon.jit
def _produce(q_desc, k_desc, v_desc, q_slots, k_slots, v_slots, q_ready, q_empty, k_ready, v_ready, k_empty, v_empty,
             items_slot, cu_seqlens_ptr,   # [seqs + 1] int32 offset of each sequence's new tokens
             num_seqs, blocks_per_seq, heads_per_group, places, items, programs, HEAD_DIM: gl.constexpr,
             BLOCK_N: gl.constexpr, STAGES: gl.constexpr, SEQ_CHUNK: gl.constexpr, UNIFORM: gl.constexpr):
    """The producer warp, over the program's items in turn: it finds each item's query block and
    hands it to both consumers with their query rows (_issue_query; an item without rows as
    one of length 0), and streams the item's key tiles and their values into the ring, tile g
    (counted across the program's items) into slot g % STAGES once both consumers have
    released tile g - STAGES."""
    tile_base = 0   # ring position of the item's first key tile
    for taken in range((items - gl.program_id(0) + programs - 1) // programs):
        item = gl.program_id(0) + taken * programs
        head, q_start, q_len, first_query, valid = _item_block(cu_seqlens_ptr, item, num_seqs, blocks_per_seq,
                                                               heads_per_group, places, SEQ_CHUNK, UNIFORM)
        if valid:
            # Consumer 0's rows, the first key tile, then consumer 1's rows: with 64-key tiles
            # consumer 1 reads one tile more than consumer 0 and frees its query slot last.
            _issue_query(q_desc, q_slots, q_ready, q_empty, items_slot, 0, taken, head, q_start, q_len, first_query,
                         HEAD_DIM)
            col = head * HEAD_DIM
            n_tiles = (gl.minimum(first_query + BLOCK_M, q_len) + BLOCK_N - 1) // BLOCK_N
            for t in range(n_tiles):
                g = tile_base + t
                slot = g % STAGES
                empty_phase = ((g // STAGES) & 1) ^ 1
                row = q_start + t * BLOCK_N
                mbarrier.wait(k_empty.index(slot), empty_phase)
                mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(k_desc, [row, col], k_ready.index(slot), k_slots.index(slot))
                mbarrier.wait(v_empty.index(slot), empty_phase)
                mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(v_desc, [row, col], v_ready.index(slot), v_slots.index(slot))
                if t == 0:
                    _issue_query(q_desc, q_slots, q_ready, q_empty, items_slot, 1, taken, head, q_start, q_len,
                                 first_query, HEAD_DIM)
            tile_base += n_tiles
        else:
            for c in gl.static_range(2):
                _issue_query(q_desc, q_slots, q_ready, q_empty, items_slot, c, taken, 0, 0, 0, 0, HEAD_DIM)


@gluon.jit
def _take_turn(turns, C: gl.constexpr, k, PINGPONG: gl.constexpr):
    """With PINGPONG, wait until consumer C may issue its k-th round of wgmmas: the consumers
    alternate, consumer 0 first (a fresh mbarrier passes its first wait)."""
    if PINGPONG:
        mbarrier.wait(turns.index(C), (k & 1) ^ (1 - C))


@gluon.jit
def _pass_turn(turns, C: gl.constexpr, PINGPONG: gl.constexpr):
    """With PINGPONG, hand the tensor cores to the other consumer once C's wgmmas are issued."""
    if PINGPONG:
        mbarrier.arrive(turns.index(1 - C))


@gluon.jit
def _ring_wait(ready, g, STAGES: gl.constexpr):
    """Wait for ring tile g's copy into its slot (the slot's (g // STAGES)-th use)."""
    mbarrier.wait(ready.index(g % STAGES), (g // STAGES) & 1)


@gluon.jit
def _release_key(k_empty, g, before_last, STAGES: gl.constexpr, WRITE_KV: gl.constexpr):
    """Release ring tile g's key slot after its QK^T; with the cache write, only a tile
    `before_last` the consumer's last: its new keys and values are stored from the last one's
    slots after its PV (the tile its 64 rows start in, 64 or 128 keys a tile), which are
    released then."""
    if WRITE_KV:
        mbarrier.arrive(k_empty.index(g % STAGES), pred=before_last)
    else:
        mbarrier.arrive(k_empty.index(g % STAGES))


@gluon.jit
def _attend(q_slot, k_slots, v_slots, q_empty, k_ready, v_ready, k_empty, v_empty, turns, cleared,
            out_ptr,           # [tokens, heads, HEAD_DIM] output, unit stride along HEAD_DIM
            slot_ptr,          # WRITE_KV: [tokens] int64 cache slot of each new token (< 0: not stored); else None
            key_cache_ptr,     # WRITE_KV: [num_blocks, BLOCK_SIZE, heads, HEAD_DIM] of q's dtype, unit last stride
            value_cache_ptr,   # WRITE_KV: the same, with the key cache's strides
            q_start, q_len, first_query, head, qk_scale, stride_ot, stride_oh, stride_cb, stride_cs, stride_ch,
            tile_base, rounds,
            C: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
            OVERLAP: gl.constexpr, PINGPONG: gl.constexpr, WRITE_KV: gl.constexpr, BLOCK_SIZE: gl.constexpr):
    """Consumer warpgroup C on one item: attention of its 64 query rows (from first_query + 64 C
    within the sequence) over the key tiles up to its last row, as attention_wgmma.py's loop,
    on ring tiles tile_base on (its query rows landed; its turns from round `rounds`).
    Each key slot is released after its QK^T, each value slot after its PV, the query slot
    after the last QK^T; with the cache write, this consumer's own (last) tile only once its
    rows are stored. Returns the ring position and round after the item's."""
    s_layout: gl.constexpr = _wgmma_layout(BLOCK_N, gl.num_warps())
    o_layout: gl.constexpr = _wgmma_layout(HEAD_DIM, gl.num_warps())
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
    dtype: gl.constexpr = q_slot.dtype

    diag_start = first_query + C * CONSUMER_ROWS
    n_unmasked = diag_start // BLOCK_N
    # rows past the sequence (all of them in a consumer that starts past it) see every key of it
    n_tiles = (gl.minimum(diag_start + CONSUMER_ROWS, q_len) + BLOCK_N - 1) // BLOCK_N
    queries = diag_start + gl.arange(0, CONSUMER_ROWS, layout=s_rows)
    m_i = gl.full([CONSUMER_ROWS], float("-inf"), gl.float32, s_rows)
    l_i = gl.full([CONSUMER_ROWS], 0.0, gl.float32, s_rows)
    s_zero = gl.zeros([CONSUMER_ROWS, BLOCK_N], gl.float32, s_layout)
    acc = gl.zeros([CONSUMER_ROWS, HEAD_DIM], gl.float32, o_layout)

    # Tile 0 alone: key 0 is visible to every query row, so every row's max is finite after it.
    _ring_wait(k_ready, tile_base, STAGES)
    _take_turn(turns, C, rounds, PINGPONG)
    s_token = warpgroup_mma(q_slot, k_slots.index(tile_base % STAGES).permute((1, 0)), s_zero, use_acc=False,
                            is_async=True)
    _pass_turn(turns, C, PINGPONG)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s_token, ))
    _release_key(k_empty, tile_base, n_tiles > 1, STAGES, WRITE_KV)
    if n_unmasked > 0:
        p, m_i, l_i, alpha = _softmax_tile(s, m_i, l_i, qk_scale, 0, queries, False)
    else:
        p, m_i, l_i, alpha = _softmax_tile(s, m_i, l_i, qk_scale, 0, queries, True)
    p = gl.convert_layout(p.to(dtype), p_layout)

    for j in range(1, n_tiles):
        g = tile_base + j
        _ring_wait(k_ready, g, STAGES)
        _ring_wait(v_ready, g - 1, STAGES)
        if C == 1:   # (only a sequence's last tile has rows to clear: this one has none)
            mbarrier.arrive(cleared.index((g - 1) % STAGES))
        _take_turn(turns, C, rounds + j, PINGPONG)
        s_token = warpgroup_mma(q_slot, k_slots.index(g % STAGES).permute((1, 0)), s_zero, use_acc=False,
                                is_async=True)
        acc_token = warpgroup_mma(p, v_slots.index((g - 1) % STAGES), acc, is_async=True)
        _pass_turn(turns, C, PINGPONG)
        # OVERLAP off (a diagnosis of the probe, never a launcher's choice) waits for both here
        s = warpgroup_mma_wait(num_outstanding=1 if OVERLAP else 0, deps=(s_token, ))
        _release_key(k_empty, g, j < n_tiles - 1, STAGES, WRITE_KV)
        if j >= n_unmasked:
            p_next, m_i, l_i, alpha = _softmax_tile(s, m_i, l_i, qk_scale, j * BLOCK_N, queries, True)
        else:
            p_next, m_i, l_i, alpha = _softmax_tile(s, m_i, l_i, qk_scale, j * BLOCK_N, queries, False)
        acc, p = warpgroup_mma_wait(num_outstanding=0, deps=(acc_token, p))
        mbarrier.arrive(v_empty.index((g - 1) % STAGES))
        acc = acc * gl.convert_layout(alpha, o_rows)[:, None]
        p = gl.convert_layout(p_next.to(dtype), p_layout)
    # every QK^T of the item is done: the next item's rows may land in the query slot
    mbarrier.arrive(q_empty.index(C))

    last = n_tiles - 1
    last_slot = (tile_base + last) % STAGES
    _ring_wait(v_ready, tile_base + last, STAGES)
    # The sequence's last value tile has its rows past the sequence cleared by consumer 1, which
    # reads every tile and arrives on each tile's `cleared` barrier before its PV on it;
    # consumer 0, where that tile is its last too, waits for the arrival. (Consumer 1's arrival
    # for the slot's next tile needs consumer 0's release of this one: no phase is skipped.)
    if C == 1:
        if (last + 1) * BLOCK_N > q_len:
            _clear_rows_past(v_slots.index(last_slot), last * BLOCK_N, q_len, BLOCK_N, HEAD_DIM)
        mbarrier.arrive(cleared.index(last_slot))
    else:
        if (last + 1) * BLOCK_N > q_len:
            _ring_wait(cleared, tile_base + last, STAGES)
    _take_turn(turns, C, rounds + n_tiles, PINGPONG)
    acc_token = warpgroup_mma(p, v_slots.index(last_slot), acc, is_async=True)
    _pass_turn(turns, C, PINGPONG)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc_token, ))
    if not WRITE_KV:
        mbarrier.arrive(v_empty.index(last_slot))

    # the output first: the cache write's registers then take the accumulator's
    _store_output(out_ptr, acc, l_i, diag_start, q_start, q_len, head, stride_ot, stride_oh, HEAD_DIM)
    if WRITE_KV:
        if diag_start < q_len:
            # this consumer's own new tokens: rows diag_start .. +64 of its last tile, still in its slot
            offset: gl.constexpr = (C * CONSUMER_ROWS) % BLOCK_N
            _store_tile_rows(k_slots.index(last_slot).slice(offset, CONSUMER_ROWS),
                             v_slots.index(last_slot).slice(offset, CONSUMER_ROWS), slot_ptr + q_start,
                             key_cache_ptr, value_cache_ptr, diag_start, q_len, head * stride_ch, stride_cb,
                             stride_cs, CONSUMER_ROWS, HEAD_DIM, BLOCK_SIZE)
        mbarrier.arrive(k_empty.index(last_slot))
        mbarrier.arrive(v_empty.index(last_slot))
    # the producer's tiles for the item: consumer 1's; consumer 0's are one fewer with 64-key
    # tiles where both consumers' rows lie inside the sequence
    item_tiles = (gl.minimum(first_query + BLOCK_M, q_len) + BLOCK_N - 1) // BLOCK_N
    # Tiles of the item this consumer does not read (consumer 1's last, with 64-key tiles) are
    # released once they have landed: arrived at before, the release would count towards the
    # slot's previous use, which the other consumer may still be reading.
    for t in range(n_tiles, item_tiles):
        _ring_wait(k_ready, tile_base + t, STAGES)
        mbarrier.arrive(k_empty.index((tile_base + t) % STAGES))
        _ring_wait(v_ready, tile_base + t, STAGES)
        mbarrier.arrive(v_empty.index((tile_base + t) % STAGES))
    return tile_base + item_tiles, rounds + n_tiles + 1


@gluon.jit
def _consume(q_slots, k_slots, v_slots, q_ready, q_empty, k_ready, v_ready, k_empty, v_empty, turns, cleared,
             items_slot,
             out_ptr,           # [tokens, heads, HEAD_DIM] output, unit stride along HEAD_DIM
             slot_ptr,          # WRITE_KV: [tokens] int64 cache slot of each new token (< 0: not stored); else None
             key_cache_ptr,     # WRITE_KV: [num_blocks, BLOCK_SIZE, heads, HEAD_DIM] of q's dtype, unit last stride
             value_cache_ptr,   # WRITE_KV: the same, with the key cache's strides
             items, programs, qk_scale, stride_ot, stride_oh, stride_cb, stride_cs, stride_ch, C: gl.constexpr,
             HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, OVERLAP: gl.constexpr,
             PINGPONG: gl.constexpr, WRITE_KV: gl.constexpr, BLOCK_SIZE: gl.constexpr):
    """Consumer warpgroup C over the program's items in turn, as the producer hands them over
    (_take_item; _attend on each with rows, its query slot released at once otherwise), its
    ring position and turns counted across them as the producer counts them. With PINGPONG
    the two consumers take turns issuing their wgmmas (round k: tile 0's QK^T, then each loop
    step's QK^T and PV, then the last PV; both run n_tiles + 1 rounds an item, as BLOCK_N ==
    BLOCK_M makes their tile counts equal), so that one's softmax runs while the other's wgmmas
    do."""
    tile_base = 0
    rounds = 0
    for taken in range((items - gl.program_id(0) + programs - 1) // programs):
        head, q_start, q_len, first_query = _take_item(items_slot, q_ready, C, taken)
        if first_query < q_len:
            tile_base, rounds = _attend(q_slots.index(C), k_slots, v_slots, q_empty, k_ready, v_ready,
                                        k_empty, v_empty, turns, cleared, out_ptr, slot_ptr, key_cache_ptr,
                                        value_cache_ptr, q_start, q_len, first_query, head, qk_scale, stride_ot,
                                        stride_oh, stride_cb, stride_cs, stride_ch, tile_base, rounds, C,
                                        HEAD_DIM, BLOCK_N, STAGES, OVERLAP, PINGPONG, WRITE_KV, BLOCK_SIZE)
        else:
            mbarrier.arrive(q_empty.index(C))


@gluon.jit(do_not_specialize=["num_seqs", "blocks_per_seq", "heads_per_group", "places", "items", "programs"])
def _prefill_wgmma_ws_kernel(
    q_desc,           # [tokens, heads * HEAD_DIM] queries, boxes of [64, HEAD_DIM] (one head)
    k_desc,           # [tokens, heads * HEAD_DIM] keys, boxes of [BLOCK_N, HEAD_DIM]
    v_desc,           # [tokens, heads * HEAD_DIM] values, boxes of [BLOCK_N, HEAD_DIM]
    out_ptr,          # [tokens, heads, HEAD_DIM] output, unit stride along HEAD_DIM
    cu_seqlens_ptr,   # [seqs + 1] int32 offset of each sequence's new tokens
    key_cache_ptr,    # WRITE_KV: [num_blocks, BLOCK_SIZE, heads, HEAD_DIM] of q's dtype, unit last stride
    value_cache_ptr,  # WRITE_KV: the same, with the key cache's strides
    slot_ptr,         # WRITE_KV: [tokens] int64 cache slot of each new token (< 0: not stored); else None
    num_seqs, blocks_per_seq, qk_scale, stride_ot, stride_oh, stride_cb, stride_cs, stride_ch,
    heads_per_group, places, items, programs,
    HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, SEQ_CHUNK: gl.constexpr,
    OVERLAP: gl.constexpr, PINGPONG: gl.constexpr, WRITE_KV: gl.constexpr, BLOCK_SIZE: gl.constexpr,
    UNIFORM: gl.constexpr,
):
    gl.static_assert(STAGES >= 2)   # the next tile lands while a consumer computes on one
    gl.static_assert((not PINGPONG) or BLOCK_N == BLOCK_M)   # turns need equal rounds
    q_slots = gl.allocate_shared_memory(q_desc.dtype, [2, CONSUMER_ROWS, HEAD_DIM], q_desc.layout)
    k_slots = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_slots = gl.allocate_shared_memory(v_desc.dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())   # PINGPONG
    # each consumer's current item, as the producer found it: (head, first token, length, first query row)
    items_slot = gl.allocate_shared_memory(gl.int32, [2, 4], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    # each ring tile's value rows past its sequence cleared (where it has any), by consumer 1
    cleared = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for c in gl.static_range(2):
        mbarrier.init(q_ready.index(c), count=1)
        mbarrier.init(q_empty.index(c), count=1)
        mbarrier.init(turns.index(c), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)   # one arrival from each consumer
        mbarrier.init(v_empty.index(i), count=2)
        mbarrier.init(cleared.index(i), count=1)
    fence_async_shared()   # the barriers' initialisation visible to the TMA unit

    if WRITE_KV:
        slots = slot_ptr
    else:   # a partition's arguments are values: any pointer stands for the unused one
        slots = out_ptr
    # (the argument tuples written out whole: a tuple built by + loses its constexprs)
    gl.warp_specialize([
        (_consume, (q_slots, k_slots, v_slots, q_ready, q_empty, k_ready, v_ready, k_empty, v_empty, turns, cleared,
                    items_slot, out_ptr, slots, key_cache_ptr, value_cache_ptr, items, programs, qk_scale, stride_ot,
                    stride_oh, stride_cb, stride_cs, stride_ch, 0, HEAD_DIM, BLOCK_N, STAGES, OVERLAP, PINGPONG,
                    WRITE_KV, BLOCK_SIZE)),
        (_consume, (q_slots, k_slots, v_slots, q_ready, q_empty, k_ready, v_ready, k_empty, v_empty, turns, cleared,
                    items_slot, out_ptr, slots, key_cache_ptr, value_cache_ptr, items, programs, qk_scale, stride_ot,
                    stride_oh, stride_cb, stride_cs, stride_ch, 1, HEAD_DIM, BLOCK_N, STAGES, OVERLAP, PINGPONG,
                    WRITE_KV, BLOCK_SIZE)),
        (_produce, (q_desc, k_desc, v_desc, q_slots, k_slots, v_slots, q_ready, q_empty, k_ready, v_ready, k_empty,
                    v_empty, items_slot, cu_seqlens_ptr, num_seqs, blocks_per_seq, heads_per_group, places, items,
                    programs, HEAD_DIM, BLOCK_N, STAGES, SEQ_CHUNK, UNIFORM)),
    ], [NUM_WARPS, 1], [_CONSUMER_REGS, _PRODUCER_REGS])

    for c in gl.static_range(2):
        mbarrier.invalidate(q_ready.index(c))
        mbarrier.invalidate(q_empty.index(c))
        mbarrier.invalidate(turns.index(c))
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(k_ready.index(i))
        mbarrier.invalidate(v_ready.index(i))
        mbarrier.invalidate(k_empty.index(i))
        mbarrier.invalidate(v_empty.index(i))
        mbarrier.invalidate(cleared.index(i))


def compile_specs() -> list:
    """The kernel at each warp-specialised wgmma candidate (attention_tiles.WGMMA_CANDIDATES with
    warp_specialize), for sm_90, in attention_wgmma.variant_specs's variants, under the launch's
    register cap."""
    from .attention_tiles import WGMMA_CANDIDATES
    specs = []
    for head_dim, candidates in sorted(WGMMA_CANDIDATES.items()):
        # (a persistent launch runs the same kernel: one spec per kernel specialisation)
        for tiles in dict.fromkeys(t._replace(persistent=False) for t in candidates if t.warp_specialize):
            shape = f"{BLOCK_M.value}x{tiles.block_n} s{tiles.num_stages}" + " pingpong" * tiles.pingpong
            specs += variant_specs(_prefill_wgmma_ws_kernel, f"sweep ws d{head_dim}", head_dim, CONSUMER_ROWS.value,
                                   tiles, shape, dict(BLOCK_N=tiles.block_n, STAGES=tiles.num_stages,
                                                      PINGPONG=tiles.pingpong),
                                   item_args=("heads_per_group", "places", "items", "programs"),
                                   num_warps=NUM_WARPS.value, max_registers=MAX_REGISTERS)
    return specs


def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, cu_seqlens_q: torch.Tensor,
           qk_scale: float, block_n: int, num_stages: int, grid: tuple, blocks_per_seq: int, seq_chunk: int,
           key_cache: torch.Tensor, value_cache: torch.Tensor, slot_mapping: torch.Tensor | None = None,
           overlap: bool = True, pingpong: bool = False, persistent: bool = False) -> None:
    """Run the kernel, as attention_wgmma.launch_prefill_wgmma runs its own (which calls this for
    warp-specialised tiles): inputs checked, the kernel known to take them, the grid (heads of
    a group, places, groups) and block layout chosen for BLOCK_M query rows a program; `overlap`
    as there; `pingpong`: the consumers take turns (Tiles.pingpong). The kernel takes that
    grid's programs as work items on a grid of its own: one program an item, or with
    `persistent` (Tiles.persistent) PROGRAMS_PER_SM programs an SM, each taking items in
    turn."""
    refuse_past_shared_memory(shared_bytes(q.shape[2], block_n, num_stages, q.element_size()),
                              f"tiles.num_stages {num_stages} at tiles.block_n {block_n}",
                              "warp-specialised Gluon kernel", q.shape[2])
    heads_per_group, places, groups = grid
    items = heads_per_group * places * groups
    programs = min(items, PROGRAMS_PER_SM * sm_count(q.device)) if persistent else items
    _prefill_wgmma_ws_kernel[(programs, )](
        head_descriptor(q, CONSUMER_ROWS.value), head_descriptor(k, block_n), head_descriptor(v, block_n), out,
        cu_seqlens_q, key_cache, value_cache, slot_mapping, cu_seqlens_q.shape[0] - 1, blocks_per_seq, qk_scale,
        out.stride(0), out.stride(1), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        heads_per_group, places, items, programs,
        HEAD_DIM=q.shape[2], BLOCK_N=block_n, STAGES=num_stages, SEQ_CHUNK=seq_chunk, OVERLAP=overlap,
        PINGPONG=pingpong, WRITE_KV=slot_mapping is not None, BLOCK_SIZE=key_cache.shape[1],
        UNIFORM=blocks_per_seq > 0, num_warps=NUM_WARPS.value, maxnreg=MAX_REGISTERS)
