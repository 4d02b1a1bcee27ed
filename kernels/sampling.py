"""Sampling from a batch of logits: the torch reference op.

Per sequence: repetition penalty (HF/CTRL semantics) -> temperature (0 = greedy) -> top-k ->
top-p -> a draw keyed by (seed, step). The random numbers are Triton's Philox (`tl.rand(seed,
offset)`), reproduced here bit for bit, so the fused kernel can match this reference exactly and
a seed gives the same tokens whatever else is in the batch.
"""
from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
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
    logits = logits.float()[:, :vocab_size]
    logsumexp = torch.logsumexp(logits, dim=-1)
    if seen_ids.shape[1]:
        logits = apply_repetition_penalty_ref(logits, seen_ids, repetition_penalty)
    greedy = logits.argmax(dim=-1)
    if not bool((temperature > 0).any()):   # all greedy: skip the filters and the random draw
        return greedy, logsumexp
    scaled = logits / torch.where(temperature > 0, temperature, 1.0)[:, None]
    filtered = top_k_top_p_filter_ref(scaled, top_k, top_p)
    ids = torch.arange(vocab_size, device=logits.device)
    offsets = (steps[:, None] * padded_vocab + ids[None, :]) & _MASK32
    uniform = philox_uniform(seeds, offsets)
    gumbel = -torch.log(-torch.log(uniform))    # Gumbel-max: argmax(logit + g) ~ softmax(logit)
    sampled = (filtered + gumbel).argmax(dim=-1)
    return torch.where(temperature > 0, sampled, greedy), logsumexp
