"""The fused Triton sampler (kernels/sampling.py `sample`) against `sample_ref`, token for token,
and its kept set (through `sample_with_threshold`) against `top_k_top_p_filter_ref`'s, id for id.

The cases aim at the kernel's own risks: the threshold searches (ties
at the top-k and top-p thresholds, peaked and flat rows), the two code paths (candidates compacted
into a register tile vs. whole-row passes: top-k off or k > 512), vocabularies that are not a
multiple of the 2048-id chunk, fp16 / bf16 logits, greedy and mixed batches, the launcher's checks.
"""
from __future__ import annotations

import pytest
import torch

from kernel_testing import DEVICE, fill_empty, gen
from opt_fast.kernels import sampling
from opt_fast.kernels.sampling import apply_repetition_penalty_ref, sample_ref, top_k_top_p_filter_ref

I64 = dict(dtype=torch.int64, device=DEVICE)
F32 = dict(dtype=torch.float32, device=DEVICE)


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    """Every buffer the launcher allocates (tokens, log-sum-exps, thresholds, the seen-id bitmap,
    the candidates) starts as NaN or all ones: whatever a kernel must write or clear before it
    reads shows where it does not."""
    fill_empty(monkeypatch, float("nan"), int_value=-1)


def make_args(logits, vocab, temperature, top_k, top_p, penalty, seen=None, seeds=None, steps=None):
    """sample()'s positional arguments; scalars broadcast over the rows, seen is a list of lists."""
    rows = logits.shape[0]

    def per_row(v, kind):
        return torch.tensor(v if isinstance(v, list) else [v] * rows, **kind)
    if seen is None:
        seen_ids = torch.empty(rows, 0, **I64)
    else:
        width = max(len(s) for s in seen)
        seen_ids = torch.tensor([s + [-1] * (width - len(s)) for s in seen], **I64)
    seeds = list(range(1000, 1000 + rows)) if seeds is None else seeds
    steps = 7 if steps is None else steps
    return (logits.to(DEVICE), vocab, per_row(temperature, F32), per_row(top_k, I64), per_row(top_p, F32),
            per_row(penalty, F32), seen_ids, per_row(seeds, I64), per_row(steps, I64))


def assert_matches_ref(args):
    tokens, logsumexp = sampling.sample(*args)
    ref_tokens, ref_logsumexp = sample_ref(*args)
    assert tokens.dtype == torch.int64 and logsumexp.dtype == torch.float32
    mismatch = (tokens != ref_tokens).nonzero().flatten().tolist()
    assert not mismatch, (f"rows {mismatch}: {tokens[mismatch].tolist()} vs reference "
                          f"{ref_tokens[mismatch].tolist()}")
    torch.testing.assert_close(logsumexp, ref_logsumexp, atol=2e-5, rtol=2e-6)
    return tokens


def random_logits(rows, padded, g, scale=3.0, dtype=torch.float32):
    return (torch.randn(rows, padded, generator=g) * scale).to(dtype)


def random_seen(rows, vocab, g, n=24):
    seen = []
    for _ in range(rows):
        ids = torch.randint(vocab, (n,), generator=g).tolist()
        seen.append(ids + ids[: n // 3])           # duplicates: penalised once
    return seen


# ---------------------------------------------------------------------------------------------
# both paths, vocabularies around the chunk size, every filter combination

@pytest.mark.parametrize("vocab,padded", [(13, 16), (511, 512), (2049, 2056), (4100, 4104)])
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (50, 1.0), (0, 0.9), (50, 0.9), (700, 0.95), (1, 0.5)])
def test_matches_reference(vocab, padded, top_k, top_p):
    g = gen(vocab * 31 + top_k)
    rows = 4
    logits = random_logits(rows, padded, g)
    logits[:, vocab:] = 1e4                         # padding would win every draw
    args = make_args(logits, vocab, [0.7, 1.0, 1.6, 0.9], top_k, top_p, [1.0, 1.3, 0.8, 2.0],
                     random_seen(rows, vocab, g), seeds=[3, 2**40 + 9, 17, 2**62 + 1], steps=[0, 5, 999, 12])
    tokens = assert_matches_ref(args)
    assert (tokens < vocab).all()


