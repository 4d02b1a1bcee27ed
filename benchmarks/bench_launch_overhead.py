"""Host cost of one call of each Triton launcher beside its torch peer: how long the host takes
to enqueue the work, at shapes so small that the device finishes each call before the next is
issued (so the rate of calls is the host's).

Each op runs `--calls` times back to back with one synchronise at the end; the time per call is
the host's launch path: our launcher's checks and Triton's dispatch (argument binding, cache
lookup, the driver call) against torch's dispatch of its peer op(s). Two floors come first: a
Triton kernel of one pointer argument that does nothing, and torch's `Tensor.add_` on one
element. This is what the kernel benchmarks' small shapes (pytest-benchmark, synchronised per
call) mostly measure, and what an eager prefill step pays per layer. Off CUDA (--smoke) the
kernels run in Triton's interpreter: the numbers are not launch costs there, the run only keeps
the script from rotting.

    python benchmarks/bench_launch_overhead.py [--calls 2000] [--out DIR]   # DIR/launch_overhead.md
"""
from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

import opt_fast.kernels  # noqa: F401  (sets TRITON_INTERPRET=1 where there is no CUDA, before triton)
import triton
from opt_fast.bench import card_name
from opt_fast.kernels import attention, kv_cache, layernorm_linear, paged_decode, sampling

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.float16 if ON_GPU else torch.float32


@triton.jit
def _nothing_kernel(x_ptr):   # x_ptr: [1], never read: the floor of a Triton launch
    pass


def _cases(hidden: int) -> list[tuple[str, object, str, object]]:
    """(op, ours, peer name, peer): closures over tiny inputs of one OPT-like layer shape."""
    g = torch.Generator(device=DEVICE).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=DEVICE, dtype=DTYPE)
    i32 = dict(dtype=torch.int32, device=DEVICE)
    heads, head_dim, tokens = 4, 64, 16
    qkv = randn(tokens, 3, heads, head_dim)
    q, k, v = qkv.unbind(1)
    key_cache, value_cache = randn(8, 16, heads, head_dim), randn(8, 16, heads, head_dim)
    cu_seqlens, context_lens = torch.tensor([0, tokens], **i32), torch.zeros(1, **i32)
    block_tables = torch.arange(2, **i32)[None]
    slots = torch.arange(tokens, device=DEVICE)
    q4, k4, v4 = (t.transpose(0, 1)[None].contiguous() for t in (q, k, v))
    decode_q = randn(2, heads, head_dim)
    decode_tables, seq_lens = torch.arange(4, **i32).view(2, 2), torch.tensor([20, 9], **i32)
    x, ln_w, ln_b = randn(tokens, hidden), randn(hidden), randn(hidden)
    w, b = randn(3 * hidden, hidden), randn(3 * hidden)
    logits = randn(2, 1000)
    f32 = dict(dtype=torch.float32, device=DEVICE)
    i64 = dict(dtype=torch.int64, device=DEVICE)
    rows = dict(temperature=torch.ones(2, **f32), top_k=torch.full((2,), 20, **i64), top_p=torch.full((2,), 0.9, **f32),
                repetition_penalty=torch.ones(2, **f32), seen_ids=torch.zeros(2, 1, **i64),
                seeds=torch.arange(2, **i64), steps=torch.zeros(2, **i64))
    one = torch.zeros(1, device=DEVICE)
    return [
        ("floor: a kernel doing nothing", lambda: _nothing_kernel[(1,)](one), "Tensor.add_ (1 element)",
         lambda: one.add_(1)),
        ("prefill_attention", lambda: attention.prefill_attention(
            q, k, v, key_cache, value_cache, cu_seqlens, context_lens, block_tables, 0.125, max_context_len=0),
         "scaled_dot_product_attention", lambda: F.scaled_dot_product_attention(q4, k4, v4, is_causal=True)),
        ("write_kv_cache", lambda: kv_cache.write_kv_cache(k, v, key_cache, value_cache, slots),
         "two index_copy_", lambda: (key_cache.view(-1, heads, head_dim).index_copy_(0, slots, k),
                                     value_cache.view(-1, heads, head_dim).index_copy_(0, slots, v))),
        ("paged_decode_attention", lambda: paged_decode.paged_decode_attention(
            decode_q, key_cache, value_cache, decode_tables, seq_lens, 0.125),
         "scaled_dot_product_attention", lambda: F.scaled_dot_product_attention(q4[:, :, :1], k4, v4)),
        ("layernorm_linear", lambda: layernorm_linear.layernorm_linear(x, ln_w, ln_b, w, b, 1e-5),
         "layer_norm + linear", lambda: F.linear(F.layer_norm(x, (hidden,), ln_w, ln_b, 1e-5), w, b)),
        ("sample", lambda: sampling.sample(logits, 1000, **rows),
         "softmax + multinomial", lambda: torch.multinomial(torch.softmax(logits.float(), -1), 1)),
    ]


def per_call_us(fn, calls: int, warmups: int) -> float:
    for _ in range(warmups):
        fn()
    if ON_GPU:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if ON_GPU:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--smoke", action="store_true", help="few calls; off CUDA the interpreter runs the kernels")
    args = parser.parse_args()
    calls, warmups = (1, 1) if args.smoke else (args.calls, 20)
    rows = []
    for op, ours, peer_name, peer in _cases(hidden=64 if args.smoke else 256):
        ours_us, peer_us = per_call_us(ours, calls, warmups), per_call_us(peer, calls, warmups)
        rows.append(dict(op=op, ours_us=round(ours_us, 2), peer=peer_name, peer_us=round(peer_us, 2),
                         ours_over_peer=round(ours_us / peer_us, 2)))
        print(json.dumps(rows[-1]), flush=True)
    meta = dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), card=card_name(torch.device(DEVICE)),
                torch=torch.__version__, triton=triton.__version__, calls=calls, smoke=args.smoke)
    lines = [f"# Launch overhead per call — {meta['card']}, {meta['date']}", "",
             f"torch {meta['torch']}, Triton {meta['triton']}; {calls} calls back to back, one synchronise; "
             "tiny shapes, so this is the host's time per call." + ("" if ON_GPU else
                                                                    " No GPU: the interpreter ran the kernels."), "",
             "| op | ours us | peer | peer us | ours / peer |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['op']} | {r['ours_us']} | {r['peer']} | {r['peer_us']} | {r['ours_over_peer']}x |" for r in rows]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "launch_overhead.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    (out / "launch_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
