"""Does the Gluon wgmma prefill kernel (kernels/attention_wgmma.py) run right on this GPU?

It has never run before a GPU runs it here: the Triton interpreter does not run Gluon, so on CPU
it is only compiled. A wrong mbarrier phase would hang a launch rather than fail it, so its
first launches happen in child processes with a time limit, one per candidate (a hang in one
leaves the others' verdicts): `probe()` returns, for each candidate of
attention_tiles.WGMMA_CANDIDATES, "" where it matched the reference on a small batch, and then
stored that batch's keys and values in the caches as the reference does (the fused KV-cache
write, as the engine launches it), or what went wrong (a hang, a crash, a mismatch). For a
diagnosis it also runs the first candidate of each head size without the overlap (each PV
waited for before the next softmax): right without it and wrong with it puts the fault in the
overlap. The tile sweep times only the candidates that passed; the CUDA tests start from the
same verdicts.

    python benchmarks/wgmma_probe.py               # every verdict, as JSON (an sm_90 GPU)
    python benchmarks/wgmma_probe.py 128 0 [sync]  # one candidate's, in this process
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# New tokens per sequence: one token, a block boundary and either side of it, several blocks
# with a partial last one, a long prompt (its last blocks' loops run 9 to 33 key tiles, each
# stage's slot refilled several times, as at the sweep's 1024 tokens, where a wrong phase would
# hang the sweep itself), and a sequence after each (its keys and values sit in the next rows
# of the boxes). Launched without a bound on them: the virtual block layout.
LENGTHS = (1, 64, 65, 200, 129, 1031, 7)
# Prompts of about one length, launched with their bound (max_query_len, as the engine and the
# tile sweep launch them): the uniform block layout at every candidate's block_m.
UNIFORM_LENGTHS = (130, 130, 127, 130)
# Prompts for the persistent form (Tiles.persistent), which takes a batch only where its bound
# (max_query_len) says every prompt fits one tile: one token, a full tile and either side of a
# half one, prompts without new tokens (the last one too), and a sequence after each. Run on
# PERSISTENT_PROGRAMS programs, so that each takes several (prompt, head) items in turn and
# reuses each of its slot sets (on a whole GPU's, a batch this small gives each program one).
SHORT_LENGTHS = (1, 64, 0, 65, 128, 127, 7, 0)
# Programs of every persistent launch the probe makes: the short-prompt form's, and the
# warp-specialised form's (Tiles.persistent with warp_specialize), whose programs then take many
# query blocks each of LENGTHS and UNIFORM_LENGTHS, their key tiles counted across them.
PERSISTENT_PROGRAMS = 2
HEADS = 3
SYNC = " without overlap"


def _label(head_dim: int, tiles) -> str:
    return (f"d{head_dim} {tiles.block_m}x{tiles.block_n}x{tiles.num_warps}x{tiles.num_stages}"
            + " ws" * tiles.warp_specialize + " pingpong" * tiles.pingpong + " persistent" * tiles.persistent)


def cases() -> list[tuple[str, int, int, bool]]:
    """(label, head_dim, index into WGMMA_CANDIDATES[head_dim], overlap) of every launch probed:
    each candidate, and each head size's first with an overlap to turn off (not the persistent
    form: one key tile an item) without it."""
    from opt_fast.kernels.attention_tiles import WGMMA_CANDIDATES
    found = []
    for head_dim, candidates in sorted(WGMMA_CANDIDATES.items()):
        found += [(_label(head_dim, tiles), head_dim, i, True) for i, tiles in enumerate(candidates)]
        found += [(_label(head_dim, tiles) + SYNC, head_dim, i, False)
                  for i, tiles in enumerate(candidates) if not tiles.persistent][:1]
    return found


def batches(tiles) -> list[tuple[tuple, int | None]]:
    """(prompt lengths, max_query_len) of each batch a candidate is probed on: without a bound
    (the virtual block layout), then with one (the uniform layout); the persistent form that
    takes a prompt a tile, which has no block layouts, on short prompts with their bound."""
    from opt_fast.kernels.attention_tiles import one_tile_per_prompt

    if one_tile_per_prompt(tiles):
        return [(SHORT_LENGTHS, max(SHORT_LENGTHS))]
    return [(LENGTHS, None), (UNIFORM_LENGTHS, max(UNIFORM_LENGTHS))]


def run_case(head_dim: int, index: int, overlap: bool) -> str:
    """In this process: one candidate in fp16 against the reference, on each of its `batches`,
    then with the fused cache write; "" or what went wrong. (Off a GPU, where the launcher runs
    the main kernel instead, it says so: the probe's CPU tests stub the Gluon launch.)"""
    import functools

    import torch

    from opt_fast.kernels import (attention, attention_tiles, attention_wgmma, attention_wgmma_persistent,
                                  attention_wgmma_ws)

    # (a child process's own: for good; the CPU tests that run this in-process undo it)
    attention_wgmma_persistent.sm_count = attention_wgmma_ws.sm_count = lambda device: PERSISTENT_PROGRAMS
    launched = []   # a verdict on the Gluon kernel only where it, not the main kernel, ran
    real = functools.partial(attention_wgmma.launch_prefill_wgmma, overlap=overlap)

    def counted(*args, **options):
        launched.append(args)
        return real(*args, **options)
    attention_wgmma.launch_prefill_wgmma = counted
    tiles = attention_tiles.WGMMA_CANDIDATES[head_dim][index]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=device).manual_seed(0)
    i32 = dict(dtype=torch.int32, device=device)
    for lengths, bound in batches(tiles):
        where = ("short prompts" if attention_tiles.one_tile_per_prompt(tiles) else "uniform layout" if bound
                 else "virtual layout")
        tokens = sum(lengths)
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], **i32)
        q, k, v = torch.randn(tokens, 3, HEADS, head_dim, generator=g, device=device, dtype=torch.float16).unbind(1)
        cache = torch.zeros(1, 16, HEADS, head_dim, device=device, dtype=torch.float16)
        args = (q, k, v, cache, cache.clone(), cu, torch.zeros(len(lengths), **i32),
                torch.zeros(len(lengths), 1, **i32), head_dim ** -0.5)
        expected = attention.prefill_attention_ref(*args).float()
        launched.clear()
        try:
            out = attention.prefill_attention(*args, tiles=tiles, max_context_len=0, max_query_len=bound).float()
            if q.is_cuda:
                torch.cuda.synchronize()
        except Exception as exc:   # a finding, reported by label
            return f"{where}: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:160]}"
        if not launched:
            return "the launcher ran the main kernel, not the Gluon one"
        bad = _wrong_blocks(out, expected, tiles.block_m, lengths)
        if bad:
            return f"{where}: wrong at (prompt length, query block): {bad}"
        launched.clear()
        error = _cache_write_error(args, tiles, out, bound)
        if error or not launched:
            return f"{where}: {error or 'with the cache write the launcher ran the main kernel'}"
    return ""