def test_seen_ids_past_one_chunk():
    """Seen-id lists of 600 (prompts longer than the kernel's 256-id chunk): ids in every chunk
    are penalised. Row 0 is greedy and its best id sits only at the last position (599, in the
    third chunk), so ignoring any chunk past the first would draw it; rows 1 and 2 sample
    against the reference."""
    g = gen(600)
    vocab, width = 2049, 600
    logits = random_logits(3, 2056, g)
    best = int(logits[0, :vocab].argmax())
    logits[0, best] = 50.0                          # positive: the penalty divides it to 0.05
    others = [i for i in torch.randperm(vocab, generator=g).tolist() if i != best]
    seen = [others[:width - 1] + [best]]
    seen += [torch.randint(vocab, (width,), generator=g).tolist() for _ in range(2)]
    args = make_args(logits, vocab, [0.0, 1.0, 0.8], [0, 40, 0], [1.0, 0.9, 1.0], [1000.0, 1.3, 0.7], seen)
    tokens = assert_matches_ref(args)
    assert tokens[0].item() != best


# ---------------------------------------------------------------------------------------------
# thresholds: the kept set, exactly; ties, peaked and flat rows

def _on_top_p_boundary(row, k, p, ids, tolerance=1e-5):
    """Which of `ids` sit where float32 rounding may decide top-p: ids top-k keeps whose
    probability mass ranked above is within `tolerance` of top_p (float64). CPU and CUDA cumsums
    sum in different orders, so the reference itself flips such ids between devices. With top_p
    off (1) none: an id top-k cut, whose mass above is 1, is never excused."""
    if float(p) >= 1.0 or not ids.numel():
        return torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
    row = row.double()
    if int(k) > 0:
        kth = row.topk(min(int(k), row.numel())).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    probs = torch.softmax(row, dim=-1)
    mass_above = torch.stack([probs[probs > probs[i]].sum() for i in ids.tolist()])
    return ((mass_above - float(p)).abs() <= tolerance) & (probs[ids] > 0)


def assert_kept_set_matches_ref(args):
    """The kernel's kept set (scaled logits >= its threshold) equals the reference filter's."""
    logits, vocab, temperature, top_k, top_p, penalty, seen_ids = args[:7]
    tokens, _, threshold = sampling.sample_with_threshold(*args)
    scaled = logits.float()[:, :vocab]
    if seen_ids.shape[1]:
        scaled = apply_repetition_penalty_ref(scaled, seen_ids, penalty)
    scaled = scaled / torch.where(temperature > 0, temperature, 1.0)[:, None]
    expected = torch.isfinite(top_k_top_p_filter_ref(scaled, top_k, top_p))
    kept = scaled >= threshold[:, None]
    for r in (temperature > 0).nonzero().flatten().tolist():
        diff = (kept[r] != expected[r]).nonzero().flatten()
        diff = diff[~_on_top_p_boundary(scaled[r], top_k[r], top_p[r], diff)]
        assert diff.numel() == 0, (f"row {r} (k={top_k[r].item()}, p={top_p[r].item()}): ids {diff[:8].tolist()} "
                                   f"kept {kept[r].sum().item()} vs reference {expected[r].sum().item()}")
        assert kept[r, tokens[r]], f"row {r}: token {tokens[r].item()} outside the kept set"


