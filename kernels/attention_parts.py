"""The pieces the Triton prefill-attention kernels share: the main kernel (kernels/attention.py),
the warp-specialised one (attention_ws.py) and the persistent one (attention_persistent.py).
Row loads and stores, the KV-cache store of new tokens, one online-softmax step, the search for
a program's query block on the virtual block axis (attention.py's docstring), and the
compile-check signature of the two kernels for batches without cached context."""
from __future__ import annotations

import triton
import triton.language as tl

from .attention_tiles import _TMA_CAPABILITY, Tiles
from .kv_cache import slot_offset, to_cache

LOG2E = 1.4426950408889634   # launchers pass scale * LOG2E: the kernels' softmax is in base 2
_INT32_MAX = tl.constexpr(2 ** 31 - 1)   # a constexpr: compiled kernels may read no other global
# cu_seqlens entries a program reads per round trip while finding its sequence (_find_query_block).
SEQ_CHUNK = 128


@triton.jit
def _head_columns(HEAD_DIM: tl.constexpr, D_LO: tl.constexpr, D_HI: tl.constexpr):
    """A head's column indices as the kernels tile it: offs_d, the first D_LO (past HEAD_DIM
    where a padded head has no D_HI part); d_ok, which of those lie inside the head; offs_h, the
    last D_HI where the head is two exact tiles (80 = 64 + 16), else offs_d again (then the
    kernels never read it as the second part)."""
    offs_d = tl.arange(0, D_LO)
    if D_HI > 0:
        offs_h = D_LO + tl.arange(0, D_HI)
    else:
        offs_h = offs_d
    return offs_d, offs_d < HEAD_DIM, offs_h


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
def _grid_head():
    """This program's head on the launchers' grid (heads of a group, query blocks, groups)."""
    return tl.program_id(2) * tl.num_programs(0) + tl.program_id(0)


@triton.jit
def _find_query_block(cu_seqlens_ptr,   # [seqs + 1] int32 offset of each sequence's new tokens
                      num_seqs, blocks_per_seq, BLOCK_M: tl.constexpr, SEQ_CHUNK: tl.constexpr,
                      UNIFORM: tl.constexpr):
    """This program's (sequence, its first token, its length, query block within it) from its
    place on the grid's second axis, in one of the two block layouts of attention.py's
    docstring; the block is < 0 or past the sequence's blocks where the program has none.
    A constexpr picks the layout: a runtime choice compiled both, and the second one's
    registers made two sm_80 tiles spill and Triton leave the warp-specialised loop whole.

    UNIFORM: blocks_per_seq programs a sequence, block-major from the last block (the blocks
    that see the most keys start first, which shortens the tail), so the sequence is the
    program's place modulo num_seqs: two loads of cu_seqlens, no search.

    Otherwise the virtual block axis (blocks_per_seq unused). Its sequence is the last s with
    cu_seqlens[s] // BLOCK_M + s <= vblock, or s = 0 (the left side grows strictly with s).
    Counted over whole chunks of cu_seqlens at once rather than by binary search: one memory
    round trip per SEQ_CHUNK sequences instead of one per halving, which a short program
    (128-token prompts in a batch of 64) would otherwise spend most of its time waiting on.
    With cu_seqlens non-decreasing, the sequence's start is the largest entry that qualifies,
    its end the smallest one past it."""
    if UNIFORM:
        place = tl.program_id(1)
        seq = place % num_seqs
        block = blocks_per_seq - 1 - place // num_seqs
        q_start = tl.load(cu_seqlens_ptr + seq)
        q_len = tl.load(cu_seqlens_ptr + seq + 1) - q_start
    else:
        # Last blocks first here too: vblock counts down the grid.
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
        q_len = q_end - q_start
        block = vblock - (q_start // BLOCK_M + seq)
    return seq, q_start, q_len, block


def context_free_spec(kernel, label: str, dtype: str, tiles: Tiles, write_kv: bool, scalars: dict,
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
