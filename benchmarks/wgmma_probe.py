"""Does the Gluon wgmma prefill kernel (kernels/attention_wgmma.py) run right on this GPU?

It has never run before a GPU runs it here: the Triton interpreter does not run Gluon, so on CPU
it is only compiled. A wrong mbarrier phase would hang a launch rather than fail it, so the
first launches happen in a child process with a time limit: `probe()` runs this file and
returns, for each candidate of attention_tiles.WGMMA_CANDIDATES, "" where it matched the
reference on a small batch, or what went wrong (a hang, a crash, a mismatch). The tile sweep
times only the candidates that passed; the CUDA tests start from it.

    python benchmarks/wgmma_probe.py     # prints the JSON result (an sm_90 GPU)
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

# New tokens per sequence: one token, a block boundary and either side of it, several blocks
# with a partial last one, and a sequence after each (its keys and values sit in the next
# rows of the boxes).
LENGTHS = (1, 64, 65, 200, 129, 7)
HEADS = 3


def _label(head_dim: int, tiles) -> str:
    return f"d{head_dim} {tiles.block_m}x{tiles.block_n}x{tiles.num_warps}x{tiles.num_stages}"


def run_candidates() -> dict:
    """In this process: each candidate at head_dim 64 and 128 in fp16 against the reference."""
    import torch

    from opt_fast.kernels import attention, attention_tiles

    results = {}
    g = torch.Generator(device="cuda").manual_seed(0)
    tokens = sum(LENGTHS)
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    for head_dim, candidates in sorted(attention_tiles.WGMMA_CANDIDATES.items()):
        qkv = torch.randn(tokens, 3, HEADS, head_dim, generator=g, device="cuda", dtype=torch.float16)
        q, k, v = qkv.unbind(1)
        cache = torch.zeros(1, 16, HEADS, head_dim, device="cuda", dtype=torch.float16)
        args = (q, k, v, cache, cache.clone(), cu, torch.zeros(len(LENGTHS), dtype=torch.int32, device="cuda"),
                torch.zeros(len(LENGTHS), 1, dtype=torch.int32, device="cuda"), head_dim ** -0.5)
        expected = attention.prefill_attention_ref(*args).float()
        for tiles in candidates:
            label = _label(head_dim, tiles)
            try:
                out = attention.prefill_attention(*args, tiles=tiles, max_context_len=0).float()
                torch.cuda.synchronize()
                err = (out - expected).abs().max().item()
                results[label] = ("non-finite output" if not torch.isfinite(out).all()
                                  else "" if err <= 1e-2 else f"max error {err:.3g}")
            except Exception as exc:   # a finding, reported by label
                results[label] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:160]}"
    return results


def probe(timeout: float = 90.0) -> tuple[dict, str]:
    """(label -> "" or error, note): the candidates run in a child process; where it hangs past
    `timeout` seconds or dies, every candidate gets that as its error, and the note says so."""
    from opt_fast.kernels import attention_tiles

    labels = [_label(d, t) for d, candidates in sorted(attention_tiles.WGMMA_CANDIDATES.items()) for t in candidates]
    try:
        done = subprocess.run([sys.executable, str(Path(__file__).resolve())], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        note = f"the probe did not finish in {timeout:.0f} s (a hang?)"
        return dict.fromkeys(labels, note), note
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
        note = f"the probe exited with {done.returncode}: {tail}"
        return dict.fromkeys(labels, note), note
    results = json.loads(lines[-1])
    return results, f"{sum(not e for e in results.values())} of {len(results)} candidates right"


if __name__ == "__main__":
    print(json.dumps(run_candidates()))
