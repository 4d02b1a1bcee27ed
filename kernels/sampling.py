"""Sampling from a batch of logits: the fused Triton sampler, its launcher, and the torch reference.

Per sequence: repetition penalty (HF/CTRL semantics) -> temperature (0 = greedy) -> top-k ->
top-p -> a draw keyed by (seed, step). A scaled logit stays finite where the raw one is (clamped
to float32's range), so no penalty or temperature makes the draw NaN or lets a banned id (-inf)
back in. The random numbers are Triton's Philox (`tl.rand(seed, offset)`), reproduced here bit
for bit, so the fused kernel can match this reference exactly and a seed gives the same tokens
whatever else is in the batch.

The kernel (`sample`) is one launch for the batch, one program per row, with no sort and no host
sync. Thresholds are searched for, never sorted out: each float maps to an int32 key with the same
order, and every search runs over those keys, so it ends on an element's exact value (DESIGN §5).
- Penalty: the row's seen ids go into a bitmap (atomic or), so every later pass over the row
  re-derives the penalised, temperature-scaled logit of any id from the raw one in registers.
- Pass 1 over the row: logsumexp of the raw logits, max / argmax / min of the scaled ones, and the
  top-k radix select's first 8-bit digit histogram. Greedy rows stop here.
- Top-k: radix select (8-bit digit histograms) until the k-th largest key's bucket leaves at most
  CAND candidates; those are compacted into a per-row scratch and everything after that (the
  exact k-th key, top-p, the Gumbel-max draw) works on that one register tile. Rows with more
  candidates (top-k off over a large vocabulary, or k near CAND and above) finish the radix
  select, search the top-p threshold with NT keys per pass over the row, and draw in a last pass.
  For top_k 50 over OPT's vocabulary that is three passes over the row in all.
- Top-p: the threshold is the smallest key t >= k-th whose mass strictly above it is < top_p * Z,
  i.e. one past the largest key whose mass above is still >= top_p * Z: HF's rule in value form.
- Draw: Gumbel-max, argmax over kept ids of x - log(-log(u)), u = tl.rand(seed, (step *
  padded_vocab + id) mod 2**32), the reference's stream, first id on ties like torch.argmax.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch_math import cdiv

_MASK32 = 0xFFFFFFFF
# The reference's clamp and the kernel's (a constexpr: compiled kernels may read no other global)
FLOAT32_MAX = tl.constexpr(torch.finfo(torch.float32).max)
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_UNIFORM_SCALE = 4.6566127342e-10  # Triton's: the largest scale with MAX_INT32 * scale < 1.0


def _mul_hi_lo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of a * b for a in [0, 2**32) (int64) and a 32-bit constant b.

    Split a into 16-bit halves so no int64 product overflows.
    """
    low_part = (a & 0xFFFF) * b
    high_part = (a >> 16) * b
    total = low_part + ((high_part & 0xFFFF) << 16)
    return ((high_part >> 16) + (total >> 32)) & _MASK32, total & _MASK32