@pytest.mark.parametrize("vocab", [61, 509, 1031, 2049, 5000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kept_set_equals_reference(vocab, dtype):
    """Both paths (tile: k <= ~500 or small vocab; whole-row: top-k off or k = 600, 700), every
    filter combination, with penalties; fp16 logits tie often. Top-k alone (top_p 1) must cut
    exactly: no id is excused as lying on a top-p boundary there."""
    g = gen(vocab + (dtype == torch.float16))
    settings = [(0, 0.9), (1, 1.0), (2, 1.0), (5, 0.5), (50, 1.0), (50, 0.9), (0, 0.3), (700, 1.0),
                (700, 0.95), (0, 0.999), (20, 0.0), (vocab - 1, 0.99), (600, 1.0)]
    rows = len(settings)
    logits = random_logits(rows, vocab + 3, g, scale=2.5, dtype=dtype)
    temperature = [(0.7, 1.0, 1.5, 0.8)[r % 4] for r in range(rows)]
    penalty = [(1.0, 1.3, 0.8, 2.0)[r % 4] for r in range(rows)]
    args = make_args(logits, vocab, temperature, [k for k, _ in settings], [p for _, p in settings], penalty,
                     random_seen(rows, vocab, g))
    assert_kept_set_matches_ref(args)
    assert_matches_ref(args)


@pytest.mark.parametrize("vocab", [300, 3000])
def test_kept_set_with_ties_everywhere(vocab):
    """Logits on a coarse grid: every threshold lands inside a group of equal values."""
    g = gen(vocab)
    settings = [(7, 1.0), (40, 0.8), (0, 0.6), (0, 0.97), (600, 0.9), (3, 0.2), (0, 0.05), (100, 0.999)]
    rows = len(settings)
    logits = (torch.randn(rows, vocab, generator=g) * 2).round() / 2
    args = make_args(logits, vocab, 1.0, [k for k, _ in settings], [p for _, p in settings], 1.0)
    assert_kept_set_matches_ref(args)
    assert_matches_ref(args)

def draws(row: torch.Tensor, vocab: int, n: int, **params) -> torch.Tensor:
    """n draws of one row under n (seed, step) keys, checked against the reference."""
    logits = row[None].expand(n, -1).contiguous()
    return assert_matches_ref(make_args(logits, vocab, seeds=[5 + 7 * i for i in range(n)],
                                        steps=[i % 5 for i in range(n)], **params))


def test_top_k_keeps_every_tie_at_the_threshold():
    row = torch.tensor([5.0, 4.0, 1.0, 4.0, 0.0, 4.0, -2.0, 3.0])
    tokens = draws(row, 8, 64, temperature=1.0, top_k=2, top_p=1.0, penalty=1.0)
    # k = 2 keeps the 5 and all three 4s (a value threshold), nothing else
    assert set(tokens.tolist()) == {0, 1, 3, 5}


def test_minus_zero_ties_with_zero():
    """-0.0 == +0.0: a threshold at zero keeps both (their bit patterns differ)."""
    row = torch.tensor([1.0, -3.0, -0.0, 0.0, -1.0, -0.0])
    tokens = draws(row, 6, 48, temperature=1.0, top_k=2, top_p=1.0, penalty=1.0)
    assert set(tokens.tolist()) == {0, 2, 3, 5}


def test_top_p_keeps_every_tie_at_the_threshold():
    # probabilities 0.42, 0.155 x 3, 0.057 x 2: with top_p = 0.5 the first 1.0 is needed, and the
    # threshold is its value, so its ties stay too
    row = torch.tensor([0.0, 1.0, 2.0, 1.0, 0.0, 1.0])
    tokens = draws(row, 6, 64, temperature=1.0, top_k=0, top_p=0.5, penalty=1.0)
    assert set(tokens.tolist()) == {1, 2, 3, 5}


@pytest.mark.parametrize("vocab", [97, 2500])
def test_peaked_rows_draw_the_peak(vocab):
    g = gen(vocab + 1)
    rows = 8
    logits = random_logits(rows, vocab, g, scale=1.0)
    peak = torch.randint(vocab, (rows,), generator=g)
    logits[torch.arange(rows), peak] = 40.0
    for top_k, top_p in [(0, 1.0), (0, 0.9), (50, 0.999), (5, 1.0)]:
        tokens = assert_matches_ref(make_args(logits, vocab, 1.0, top_k, top_p, 1.0))
        assert torch.equal(tokens.cpu(), peak)


@pytest.mark.parametrize("vocab", [97, 2500])
def test_flat_rows(vocab):
    """All-equal logits: every id ties at any threshold, so top-k and top-p keep them all."""
    rows = 12
    flat = torch.full((rows, vocab), 0.25)
    settings = [(10, 1.0), (0, 0.5), (3, 0.1)] * 4
    args = make_args(flat, vocab, 1.0, [k for k, _ in settings], [p for _, p in settings], 1.0,
                     seeds=[11 * i for i in range(rows)])
    assert_kept_set_matches_ref(args)
    tokens = assert_matches_ref(args)
    assert len(set(tokens.tolist())) > 6
    # nearly flat (1e-4 noise): top-p 0.5 cuts about half the vocabulary
    g = gen(vocab + 2)
    nearly = 0.25 + torch.randn(4, vocab, generator=g) * 1e-4
    args = make_args(nearly, vocab, 1.0, [0, 0, 30, 0], [0.5, 0.9, 0.5, 0.1], 1.0)
    assert_kept_set_matches_ref(args)
    assert_matches_ref(args)


def test_top_p_extremes():
    g = gen(21)
    logits = random_logits(6, 1500, g)
    # top_p 0 keeps only the max; just below 1 cuts the far tail only
    tokens = assert_matches_ref(make_args(logits, 1500, 1.0, 0, 0.0, 1.0))
    assert torch.equal(tokens, logits.argmax(dim=-1).to(DEVICE))
    assert_matches_ref(make_args(logits, 1500, 1.0, [0, 0, 0, 100, 100, 100], 0.9999, 1.0))


# ---------------------------------------------------------------------------------------------
# dtypes, batches, keys, layouts

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("vocab,padded", [(331, 337), (2100, 2112)])
def test_half_precision_logits(dtype, vocab, padded):
    g = gen(padded)
    logits = random_logits(6, padded, g, dtype=dtype)
    args = make_args(logits, vocab, [0.0, 0.8, 1.0, 1.3, 0.0, 0.6], [0, 40, 0, 5, 3, 0],
                     [1.0, 0.9, 0.7, 1.0, 0.5, 0.95], [1.2, 1.0, 1.5, 0.9, 1.0, 1.1], random_seen(6, vocab, g))
    assert_matches_ref(args)


def test_greedy_ties_take_the_first_id():
    """torch.argmax's rule, also when the tied ids fall in the same lane of different chunks."""
    g = gen(30)
    row = random_logits(1, 5000, g)[0]
    for i in (4148, 2100, 52, 3000):
        row[i] = 20.0
    tokens = assert_matches_ref(make_args(row[None].expand(2, -1).contiguous(), 5000, 0.0, 0, 1.0, 1.0))
    assert tokens.tolist() == [52, 52]


def test_all_greedy_batch_is_argmax_of_penalised_logits():
    """Each row's raw argmax is seen and penalised (3.0); in the last three rows every logit is
    negative, so the argmax loses only if negative logits are multiplied, not divided."""
    g = gen(31)
    rows, vocab = 9, 2100
    logits = random_logits(rows, vocab + 4, g)
    logits[6:] = -logits[6:].abs() - 0.5
    seen = random_seen(rows, vocab, g)
    for r in range(rows):                               # the penalty must decide some rows
        seen[r].append(int(logits[r, :vocab].argmax()))
    tokens = assert_matches_ref(make_args(logits, vocab, 0.0, [0, 50, 1] * 3, 0.5, 3.0, seen))
    changed = (tokens.cpu() != logits[:, :vocab].argmax(dim=-1))
    assert changed[:6].any() and changed[6:].all()


def test_mixed_batch_rows_do_not_depend_on_each_other():
    g = gen(32)
    rows, vocab = 8, 1200
    logits = random_logits(rows, vocab, g)
    params = dict(temperature=[0.0, 0.8, 0.0, 1.2, 0.5, 0.0, 1.0, 2.0], top_k=[0, 20, 0, 0, 600, 1, 5, 0],
                  top_p=[1.0, 0.9, 0.3, 0.8, 1.0, 1.0, 0.5, 1.0], penalty=[1.3, 1.0, 1.0, 1.5, 1.2, 0.9, 1.0, 1.0])
    seen = random_seen(rows, vocab, g)
    seeds = list(range(50, 50 + rows))
    batch = assert_matches_ref(make_args(logits, vocab, **params, seen=seen, seeds=seeds))
    for r in (0, 3, 4):
        alone = sampling.sample(*make_args(logits[r:r + 1], vocab, **{k: [v[r]] for k, v in params.items()},
                                           seen=[seen[r]], seeds=[seeds[r]]))[0]
        assert alone.item() == batch[r].item()


def test_offsets_wrap_at_2_pow_32():
    """steps * padded_vocab past 2**32: the offset is taken mod 2**32, as in the reference."""
    g = gen(33)
    padded = 50272
    logits = random_logits(4, padded, g, scale=0.5)
    steps = [2**32 // padded, 2**32 // padded + 1, 10**6, 2**40]
    assert_matches_ref(make_args(logits, 50265, 1.0, [0, 50, 0, 50], [1.0, 1.0, 0.9, 0.9], 1.0, steps=steps))


def test_minus_inf_logits_are_never_drawn():
    """Banned ids (min_tokens) arrive as -inf; k larger than the finite count keeps them in the
    kept set, but they can never win the draw."""
    g = gen(34)
    rows, vocab = 6, 40
    logits = random_logits(rows, vocab, g)
    logits[:, 4:] = float("-inf")
    tokens = assert_matches_ref(make_args(logits, vocab, 1.0, [0, 10, 3, 0, 10, 2], [1.0, 1.0, 1.0, 0.5, 0.9, 0.2],
                                          [1.0, 1.2, 1.0, 1.0, 1.0, 1.0], [[0, 5, 5]] * rows))
    assert (tokens < 4).all()


def test_strided_rows():
    g = gen(35)
    base = random_logits(5, 700, g).to(DEVICE)     # sliced where it lies: a copy would be dense
    logits = base[:, :650]                                # rows 700 apart, ids contiguous
    args = make_args(logits, 640, 0.9, 30, 0.9, 1.2, random_seen(5, 640, g))
    assert args[0].stride() == (700, 1)
    tokens, lse = sampling.sample(*args)
    ref = sample_ref(*((args[0].contiguous(),) + args[1:]))
    assert torch.equal(tokens, ref[0])
    torch.testing.assert_close(lse, ref[1], atol=2e-5, rtol=2e-6)


def test_extreme_penalties_and_temperatures_match_the_reference():
    """Scaled logits clamped to float32's range as the reference clamps them: seen ids whose
    penalised logit overflows tie at the largest float, on both paths of the kernel."""
    g = gen(17)
    vocab = 600
    logits = random_logits(8, vocab, g, scale=30.0)
    logits[:, 5::7] = float("-inf")
    seen = random_seen(8, vocab, g, n=60)
    args = make_args(logits, vocab, [0.0, 1.0, 1e38, 2.0] * 2, [0, 0, 1, 40, 0, 700, 3, 0],
                     [1.0, 0.9, 1.0, 0.5] * 2, [2e-38] * 4 + [3e38] * 4, seen)
    tokens = assert_matches_ref(args)
    assert not (tokens % 7 == 5).any()


def test_empty_batch():
    tokens, lse = sampling.sample(*make_args(torch.empty(0, 16), 13, [], [], [], [], None, [], []))
    assert tokens.shape == (0,) and lse.shape == (0,)


@pytest.mark.parametrize("case", ["int_logits", "fp64_logits", "1d_logits", "ids_strided", "vocab_too_big",
                                  "vocab_float", "top_k_int32", "temperature_rows", "seen_int32", "seen_rows"])
def test_launcher_rejects_bad_inputs(case):
    args = list(make_args(torch.randn(3, 16), 13, 1.0, 0, 1.0, 1.0, [[1, 2]] * 3))
    if case == "int_logits":
        args[0] = args[0].to(torch.int32)
    elif case == "fp64_logits":
        args[0] = args[0].double()
    elif case == "1d_logits":
        args[0] = args[0][0]
    elif case == "ids_strided":
        args[0] = torch.randn(16, 3, device=DEVICE).t()
    elif case == "vocab_too_big":
        args[1] = 17
    elif case == "vocab_float":
        args[1] = 12.5
    elif case == "top_k_int32":
        args[3] = args[3].int()
    elif case == "temperature_rows":
        args[2] = args[2][:2]
    elif case == "seen_int32":
        args[6] = args[6].int()
    elif case == "seen_rows":
        args[6] = args[6][:2]
    with pytest.raises(ValueError):
        sampling.sample(*args)
