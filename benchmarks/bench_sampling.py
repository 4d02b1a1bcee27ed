"""Sampling: the fused Triton sampler ("triton", `sample`: penalty, temperature, sort-free top-k /
top-p, seeded Gumbel-max draw, one launch) against the sort-based torch path most runtimes run
("torch_sort": gather/scatter penalty, softmax / sort / cumsum top-k and top-p masks,
`torch.multinomial`) and against this repo's reference ("torch_ref", `sample_ref`).

Every row: OPT's 50265 ids padded to 50272, temperature 0.8, top_k 50, top_p 0.9, repetition
penalty 1.2 over 512 seen ids, fp16 logits on CUDA. bytes_moved is one read of the logits and the
seen ids (the least any sampler must move); the kernel makes about three passes over each row.
Target on H100/H200: >= 3x torch_sort at batch 256.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarking import DEVICE, ON_GPU, run_benchmark, shapes
from opt_fast.kernels.sampling import sample, sample_ref

CASES = shapes(gpu=[(batch, 50265, 50272, 512) for batch in (1, 8, 64, 256)],
               smoke=[(3, 300, 304, 16)])
DTYPE = torch.float16 if ON_GPU else torch.float32


def sort_sampler(logits, vocab_size, temperature, top_k, top_p, repetition_penalty, seen_ids, generator):
    """The usual sort-based path, batched with per-row parameters (top-k by rank, top-p by the
    sorted cumulative mass), drawing with torch.multinomial. Returns (tokens, logsumexp)."""
    logits = logits[:, :vocab_size].float()
    logsumexp = torch.logsumexp(logits, dim=-1)
    # HF's penalty: gather the seen logits, penalise, scatter back; padding goes to a spare column
    padded = F.pad(logits, (0, 1))
    ids = torch.where(seen_ids < 0, vocab_size, seen_ids)
    seen = padded.gather(1, ids)
    p = repetition_penalty[:, None]
    padded.scatter_(1, ids, torch.where(seen < 0, seen * p, seen / p))
    logits = padded[:, :vocab_size]
    greedy = logits.argmax(dim=-1)
    scaled = logits / torch.where(temperature > 0, temperature, 1.0)[:, None]
    ranked, order = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(vocab_size, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, vocab_size)[:, None]
    ranked = ranked.masked_fill(rank >= k, float("-inf"))
    probs = ranked.softmax(dim=-1)
    mass_above = probs.cumsum(dim=-1) - probs
    ranked = ranked.masked_fill((mass_above >= top_p[:, None]) & (rank > 0), float("-inf"))
    drawn = torch.multinomial(ranked.softmax(dim=-1), 1, generator=generator)
    tokens = order.gather(1, drawn)[:, 0]
    return torch.where(temperature > 0, tokens, greedy), logsumexp


@pytest.mark.parametrize("impl", ["triton", "torch_sort", "torch_ref"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}-v{c[2]}")
def test_sampling(benchmark, roofline, case, impl):
    batch, vocab, padded, num_seen = case
    benchmark.group = f"sampling b{batch} v{padded}"
    g = torch.Generator(device=DEVICE).manual_seed(0)
    logits = (torch.randn(batch, padded, generator=g, device=DEVICE) * 3).to(DTYPE)
    seen_ids = torch.randint(0, vocab, (batch, num_seen), generator=g, device=DEVICE)

    def row(value, dtype):
        return torch.full((batch,), value, dtype=dtype, device=DEVICE)
    temperature, top_k, top_p = row(0.8, torch.float32), row(50, torch.int64), row(0.9, torch.float32)
    penalty = row(1.2, torch.float32)
    seeds = torch.arange(batch, dtype=torch.int64, device=DEVICE) + 1234
    steps = row(17, torch.int64)
    if impl == "torch_sort":
        def fn():
            return sort_sampler(logits, vocab, temperature, top_k, top_p, penalty, seen_ids, g)
    else:
        op = sample if impl == "triton" else sample_ref

        def fn():
            return op(logits, vocab, temperature, top_k, top_p, penalty, seen_ids, seeds, steps)
    bytes_moved = batch * (padded * logits.element_size() + num_seen * 8 + 12)
    run_benchmark(benchmark, fn, bytes_moved=bytes_moved, flops=0, roofline=roofline, impl=impl)