def philox_uniform(seeds: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Uniform floats in [0, 1), equal to Triton's `tl.rand(seed, offset)` (Philox 4x32-10).

    seeds: `[rows]` int64 (one key per row); offsets: `[rows, cols]` int64 in [0, 2**32).
    """
    k0 = (seeds & _MASK32)[:, None].expand_as(offsets)
    k1 = ((seeds >> 32) & _MASK32)[:, None].expand_as(offsets)
    c0, c1 = offsets & _MASK32, torch.zeros_like(offsets)
    c2, c3 = torch.zeros_like(offsets), torch.zeros_like(offsets)
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(c2, _PHILOX_ROUND_B)
        hi_a, lo_a = _mul_hi_lo(c0, _PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    signed = torch.where(c0 >= 2**31, c0 - 2**32, c0)   # the int32 bitcast
    signed = torch.where(signed < 0, -signed - 1, signed)
    return signed.to(torch.float32) * _UNIFORM_SCALE


def apply_repetition_penalty_ref(logits: torch.Tensor, seen_ids: torch.Tensor,
                                 penalty: torch.Tensor) -> torch.Tensor:
    """CTRL penalty over every distinct id a sequence has seen: logit < 0 times, else divided by.

    logits: `[seqs, vocab]` float32; seen_ids: `[seqs, max_seen]` int64, -1 = padding;
    penalty: `[seqs]` float32. Returns a new tensor.
    """
    seqs, vocab = logits.shape
    seen = torch.zeros(seqs, vocab + 1, dtype=torch.bool, device=logits.device)
    seen.scatter_(1, torch.where(seen_ids < 0, vocab, seen_ids), True)
    seen = seen[:, :vocab]
    p = penalty[:, None]
    return torch.where(seen, torch.where(logits < 0, logits * p, logits / p), logits)


def _finite_where_raw_is(raw: torch.Tensor, scaled: torch.Tensor) -> torch.Tensor:
    """The penalised, temperature-scaled logits `scaled`, -inf where the raw logit is (a banned or
    padding id stays out), else clamped to float32's finite range. A penalty far below 1 divides
    a large logit past it (ids at +inf make the softmax NaN, inf - inf), one far above 1
    multiplies a negative logit past it (seen ids at -inf, as if banned: where every id allowed is
    seen, the argmax would take a banned one). They tie at the largest or lowest float instead."""
    return torch.where(raw == float("-inf"), raw, scaled.clamp(-FLOAT32_MAX.value, FLOAT32_MAX.value))


def top_k_top_p_filter_ref(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf every logit below the row's top-k threshold, then below its top-p threshold.

    logits: `[seqs, vocab]` float32 (already temperature-scaled); top_k: `[seqs]` int64 (<= 0 off);
    top_p: `[seqs]` float32 in (0, 1]. A token is kept by top-p when the probability mass of the
    tokens ranked above it is < top_p (HF's rule: the smallest set reaching top_p, at least one).
    Thresholds are values, so ties at a threshold are all kept.
    """
    vocab = logits.shape[1]
    ranked, _ = logits.sort(dim=-1, descending=True)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
    kth = ranked.gather(1, (k - 1)[:, None])
    ranked = ranked.masked_fill(ranked < kth, float("-inf"))
    probs = torch.softmax(ranked, dim=-1)
    mass_above = torch.cumsum(probs, dim=-1) - probs
    num_kept = (mass_above < top_p[:, None]).sum(dim=-1).clamp(min=1)
    # top_p = 1 is off: float32 cumsums reach 1.0 before the tail ends and would cut it.
    num_kept = torch.where(top_p >= 1.0, vocab, num_kept)
    threshold = torch.maximum(kth, ranked.gather(1, (num_kept - 1)[:, None]))
    return logits.masked_fill(logits < threshold, float("-inf"))


def sample_ref(logits: torch.Tensor, vocab_size: int, temperature: torch.Tensor, top_k: torch.Tensor,
               top_p: torch.Tensor, repetition_penalty: torch.Tensor, seen_ids: torch.Tensor,
               seeds: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the next token of every sequence.

    logits: `[seqs, padded_vocab]` (any float dtype); ids >= vocab_size are never drawn.
    temperature, top_p, repetition_penalty: `[seqs]` float32; top_k: `[seqs]` int64;
    seen_ids: `[seqs, max_seen]` int64 ids of prompt + output, -1 padding (may have 0 columns when
    no row has a penalty); seeds, steps: `[seqs]` int64, the draw of row i uses Philox key seeds[i]
    at offsets steps[i] * padded_vocab + id.
    Returns (tokens `[seqs]` int64, logsumexp `[seqs]` float32 of the raw logits over the
    tokenizer's vocabulary, so that a token's raw logprob is `logits[id] - logsumexp`).
    """
    seqs, padded_vocab = logits.shape
    raw = logits.float()[:, :vocab_size]
    logsumexp = torch.logsumexp(raw, dim=-1)
    logits = apply_repetition_penalty_ref(raw, seen_ids, repetition_penalty) if seen_ids.shape[1] else raw
    greedy = _finite_where_raw_is(raw, logits).argmax(dim=-1)
    if not bool((temperature > 0).any()):   # all greedy: skip the filters and the random draw
        return greedy, logsumexp
    scaled = _finite_where_raw_is(raw, logits / torch.where(temperature > 0, temperature, 1.0)[:, None])
    filtered = top_k_top_p_filter_ref(scaled, top_k, top_p)
    ids = torch.arange(vocab_size, device=logits.device)
    offsets = (steps[:, None] * padded_vocab + ids[None, :]) & _MASK32
    uniform = philox_uniform(seeds, offsets)
    gumbel = -torch.log(-torch.log(uniform))    # Gumbel-max: argmax(logit + g) ~ softmax(logit)
    sampled = (filtered + gumbel).argmax(dim=-1)
    return torch.where(temperature > 0, sampled, greedy), logsumexp


# --------------------------------------------------------------------------------------------
# the fused Triton sampler
# --------------------------------------------------------------------------------------------

_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_BLOCK, _NUM_WARPS = 2048, 16  # ids per chunk of a pass: 4 per thread (one 8-byte fp16 load)
_SEEN_BLOCK = 256              # seen ids per chunk of the bitmap pass
_CAND = 512                    # register tile of top-k candidates (covers top_k up to ~500)
_NT = 16                       # thresholds tried per search step: 17-way, ~4 bits of key per step


@triton.jit
def _float_key(x):
    """int32 with the same order as the float32 x; -0.0 and +0.0 compare equal, so share key 0."""
    bits = tl.where(x == 0.0, 0, x.to(tl.int32, bitcast=True))
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _key_float(key):
    """The float32 whose _float_key is key (the map is its own inverse on the bits)."""
    key = key.to(tl.int32)
    return (key ^ ((key >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _scaled_logits(row_ptr,         # [padded_vocab] this row's logits
                   bitmap_row_ptr,  # [n_words] int32: bit id % 32 of word id // 32 set when seen
                   idx, vocab, padded_vocab, penalty, temperature, seen_limit):
    """Raw logits at `idx` (-inf past the vocabulary) and the penalised, temperature-scaled ones.

    Division is IEEE (div_rn) because the reference divides in float32 and the draw must match
    it bit for bit; approximate division would move near-ties. The bitmap is read below
    `seen_limit` only (0 when the row has no penalty).
    """
    valid = idx < vocab
    # masked at the padded width (a multiple of 16 for OPT), so the loads vectorise; the padding
    # ids are read but never used
    raw = tl.load(row_ptr + idx, mask=idx < padded_vocab, other=float("-inf")).to(tl.float32)
    raw = tl.where(valid, raw, float("-inf"))
    # .cg: the bitmap was written with atomics in this launch, read it from L2, not a stale L1 line
    word = tl.load(bitmap_row_ptr + (idx >> 5), mask=idx < seen_limit, other=0, cache_modifier=".cg")
    seen = ((word >> (idx & 31)) & 1) != 0
    penalised = tl.where(raw < 0, raw * penalty, tl.math.div_rn(raw, penalty))
    x = tl.math.div_rn(tl.where(seen, penalised, raw), temperature)
    # as the reference's _finite_where_raw_is: banned and padding ids stay -inf, the others finite
    x = tl.where(raw == float("-inf"), raw, tl.minimum(tl.maximum(x, -FLOAT32_MAX), FLOAT32_MAX))
    return raw, x, valid


@triton.jit
def _pick_digit(hist, rank):
    """Radix-select step: from the 256-bin digit histogram of the current bucket, the digit whose
    sub-bucket holds the bucket's rank-th largest key, how many keys lie in higher digits, and how
    many in that digit."""
    digits = tl.arange(0, 256)
    at_or_above = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist      # keys with digit >= d
    digit = tl.sum((at_or_above >= rank).to(tl.int32), 0) - 1      # at_or_above never increases
    above = tl.sum(tl.where(digits > digit, hist, 0), 0)
    here = tl.sum(tl.where(digits == digit, hist, 0), 0)
    return digit, above, here


@triton.jit
def _last_at_least(keys, weights, target, lo, hi, NT: tl.constexpr):
    """Largest s in [lo, hi] with sum(weights[keys > s]) >= target, given that lo qualifies.

    The sum only falls as s grows, so an (NT+1)-way search over the integer keys narrows [lo, hi]
    by NT+1 per step and ends on an exact key, never between two elements' values.
    keys: `[C]` int32, weights: `[C]` fp32 (0 for elements outside the search).
    """
    lo = lo.to(tl.int64)
    hi = hi.to(tl.int64)
    j = tl.arange(0, NT).to(tl.int64) + 1
    while lo < hi:
        span = hi - lo
        t = lo + (span * j + NT) // (NT + 1)      # NT increasing thresholds in (lo, hi]
        above = tl.sum(tl.where(keys[:, None] > t[None, :], weights[:, None], 0.0), axis=0)
        # a sum of non-negative floats cannot grow when terms drop out, even rounded: the
        # thresholds that qualify are a prefix, and its length fixes the new bracket
        n_ok = tl.sum((above >= target).to(tl.int64), axis=0)
        hi = tl.where(n_ok < NT, lo + (span * (n_ok + 1) + NT) // (NT + 1) - 1, hi)
        lo = lo + (span * n_ok + NT) // (NT + 1)
    return lo


@triton.jit
def _gumbel_score(x, ids, seed, step, padded_vocab):
    """x - log(-log(u)) with u = tl.rand(seed, step * padded_vocab + id), the offset taken mod
    2**32 (uint32) exactly like the reference's Philox stream."""
    u = tl.rand(seed, (step * padded_vocab + ids.to(tl.int64)).to(tl.uint32))
    return x - tl.log(-tl.log(u))


@triton.jit
def _sample_kernel(
    logits_ptr,       # [seqs, padded_vocab] fp16 / bf16 / fp32, rows stride_logits apart, ids contiguous
    temperature_ptr,  # [seqs] fp32, <= 0: greedy
    top_k_ptr,        # [seqs] int64, <= 0 or >= vocab: off
    top_p_ptr,        # [seqs] fp32, >= 1: off
    penalty_ptr,      # [seqs] fp32, repetition penalty (1: off)
    seen_ptr,         # [seqs, max_seen] int64, rows stride_seen apart, -1 padding
    seeds_ptr,        # [seqs] int64, Philox key
    steps_ptr,        # [seqs] int64, the draw's offset is steps * padded_vocab + id
    bitmap_ptr,       # [seqs, n_words] int32 scratch: bit id % 32 of word id // 32 set when seen
    cand_x_ptr,       # [seqs, CAND] fp32 scratch: scaled logits of the compacted candidates
    cand_id_ptr,      # [seqs, CAND] int32 scratch: their ids
    tokens_ptr,       # [seqs] int64 out
    lse_ptr,          # [seqs] fp32 out: logsumexp of the raw logits over [:vocab]
    threshold_ptr,    # [seqs] fp32 out: the smallest kept scaled logit (the kept set, for tests)
    vocab, padded_vocab, n_words, max_seen, stride_logits, stride_seen,
    BLOCK: tl.constexpr, SEEN_BLOCK: tl.constexpr, CAND: tl.constexpr, NT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_logits
    bitmap_row_ptr = bitmap_ptr + row * n_words
    temperature = tl.load(temperature_ptr + row)
    top_k = tl.load(top_k_ptr + row)
    top_p = tl.load(top_p_ptr + row)
    penalty = tl.load(penalty_ptr + row)
    drawn = temperature > 0          # else greedy
    topk_on = (top_k > 0) & (top_k < vocab)   # k >= vocab keeps everything, as in the reference
    # greedy rows take the argmax of the penalised logits: scaling by 1 leaves them bit-identical
    temperature = tl.where(drawn, temperature, 1.0)
    # a penalty of 1 multiplies / divides by 1 exactly: skipping it changes nothing
    use_penalty = (penalty != 1.0) & (max_seen > 0)
    # scalar masks as index limits (a scalar bool & a block trips the interpreter)
    seen_limit = tl.where(use_penalty, vocab, 0)
    hist_limit = tl.where(topk_on & drawn, vocab, 0)
    offs = tl.arange(0, BLOCK)

    if use_penalty:
        # duplicates only set a bit twice, so each id is penalised once, from its raw value
        for start in range(0, n_words, BLOCK):
            tl.store(bitmap_row_ptr + start + offs, 0, mask=start + offs < n_words)
        tl.debug_barrier()   # zeros before any thread's atomics
        seen_row_ptr = seen_ptr + row * stride_seen
        for start in range(0, max_seen, SEEN_BLOCK):
            j = start + tl.arange(0, SEEN_BLOCK)
            ids = tl.load(seen_row_ptr + j, mask=j < max_seen, other=-1)
            ok = (ids >= 0) & (ids < vocab)
            ids = tl.where(ok, ids, 0).to(tl.int32)
            tl.atomic_or(bitmap_row_ptr + (ids >> 5), 1 << (ids & 31), mask=ok)
        tl.debug_barrier()   # the whole bitmap before any thread reads it

    # pass 1: logsumexp of the raw row (per-lane online), max / first argmax / min of the scaled
    # row, and the radix select's top digit histogram
    m_lane = tl.full([BLOCK], float("-inf"), tl.float32)
    s_lane = tl.full([BLOCK], 0.0, tl.float32)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_id = tl.full([BLOCK], 0, tl.int32)
    lowest = tl.full([BLOCK], float("inf"), tl.float32)
    hist = tl.full([256], 0, tl.int32)
    for start in range(0, vocab, BLOCK):
        idx = start + offs
        raw, x, valid = _scaled_logits(row_ptr, bitmap_row_ptr, idx, vocab, padded_vocab, penalty,
                                       temperature, seen_limit)
        new_m = tl.maximum(m_lane, raw)
        safe_m = tl.where(new_m == float("-inf"), 0.0, new_m)     # no -inf - -inf
        s_lane = s_lane * tl.exp(m_lane - safe_m) + tl.exp(raw - safe_m)
        m_lane = new_m
        better = x > best            # strict: a lane keeps its first (lowest) id among equals
        best = tl.where(better, x, best)
        best_id = tl.where(better, idx, best_id)
        lowest = tl.minimum(lowest, tl.where(valid, x, float("inf")))
        digit = ((_float_key(x).to(tl.int64) + 2147483648) >> 24).to(tl.int32)
        hist += tl.histogram(digit, 256, mask=idx < hist_limit)
    m_raw = tl.max(m_lane, 0)
    safe_m = tl.where(m_raw == float("-inf"), 0.0, m_raw)
    tl.store(lse_ptr + row, safe_m + tl.log(tl.sum(s_lane * tl.exp(m_lane - safe_m), 0)))
    x_max = tl.max(best, 0)
    token = tl.min(tl.where(best == x_max, best_id, vocab), 0)
    kept_from = x_max

    if drawn:
        seed = tl.load(seeds_ptr + row)
        step = tl.load(steps_ptr + row)
        max_key = _float_key(x_max)
        # top-k: radix select on key + 2**31 (unsigned order), 8 bits at a time, until the bucket
        # holding the k-th largest key plus everything above it fits the candidate tile
        lower = _float_key(tl.min(lowest, 0)).to(tl.int64)   # lowest key a kept id can have
        n_cand = vocab
        shift = 24
        if topk_on:
            k = top_k.to(tl.int32)
            digit, above, here = _pick_digit(hist, k)
            prefix = digit.to(tl.int64)
            rank = k - above
            n_above = above
            n_cand = n_above + here
            while (n_cand > CAND) & (shift > 0):
                shift -= 8
                hist = tl.full([256], 0, tl.int32)
                for start in range(0, vocab, BLOCK):
                    idx = start + offs
                    raw, x, valid = _scaled_logits(row_ptr, bitmap_row_ptr, idx, vocab, padded_vocab, penalty,
                                                   temperature, seen_limit)
                    ukey = _float_key(x).to(tl.int64) + 2147483648
                    in_bucket = valid & ((ukey >> (shift + 8)) == prefix)
                    hist += tl.histogram(((ukey >> shift) & 255).to(tl.int32), 256, mask=in_bucket)
                digit, above, here = _pick_digit(hist, rank)
                prefix = prefix * 256 + digit
                rank -= above
                n_above += above
                n_cand = n_above + here
            # the bucket's lowest key; exactly the k-th largest key once all 32 bits are read
            lower = (prefix << shift) - 2147483648

        if (topk_on | (top_p < 1.0)) & (n_cand <= CAND):
            # compact the candidates (ids with key >= lower, at most CAND), then finish in registers
            cand_x_row = cand_x_ptr + row * CAND
            cand_id_row = cand_id_ptr + row * CAND
            base = 0
            for start in range(0, vocab, BLOCK):
                idx = start + offs
                raw, x, valid = _scaled_logits(row_ptr, bitmap_row_ptr, idx, vocab, padded_vocab, penalty,
                                               temperature, seen_limit)
                take = valid & (_float_key(x) >= lower)
                slot = base + tl.cumsum(take.to(tl.int32), 0) - 1
                tl.store(cand_x_row + slot, x, mask=take)
                tl.store(cand_id_row + slot, idx, mask=take)
                base += tl.sum(take.to(tl.int32), 0)
            tl.debug_barrier()   # every thread's candidates before any thread reads the tile
            c = tl.arange(0, CAND)
            in_tile = c < n_cand
            cx = tl.load(cand_x_row + c, mask=in_tile, other=float("-inf"), cache_modifier=".cg")
            cid = tl.load(cand_id_row + c, mask=in_tile, other=0, cache_modifier=".cg")
            ckey = _float_key(cx)
            threshold = lower
            if topk_on:
                # largest key with >= k candidates at or above it: the k-th largest value
                ones = tl.where(in_tile, 1.0, 0.0)
                top = tl.minimum(max_key.to(tl.int64), lower + (1 << shift) - 1)   # the bucket's top
                threshold = _last_at_least(ckey, ones, top_k.to(tl.float32), lower - 1, top, NT) + 1
            if top_p < 1.0:
                mass = tl.where(in_tile & (ckey >= threshold), tl.exp(cx - x_max), 0.0)
                target = top_p * tl.sum(mass, 0)
                top_p_key = _last_at_least(ckey, mass, target, threshold - 1, max_key, NT) + 1
                threshold = tl.minimum(top_p_key, max_key)   # top_p <= 0 still keeps the max
            score = _gumbel_score(cx, cid, seed, step, padded_vocab)
            score = tl.where(in_tile & (ckey >= threshold), score, float("-inf"))
            best_score = tl.max(score, 0)
            token = tl.min(tl.where(score == best_score, cid, vocab), 0)
            kept_from = _key_float(threshold)
        else:
            # no filter, or too many candidates for the tile: lower is then the exact k-th key
            # (all 32 bits read) or the row's minimum
            threshold = lower
            if top_p < 1.0:
                # _last_at_least with the sums taken over the whole row, NT thresholds a pass
                j = tl.arange(0, CAND)
                lo = threshold - 1
                hi = max_key.to(tl.int64)
                t_step = tl.arange(0, NT).to(tl.int64) + 1
                while lo < hi:
                    span = hi - lo
                    t = lo + (span * t_step + NT) // (NT + 1)
                    total = 0.0
                    above = tl.full([NT], 0.0, tl.float32)
                    for start in range(0, vocab, CAND):
                        idx = start + j
                        raw, x, valid = _scaled_logits(row_ptr, bitmap_row_ptr, idx, vocab, padded_vocab, penalty,
                                                       temperature, seen_limit)
                        key = _float_key(x)
                        mass = tl.where(valid & (key >= threshold), tl.exp(x - x_max), 0.0)
                        total += tl.sum(mass, 0)
                        above += tl.sum(tl.where(key[:, None] > t[None, :], mass[:, None], 0.0), axis=0)
                    n_ok = tl.sum((above >= top_p * total).to(tl.int64), axis=0)
                    hi = tl.where(n_ok < NT, lo + (span * (n_ok + 1) + NT) // (NT + 1) - 1, hi)
                    lo = lo + (span * n_ok + NT) // (NT + 1)
                threshold = tl.minimum(lo + 1, max_key)
            best = tl.full([BLOCK], float("-inf"), tl.float32)
            best_id = tl.full([BLOCK], 0, tl.int32)
            for start in range(0, vocab, BLOCK):
                idx = start + offs
                raw, x, valid = _scaled_logits(row_ptr, bitmap_row_ptr, idx, vocab, padded_vocab, penalty,
                                               temperature, seen_limit)
                score = _gumbel_score(x, idx, seed, step, padded_vocab)
                score = tl.where(valid & (_float_key(x) >= threshold), score, float("-inf"))
                better = score > best
                best = tl.where(better, score, best)
                best_id = tl.where(better, idx, best_id)
            best_score = tl.max(best, 0)
            token = tl.min(tl.where(best == best_score, best_id, vocab), 0)
            kept_from = _key_float(threshold)
    tl.store(tokens_ptr + row, token.to(tl.int64))
    tl.store(threshold_ptr + row, kept_from)


def _check_row_param(name: str, t: torch.Tensor, seqs: int, dtype: torch.dtype, device) -> None:
    if t.dtype != dtype or t.shape != (seqs,) or t.device != device or (seqs > 1 and t.stride(0) != 1):
        raise ValueError(f"{name}: expected a contiguous [{seqs}] {dtype} tensor on {device}, "
                         f"got {tuple(t.shape)} {t.dtype} on {t.device} with strides {t.stride()}")


def sample(logits: torch.Tensor, vocab_size: int, temperature: torch.Tensor, top_k: torch.Tensor,
           top_p: torch.Tensor, repetition_penalty: torch.Tensor, seen_ids: torch.Tensor,
           seeds: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused `sample_ref`: the same arguments, the same tokens and logsumexp, one kernel launch.

    logits: `[seqs, padded_vocab]` fp16 / bf16 / fp32 with contiguous rows (any row stride);
    ids >= vocab_size are never drawn. No host sync: safe inside CUDA graph capture.
    Raises ValueError on a shape, dtype, device or layout mismatch.
    """
    tokens, logsumexp, _ = sample_with_threshold(logits, vocab_size, temperature, top_k, top_p,
                                                 repetition_penalty, seen_ids, seeds, steps)
    return tokens, logsumexp


def sample_with_threshold(logits: torch.Tensor, vocab_size: int, temperature: torch.Tensor,
                          top_k: torch.Tensor, top_p: torch.Tensor, repetition_penalty: torch.Tensor,
                          seen_ids: torch.Tensor, seeds: torch.Tensor,
                          steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`sample`, plus each row's smallest kept value of the penalised, temperature-scaled logits
    (`[seqs]` float32; the max for greedy rows): ids < vocab_size with a scaled logit >= it form
    the kept set, which tests compare with `top_k_top_p_filter_ref`'s exactly."""
    if logits.dim() != 2 or logits.dtype not in _DTYPES:
        raise ValueError(f"logits: expected [seqs, padded_vocab] fp16/bf16/fp32, got "
                         f"{tuple(logits.shape)} {logits.dtype}")
    seqs, padded_vocab = logits.shape
    if logits.shape[1] > 1 and logits.stride(1) != 1:
        raise ValueError(f"logits: ids must be contiguous within a row, got strides {logits.stride()}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 0 < vocab_size <= padded_vocab:
        raise ValueError(f"vocab_size must be an int in [1, padded_vocab={padded_vocab}], got {vocab_size!r}")
    device = logits.device
    for name, t, dtype in (("temperature", temperature, torch.float32), ("top_k", top_k, torch.int64),
                           ("top_p", top_p, torch.float32),
                           ("repetition_penalty", repetition_penalty, torch.float32),
                           ("seeds", seeds, torch.int64), ("steps", steps, torch.int64)):
        _check_row_param(name, t, seqs, dtype, device)
    if (seen_ids.dim() != 2 or seen_ids.shape[0] != seqs or seen_ids.dtype != torch.int64
            or seen_ids.device != device or (seen_ids.shape[1] > 1 and seen_ids.stride(1) != 1)):
        raise ValueError(f"seen_ids: expected [{seqs}, max_seen] int64 on {device} with contiguous rows, got "
                         f"{tuple(seen_ids.shape)} {seen_ids.dtype} on {seen_ids.device}, "
                         f"strides {seen_ids.stride()}")
    tokens = torch.empty(seqs, dtype=torch.int64, device=device)
    logsumexp = torch.empty(seqs, dtype=torch.float32, device=device)
    threshold = torch.empty(seqs, dtype=torch.float32, device=device)
    if seqs == 0:
        return tokens, logsumexp, threshold
    max_seen = seen_ids.shape[1]
    # an empty seen list has no storage to point at: pass any int64 tensor, never read
    seen = seen_ids if max_seen else steps
    n_words = cdiv(vocab_size, 32)
    bitmap = torch.empty(seqs, n_words, dtype=torch.int32, device=device)   # zeroed by the kernel
    cand_x = torch.empty(seqs, _CAND, dtype=torch.float32, device=device)
    cand_id = torch.empty(seqs, _CAND, dtype=torch.int32, device=device)
    _sample_kernel[(seqs,)](
        logits, temperature, top_k, top_p, repetition_penalty, seen, seeds, steps,
        bitmap, cand_x, cand_id, tokens, logsumexp, threshold,
        vocab_size, padded_vocab, n_words, max_seen, logits.stride(0), seen.stride(0) if max_seen else 0,
        BLOCK=_BLOCK, SEEN_BLOCK=_SEEN_BLOCK, CAND=_CAND, NT=_NT, num_warps=_NUM_WARPS)
    return tokens, logsumexp, threshold


def compile_specs() -> list:
    """The kernel as the launcher runs it, for each logits dtype (one block configuration), for
    the sm_80 / sm_90 compile check; OPT's padded vocabulary (50272) and a 512-wide seen list
    make those integers multiples of 16, as the JIT then sees them."""
    from .compile_check import CompileSpec
    specs = []
    for dtype in _DTYPES.values():
        sig = dict(logits_ptr=f"*{dtype}", temperature_ptr="*fp32", top_k_ptr="*i64", top_p_ptr="*fp32",
                   penalty_ptr="*fp32", seen_ptr="*i64", seeds_ptr="*i64", steps_ptr="*i64",
                   bitmap_ptr="*i32", cand_x_ptr="*fp32", cand_id_ptr="*i32", tokens_ptr="*i64",
                   lse_ptr="*fp32", threshold_ptr="*fp32", vocab="i32", padded_vocab="i32", n_words="i32",
                   max_seen="i32", stride_logits="i32", stride_seen="i32", BLOCK="constexpr",
                   SEEN_BLOCK="constexpr", CAND="constexpr", NT="constexpr")
        consts = dict(BLOCK=_BLOCK, SEEN_BLOCK=_SEEN_BLOCK, CAND=_CAND, NT=_NT)
        specs.append(CompileSpec(_sample_kernel, f"{dtype} block{_BLOCK} cand{_CAND} nt{_NT}", sig, consts,
                                 divisible_by_16=("padded_vocab", "max_seen", "stride_logits", "stride_seen"),
                                 num_warps=_NUM_WARPS))
    return specs