def _cache_write_error(args: tuple, tiles, out, bound: int | None = None) -> str:
    """The same launch (max_query_len `bound`) with the KV-cache write fused (slot_mapping, as
    the engine launches it): "" where the caches then hold exactly the reference's slots and
    the output is unchanged."""
    import torch

    from opt_fast.kernels import attention

    q, k, v = args[:3]
    tokens, heads, head_dim = q.shape
    cache = torch.full((-(-tokens // 16) + 1, 16, heads, head_dim), float("nan"), device=q.device, dtype=q.dtype)
    slots = torch.randperm(cache.shape[0] * 16, generator=torch.Generator().manual_seed(1))[:tokens].to(q.device)
    slots[::5] = -1   # padding tokens: not stored
    caches = (cache, cache.clone())
    try:
        stored = attention.prefill_attention(q, k, v, *caches, *args[5:], tiles=tiles, max_context_len=0,
                                             max_query_len=bound, slot_mapping=slots).float()
        if q.is_cuda:
            torch.cuda.synchronize()
    except Exception as exc:   # a finding, reported by label
        return f"with the cache write: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:140]}"
    want = (torch.full_like(cache, float("nan")), torch.full_like(cache, float("nan")))
    attention.prefill_attention_ref(q, k, v, *want, *args[5:], slot_mapping=slots)
    off = [name for name, got, ref in zip(("keys", "values"), caches, want)
           if not torch.equal(got.nan_to_num(7.0), ref.nan_to_num(7.0))]
    if off:
        return f"the fused cache write stored wrong {' and '.join(off)}"
    return "" if torch.equal(stored, out) else "the fused cache write changed the output"


def _wrong_blocks(out, expected, block_m: int, lengths: tuple = LENGTHS) -> list[tuple[int, int]]:
    """Where `out` is non-finite or off the reference by more than 1e-2: (prompt length, query
    block) pairs, so that a failure says which part of the schedule broke (the first key tile,
    later ones, a prompt ending inside a tile)."""
    bad, start = [], 0
    for length in lengths:
        for block in range(0, length, block_m):
            rows = slice(start + block, start + min(block + block_m, length))
            got, want = out[rows], expected[rows]
            if not got.isfinite().all() or (got - want).abs().max().item() > 1e-2:
                bad.append((length, block // block_m))
        start += length
    return bad


# Seconds a child may run on after the last of the others finished: each compiles about as much
# as the others, all at once, so one still running well after them is hung, not slow. A hang then
# costs the sweep this much past the others instead of the whole time limit.
GRACE = 60.0


def child_command(head_dim: int, index: int, overlap: bool) -> list[str]:
    """The command of the child process that probes one case (run_case, its verdict as JSON)."""
    return [sys.executable, str(Path(__file__).resolve()), str(head_dim), str(index)] + ([] if overlap else ["sync"])


def probe(timeout: float = 90.0, grace: float = GRACE) -> tuple[dict, str]:
    """(label -> "" or error, note): every case in a child process of its own, all at once; a
    child still running `timeout` seconds after the start, or `grace` seconds after the last
    of the others finished, is killed and reported as a hang."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as scratch:
        running = {}
        for n, (label, head_dim, index, overlap) in enumerate(cases()):
            # output to files, not pipes: a child that writes much would block on a full pipe
            out, err = open(Path(scratch, f"{n}.out"), "w+"), open(Path(scratch, f"{n}.err"), "w+")
            running[label] = (subprocess.Popen(child_command(head_dim, index, overlap), stdout=out, stderr=err,
                                               text=True), out, err)
        results, last_finish = {}, None
        while running:
            now = time.monotonic()
            limit = start + timeout if last_finish is None else min(start + timeout, last_finish + grace)
            for label, (child, out, err) in list(running.items()):
                finished = child.poll() is not None
                if not finished and now < limit:
                    continue
                if not finished:
                    child.kill()
                    child.wait()
                    results[label] = f"did not finish in {now - start:.0f} s (a hang?)"
                else:
                    last_finish = now
                    results[label] = _verdict(child.returncode, Path(out.name).read_text(),
                                              Path(err.name).read_text())
                out.close()
                err.close()
                del running[label]
            time.sleep(0.1)
    results = {label: results[label] for label, *_ in cases()}   # in the cases' order
    probed = [label for label in results if not label.endswith(SYNC)]
    note = f"{sum(not results[label] for label in probed)} of {len(probed)} candidates right"
    return results, note


def _verdict(returncode: int, out: str, err: str) -> str:
    """A finished child's verdict: its last line of output, a JSON string, where it exited
    cleanly; else how it exited and its last words."""
    lines = out.strip().splitlines()
    try:
        verdict = json.loads(lines[-1]) if returncode == 0 and lines else None
    except ValueError:
        verdict = None
    if not isinstance(verdict, str):
        tail = (err.strip().splitlines() or lines or ["no output"])[-1][:200]
        verdict = f"exited with {returncode}: {tail}"
    return verdict


if __name__ == "__main__":
    if len(sys.argv) > 1:
        print(json.dumps(run_case(int(sys.argv[1]), int(sys.argv[2]), "sync" not in sys.argv[3:])))
    else:
        print(json.dumps(probe()[0]))
