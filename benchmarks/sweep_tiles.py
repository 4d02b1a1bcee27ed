"""Tile sweep: time candidate launch configurations of the three kernels whose speed goals are
open (paged decode, prefill attention, fused LN+QKV) at the goal shapes, beside each kernel's
torch peer measured in the same process, and report the best configuration per shape.

Every candidate is first checked against the peer's output on that shape; a candidate that fails
to compile, to launch or to match is reported and skipped, never fatal. Times are device times
with L2 flushed before each call, from CUDA graph replays (benchmarks/device_time.py), so a
launch option that adds launches is not charged the host's launch path; a call that cannot be
captured falls back to `triton.testing.do_bench` (CUDA events around each call), and the report
says which timed each row. For the default configuration and the peer the report also gives
the wall time of a call followed by a synchronise (what the pytest-benchmark files measure,
launch overhead included). Decode rows give achieved GB/s against the copy bandwidth measured
here (a 1 GiB device copy, bytes read + written).

On CUDA the sweep keeps to `--budget` seconds (default 75; with start-up, under 90 s in all):
kernels are first compiled in parallel worker processes (they fill Triton's on-disk cache), then
each kernel and each shape gets a share of the time left; what does not fit is reported as
skipped. The report is rewritten after every shape, so a run stopped from outside keeps what it
measured. `--smoke` runs tiny shapes and two or three configurations per kernel on any device
(the interpreter on CPU), so the script cannot rot.

    python benchmarks/sweep_tiles.py --out DIR          # writes DIR/sweep.json and DIR/sweep.md
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

import opt_fast.kernels  # noqa: F401  (sets TRITON_INTERPRET=1 where there is no CUDA, before any kernel)

sys.path.insert(0, str(Path(__file__).resolve().parent))   # benchmarks/: loaded by path in the tests
import device_time  # noqa: E402
from opt_fast.kernels import attention, attention_tiles, gemm_config, paged_decode
from opt_fast.kernels import layernorm_linear as ll

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.float16 if ON_GPU else torch.float32
# What the launchers' heuristics see on this device; off-GPU they assume an H100, as these do.
SMS = torch.cuda.get_device_properties(0).multi_processor_count if ON_GPU else 132
_MAJOR, _MINOR = torch.cuda.get_device_capability(0) if ON_GPU else (9, 0)
CAPABILITY = 10 * _MAJOR + _MINOR
BLOCK_SIZE = 16
EPS = 1e-5
# Shares of the measuring time (after the parallel compile) per kernel, in the order they run.
SHARES = {"decode": 0.4, "prefill": 0.35, "ln_qkv": 0.25}
GOALS = {"decode": "best >= 70% of copy bandwidth at opt-6.7b b64 ctx1024",
         "prefill": "ours >= 0.9x SDPA (speedup >= 0.90)",
         "ln_qkv": "ours >= 1.1x layer_norm + linear at <= 64 tokens"}


def _label(config: dict) -> str:
    if not config:
        return "default"
    shown = {k: "x".join(map(str, v)) if isinstance(v, (list, tuple)) else v for k, v in config.items()}
    return " ".join(f"{k}={v}" for k, v in shown.items())


# --------------------------------------------------------------------------------------------
# The three kernels: shapes, candidate configurations, inputs, our launch and the torch peer
# --------------------------------------------------------------------------------------------

class Decode:
    """Paged decode (block_size 16, blocks scattered by a random permutation) against SDPA on a
    contiguous cache; first the tile configurations at the heuristic's split count, then split
    counts for the best tile configuration."""
    name, peer_name = "decode", "sdpa"
    HEADS = {"opt-1.3b": (32, 64), "opt-6.7b": (32, 128), "opt-13b": (40, 128)}
    SPLITS = (1, 2, 4, 8, 16)

    def cases(self, smoke: bool) -> list[dict]:
        if smoke:
            return [dict(model="tiny", heads=2, head_dim=64, batch=3, context=40)]
        cases = [dict(model="opt-6.7b", heads=32, head_dim=128, batch=64, context=1024)]
        cases += [dict(model=m, heads=self.HEADS[m][0], head_dim=self.HEADS[m][1], batch=b, context=c)
                  for m in ("opt-1.3b", "opt-13b") for b in (8, 64, 256) for c in (1024, 2048)]
        return cases

    def case_name(self, c: dict) -> str:
        return f"{c['model']} b{c['batch']} ctx{c['context']}"

    def candidates(self, c: dict, smoke: bool) -> list[dict]:
        if smoke:
            return [{}, dict(block_n=16, num_warps=2, num_stages=2, num_splits=2)]
        tokens = lambda kib: kib * 1024 // (c["head_dim"] * 2)   # noqa: E731  (fp16 K tile of kib KB)
        # (K tile KB, warps, stages) beside the launcher's own choice ({} below): unpipelined,
        # deeper pipelines, more and fewer warps, smaller and larger tiles.
        tiles = [(16, 4, 1), (16, 4, 4), (16, 8, 3), (16, 8, 4), (16, 2, 3), (8, 4, 3), (8, 4, 4),
                 (8, 4, 5), (8, 2, 4), (32, 4, 3), (32, 8, 3), (4, 2, 5)]
        return [{}] + [dict(block_n=tokens(kib), num_warps=w, num_stages=s) for kib, w, s in tiles]

    def refinements(self, c: dict, best: dict, smoke: bool) -> list[dict]:
        if smoke:
            return []
        tried = self.resolve(c, best)["num_splits"]
        return [dict(self.resolve(c, best), num_splits=s) for s in self.SPLITS if s != tried]

    def resolve(self, c: dict, config: dict) -> dict:
        """The explicit launch a (possibly partial) configuration makes at this shape."""
        max_tokens = -(-c["context"] // BLOCK_SIZE) * BLOCK_SIZE
        default = paged_decode.default_config(c["batch"], c["heads"], c["head_dim"], DTYPE, max_tokens, sms=SMS)
        return {**default._asdict(), **config}

    def compile_variants(self, c: dict, smoke: bool) -> list[dict]:
        """Every launch the sweep may make at this shape, the refinements of every candidate
        included (the best one is known only after timing)."""
        out = []
        for cand in self.candidates(c, smoke):
            out.append(self.resolve(c, cand))
            out += self.refinements(c, cand, smoke)
        return out

    def compile_group(self, c: dict):
        # Kernel arguments depend on head_dim and the table width only (strides are multiples
        # of 16 for every OPT head count), so one shape per group compiles for all of them.
        return (c["head_dim"], c["context"])

    def compile_unit(self, config: dict):
        # Split counts of one tile configuration share its kernel: one worker compiles them all.
        return tuple(sorted((k, v) for k, v in config.items() if k != "num_splits"))

    def inputs(self, c: dict, full: bool = True) -> dict:
        b, h, d, ctx = c["batch"], c["heads"], c["head_dim"], c["context"]
        g = torch.Generator(device=DEVICE).manual_seed(ctx + b)
        bps = -(-ctx // BLOCK_SIZE)
        x = dict(q=torch.randn(b, h, d, generator=g, device=DEVICE, dtype=DTYPE),
                 seq_lens=torch.full((b,), ctx, dtype=torch.int32, device=DEVICE), scale=d ** -0.5)
        if not full:
            # compile only: the kernels see the same argument types, alignments and table width,
            # reading a small cache through a table of random block ids.
            blocks = 64
            x["key_cache"] = torch.randn(blocks, BLOCK_SIZE, h, d, generator=g, device=DEVICE, dtype=DTYPE)
            x["value_cache"] = torch.randn_like(x["key_cache"])
            x["block_tables"] = torch.randint(0, blocks, (b, bps), generator=g, device=DEVICE, dtype=torch.int32)
            return x
        keys = torch.randn(b, h, bps * BLOCK_SIZE, d, generator=g, device=DEVICE, dtype=DTYPE)
        values = torch.randn_like(keys)
        perm = torch.randperm(b * bps, generator=g, device=DEVICE)
        cache_shape = (b * bps, BLOCK_SIZE, h, d)
        x["key_cache"] = torch.empty(cache_shape, device=DEVICE, dtype=DTYPE)
        x["value_cache"] = torch.empty(cache_shape, device=DEVICE, dtype=DTYPE)
        # block j of sequence i holds its tokens j*16 .. j*16+15 and sits at perm[i*bps + j]
        x["key_cache"][perm] = keys.transpose(1, 2).reshape(cache_shape)
        x["value_cache"][perm] = values.transpose(1, 2).reshape(cache_shape)
        x["block_tables"] = perm.view(b, bps).to(torch.int32)
        x["keys"], x["values"] = keys[:, :, :ctx], values[:, :, :ctx]
        return x

    def ours(self, x: dict, config: dict):
        return lambda: paged_decode.paged_decode_attention(
            x["q"], x["key_cache"], x["value_cache"], x["block_tables"], x["seq_lens"], x["scale"], **config)

    def peer(self, x: dict):
        query = x["q"][:, :, None]
        return lambda: F.scaled_dot_product_attention(query, x["keys"], x["values"], scale=x["scale"])

    def as_peer_layout(self, out: torch.Tensor, x: dict) -> torch.Tensor:
        return out[:, :, None]

    def peer_parts(self, x: dict) -> dict:
        return {}

    def bytes_moved(self, c: dict) -> int:
        elements = c["batch"] * c["heads"] * c["head_dim"]
        return (2 * c["context"] + 2) * elements * DTYPE.itemsize

    def flops(self, c: dict) -> int:
        return 4 * c["batch"] * c["heads"] * c["head_dim"] * c["context"]


class Prefill:
    """Varlen prefill over equal-length prompts with no cached context, against causal SDPA on
    contiguous [batch, heads, L, head_dim] tensors."""
    name, peer_name = "prefill", "sdpa"
    HEADS = {"opt-1.3b": (32, 64), "opt-2.7b": (32, 80), "opt-6.7b": (32, 128), "opt-13b": (40, 128)}
    # (block_m, block_n, num_warps, num_stages) per padded head_dim: the 2026-11-26 defaults and
    # their neighbours, the sm_90 128x128 tile, fewer stages, 4-warp 128-row tiles, smaller keys.
    # At head_dim 128 also one 4-warp warpgroup per 64 query rows (not timed yet: they spilled
    # before the output store went by row pointers): two such programs fit an SM and run their
    # softmax and their wgmmas out of step, where one 8-warp program's two warpgroups wait on the
    # same barriers. At head_dim 64 that shape won every shape swept.
    TILES = {64: [(128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (128, 64, 4, 2), (128, 64, 8, 3),
                  (64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 3), (128, 32, 4, 3)],
             128: [(128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 8, 4),
                   (128, 32, 8, 3), (64, 64, 8, 3), (64, 64, 8, 2), (64, 32, 8, 3),
                   (64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 3)]}

    def cases(self, smoke: bool) -> list[dict]:
        if smoke:
            return [dict(model="tiny", heads=2, head_dim=64, batch=2, length=40)]
        return [dict(model=m, heads=h, head_dim=d, batch=b, length=L)
                for b, L in ((8, 1024), (1, 2048), (64, 128)) for m, (h, d) in self.HEADS.items()]

    def case_name(self, c: dict) -> str:
        return f"{c['model']} b{c['batch']} L{c['length']}"

    def candidates(self, c: dict, smoke: bool) -> list[dict]:
        if smoke:
            persistent = _short(attention.Tiles(64, 64, 4, 1, persistent=True))
            q_smem = _short(attention.Tiles(32, 16, 4, 2, True, q_smem=True, max_registers=128))
            return [{}, dict(ungrouped=True), dict(tiles=(32, 16, 4, 2)), dict(tiles=persistent)] + (
                [dict(tiles=(32, 16, 4, 2, True)), dict(tiles=(128, 16, 4, 2, False, True, True)),
                 dict(tiles=q_smem)] if CAPABILITY >= 90 else [])
        pad = 64 if c["head_dim"] <= 64 else 128
        # sm_90+, the candidates with an option, as the compile check builds them (on sm_80 the
        # padded 128-wide tiles spill): q and the off-diagonal K/V tiles by TMA; head_dim 80
        # padded to 128 (it runs as 64 + 16 by default); the warp-specialised kernel (no sweep
        # shape has cached context); each query block's key tiles as one masked loop (one_loop);
        # q kept in shared memory (q_smem), some with a register cap; the persistent kernel where
        # a prompt fits its tile
        options = []
        # the wgmma kernel (sm_90 alone) first after the default: the newest kernel, the one a
        # short budget should reach
        # (the persistent form only where a prompt fits its tile: elsewhere the launcher runs
        # the default instead)
        wgmma = [t for t in attention_tiles.WGMMA_CANDIDATES.get(c["head_dim"], [])
                 if CAPABILITY == 90 and not (attention_tiles.one_tile_per_prompt(t) and c["length"] > t.block_m)
                 and _wgmma_probe_passed(c, t)]
        if CAPABILITY >= 90:
            options = (attention.TMA_CANDIDATES[pad] + attention.WS_CANDIDATES[pad]
                       + attention.ONE_LOOP_CANDIDATES[pad] + attention.Q_SMEM_CANDIDATES[pad]
                       + [t for t in attention.PERSISTENT_CANDIDATES[pad] if c["length"] <= t.block_m])
            options += attention.PADDED_80_CANDIDATES if c["head_dim"] == 80 else []
        # the default tiles again with every head in one group (the grid's order before head
        # groups), so the sweep times what the groups change where a batch's K/V outgrow L2
        return ([{}, dict(ungrouped=True)] + [dict(tiles=_short(t)) for t in wgmma]
                + [dict(tiles=t) for t in self.TILES[pad]] + [dict(tiles=_short(t)) for t in options])

    def refinements(self, c: dict, best: dict, smoke: bool) -> list[dict]:
        return []

    def resolve(self, c: dict, config: dict) -> dict:
        if config:
            return config
        # (no sweep shape has cached context, and ours() says so: the context-free default)
        return dict(tiles=_short(attention.default_tiles(c["head_dim"], DTYPE, c["batch"] * c["length"], c["batch"],
                                                         CAPABILITY, context_free=True, max_query_len=c["length"])))

    def compile_variants(self, c: dict, smoke: bool) -> list[dict]:
        return [self.resolve(c, cand) for cand in self.candidates(c, smoke)]

    def compile_group(self, c: dict):
        return (c["head_dim"],)   # no kernel argument depends on batch, length or head count

    def compile_unit(self, config: dict):
        return json.dumps(config)

    def inputs(self, c: dict, full: bool = True) -> dict:
        b, L, h, d = c["batch"], c["length"], c["heads"], c["head_dim"]
        if not full:
            b, L = 1, min(L, 256)
        g = torch.Generator(device=DEVICE).manual_seed(L + b)
        qkv = torch.randn(b * L, 3, h, d, generator=g, device=DEVICE, dtype=DTYPE)
        q, k, v = qkv.unbind(1)
        i32 = dict(dtype=torch.int32, device=DEVICE)
        # No cached context: one (never read) cache block and an empty table row per sequence.
        cache = torch.zeros(1, BLOCK_SIZE, h, d, device=DEVICE, dtype=DTYPE)
        x = dict(q=q, k=k, v=v, key_cache=cache, value_cache=cache.clone(),
                 cu_seqlens=torch.arange(0, b * L + 1, L, **i32), context_lens=torch.zeros(b, **i32),
                 block_tables=torch.zeros(b, 1, **i32), scale=d ** -0.5, batch=b, length=L)
        if full:
            x["padded"] = [t.reshape(b, L, h, d).transpose(1, 2).contiguous() for t in (q, k, v)]
        return x

    def ours(self, x: dict, config: dict):
        config = dict(config)
        # ungrouped: an L2 that holds any batch, so one group of every head
        l2 = (mock.patch.object(attention, "l2_bytes", lambda device: float("inf")) if config.pop("ungrouped", False)
              else contextlib.nullcontext())

        def call():
            with l2:
                # the host knows there is no cached context, and the prompts' length, as the engine does
                return attention.prefill_attention(
                    x["q"], x["k"], x["v"], x["key_cache"], x["value_cache"], x["cu_seqlens"], x["context_lens"],
                    x["block_tables"], x["scale"], max_context_len=0, max_query_len=x["length"], **config)
        return call

    def peer(self, x: dict):
        q, k, v = x["padded"]
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=x["scale"])

    def as_peer_layout(self, out: torch.Tensor, x: dict) -> torch.Tensor:
        return out.view(x["batch"], x["length"], *out.shape[1:]).transpose(1, 2)

    def peer_parts(self, x: dict) -> dict:
        return {}

    def bytes_moved(self, c: dict) -> int:
        return 4 * c["batch"] * c["length"] * c["heads"] * c["head_dim"] * DTYPE.itemsize

    def flops(self, c: dict) -> int:
        return 4 * c["batch"] * c["heads"] * c["head_dim"] * c["length"] ** 2 // 2


# What benchmarks/wgmma_probe.py found (on a GPU, once a run): {"results": label -> error or "",
# "note": ..., "seconds": how long it took}. The Gluon kernel's first launches happen there, in
# a child process with a time limit, since a hang would cost the whole sweep; the sweep times
# only the candidates it passed.
WGMMA_PROBE: dict = {}
# Seconds the probe's children may take (a hang costs the sweep this much of its budget, or
# wgmma_probe.GRACE past the last of the other children, whichever comes first).
PROBE_TIMEOUT = 150.0


def _wgmma_probe_passed(case: dict, tiles: attention.Tiles) -> bool:
    """Whether to time wgmma candidate `tiles` at `case`'s head_dim: off a GPU always (the list
    the compile check covers; nothing runs), on one where the probe ran it right."""
    if not ON_GPU:
        return True
    from wgmma_probe import _label as probe_label, probe
    if not WGMMA_PROBE:
        try:
            # every candidate's child at once, each compiling its own variants: 24 cases on the
            # 16 cores of the GPU hosts, where 8 passed within the default 90 s (2026-11-27)
            started = time.monotonic()
            results, note = probe(timeout=PROBE_TIMEOUT)
        except Exception as err:   # the sweep goes on without the Gluon kernel, saying why
            results, note = {}, f"the probe itself failed: {_error_text(err)}"
        # (its share of the sweep's budget, which it spends before the first wgmma timing)
        WGMMA_PROBE.update(results=results, note=note, seconds=round(time.monotonic() - started, 1))
    return WGMMA_PROBE["results"].get(probe_label(case["head_dim"], tiles)) == ""


def _trimmed(full: tuple, plain: tuple, keep: int) -> tuple:
    """`full` without its trailing fields equal to `plain`'s (the defaults), keeping at least
    `keep`: the shortest tuple that says the launch, so that labels stay short."""
    n = len(full)
    while n > keep and full[n - 1] == plain[n - 1]:
        n -= 1
    return full[:n]


def _short(tiles: attention.Tiles) -> tuple:
    """Prefill tiles as the shortest tuple that says them: (128, 64, 8, 3, True)."""
    return _trimmed(tuple(tiles), tuple(attention.Tiles(*tiles[:4])), 4)


def _launch(*tiles, **options) -> tuple:
    """A fused-linear launch (ll.GemmLaunch) as the shortest tuple that says it:
    _launch(16, 128, 128, 4, 3, overlap=True)."""
    return _trimmed(tuple(ll.GemmLaunch(*tiles, **options)), tuple(ll.GemmLaunch(*tiles)), len(tiles))


class LnQkv:
    """Fused LayerNorm + QKV projection (and LayerNorm + fc1 + ReLU) against F.layer_norm then
    F.linear (cuBLAS; fc1 with the ReLU in its epilogue)."""
    name, peer_name = "ln_qkv", "layer_norm+linear"
    HIDDEN = {"opt-1.3b": 2048, "opt-6.7b": 4096, "opt-13b": 5120}
    # (block_m, block_n, block_k, num_warps, num_stages): weight-streaming shapes for skinny M
    # (short M tile, wide K, deep pipelines, narrow and wide N), and square-ish ones at 64 rows.
    SKINNY = [(16, 64, 128, 4, 4), (16, 32, 128, 4, 4), (16, 64, 256, 4, 3), (16, 32, 256, 4, 4),
              (16, 128, 128, 4, 3), (16, 64, 64, 4, 6), (16, 128, 64, 4, 4), (16, 64, 256, 8, 3),
              (16, 16, 256, 4, 4)]
    SIXTY_FOUR = [(64, 64, 64, 4, 4), (64, 64, 128, 4, 3), (64, 128, 64, 4, 3), (64, 32, 128, 4, 4),
                  (32, 64, 128, 4, 4), (16, 64, 128, 4, 4), (64, 128, 64, 8, 3), (64, 64, 64, 4, 5)]
    # Launch options (kernels/gemm_config.py GemmLaunch), not timed yet: the statistics from
    # their own launch (stats_kernel), and split-K (split_k GEMM programs per output tile, then a
    # reduce launch), so that skinny GEMMs fill every SM instead of 48-120 of 132.
    SKINNY_OPTIONS = [_launch(16, 128, 128, 4, 3, stats_kernel=True), _launch(16, 128, 128, 4, 3, split_k=2),
                      _launch(16, 128, 128, 4, 3, split_k=3), _launch(16, 128, 128, 4, 3, split_k=4),
                      _launch(16, 64, 128, 4, 4, split_k=2), _launch(16, 64, 128, 4, 4, split_k=4),
                      _launch(16, 64, 256, 8, 3, split_k=2), _launch(16, 32, 256, 4, 4, split_k=2)]
    SIXTY_FOUR_OPTIONS = [_launch(64, 128, 64, 8, 3, stats_kernel=True),
                          _launch(64, 64, 128, 4, 3, stats_kernel=True),
                          _launch(32, 64, 128, 4, 4, stats_kernel=True),
                          _launch(16, 64, 128, 4, 4, stats_kernel=True), _launch(64, 128, 64, 8, 3, split_k=2),
                          _launch(64, 128, 64, 8, 3, split_k=4), _launch(64, 64, 128, 4, 3, split_k=2),
                          _launch(32, 64, 128, 4, 4, split_k=2)]
    # normalize_first: our LayerNorm launch, then our plain GEMM on its output, as the torch pair
    # runs; its A tiles skip the registers, where the fused loop normalises them again in every
    # program of a row tile (4x the instructions per K step at 64 rows). Also tells whether the
    # GEMM loop itself keeps up with cuBLAS (the `linear alone` time).
    SKINNY_FIRST = [_launch(16, 128, 128, 4, 3, normalize_first=True),
                    _launch(16, 128, 128, 4, 3, split_k=4, normalize_first=True),
                    _launch(16, 64, 128, 4, 4, split_k=2, normalize_first=True)]
    SIXTY_FOUR_FIRST = [_launch(64, 128, 64, 8, 3, normalize_first=True),
                        _launch(64, 128, 64, 8, 3, split_k=2, normalize_first=True),
                        _launch(64, 128, 64, 8, 3, split_k=4, normalize_first=True),
                        _launch(64, 64, 128, 4, 3, normalize_first=True),
                        _launch(64, 64, 128, 4, 3, split_k=2, normalize_first=True)]
    # overlap: the weight stream starts before what the GEMM waits on, the statistics pass or
    # (PDL) the launch before; the fused, statistics-kernel, normalize_first and split forms of
    # the shapes above, each with it.
    SKINNY_OVERLAP = [_launch(16, 128, 128, 4, 3, overlap=True), _launch(16, 64, 256, 8, 3, overlap=True),
                      _launch(16, 128, 128, 4, 3, stats_kernel=True, overlap=True),
                      _launch(16, 128, 128, 4, 3, normalize_first=True, overlap=True),
                      _launch(16, 128, 128, 4, 3, split_k=2, overlap=True),
                      _launch(16, 128, 128, 4, 3, split_k=4, overlap=True),
                      _launch(16, 64, 128, 4, 4, split_k=2, overlap=True)]
    SIXTY_FOUR_OVERLAP = [_launch(64, 64, 128, 4, 3, overlap=True),
                          _launch(64, 128, 64, 8, 3, stats_kernel=True, overlap=True),
                          _launch(64, 64, 128, 4, 3, stats_kernel=True, overlap=True),
                          _launch(32, 64, 128, 4, 4, stats_kernel=True, overlap=True),
                          _launch(64, 128, 64, 8, 3, normalize_first=True, overlap=True),
                          _launch(64, 64, 128, 4, 3, normalize_first=True, overlap=True),
                          _launch(64, 128, 64, 8, 3, split_k=2, normalize_first=True, overlap=True),
                          _launch(64, 128, 64, 8, 3, split_k=2, overlap=True)]

    # tma: x and weight tiles by TMA bulk copies (sm_90) instead of cp.async; mostly where the
    # GEMM reads x as it is (normalize_first), with overlap, split or not, and one stage deeper
    # or two (ll._TMA_OPTION_CONFIGS).
    SKINNY_TMA = [_launch(16, 128, 128, 4, 3, tma=True),
                  _launch(16, 128, 128, 4, 3, normalize_first=True, overlap=True, tma=True),
                  _launch(16, 128, 128, 4, 3, split_k=2, normalize_first=True, overlap=True, tma=True),
                  _launch(16, 128, 128, 4, 4, normalize_first=True, overlap=True, tma=True)]
    SIXTY_FOUR_TMA = [_launch(64, 128, 64, 8, 3, normalize_first=True, tma=True),
                      _launch(64, 128, 64, 8, 3, normalize_first=True, overlap=True, tma=True),
                      _launch(64, 64, 128, 4, 3, normalize_first=True, overlap=True, tma=True),
                      _launch(64, 128, 64, 8, 3, split_k=2, normalize_first=True, overlap=True, tma=True),
                      _launch(64, 128, 64, 8, 3, stats_kernel=True, overlap=True, tma=True),
                      _launch(64, 128, 64, 8, 5, normalize_first=True, overlap=True, tma=True),
                      _launch(64, 64, 128, 4, 4, normalize_first=True, overlap=True, tma=True)]
    # The 64-row default's form (its plain GEMM after the LayerNorm launch) at other tiles, for
    # the gap to cuBLAS's GEMM alone at opt-6.7b / 13b (the sweep's `our linear` part times it): a
    # 6-deep ring of 64-wide K steps (two programs an SM), 64x128x128 at 8 warps (one program an
    # SM, 48 KB a stage), and 64x32 tiles (twice the programs) (ll._TMA_FIRST_CONFIGS).
    SIXTY_FOUR_WIDER = [_launch(64, 64, 64, 4, 6, normalize_first=True, overlap=True, tma=True),
                        _launch(64, 128, 128, 8, 3, normalize_first=True, overlap=True, tma=True),
                        _launch(64, 32, 128, 4, 4, normalize_first=True, overlap=True, tma=True)]

    # cublas: our LayerNorm launch, then cuBLAS's GEMM (its tiles unused: the 64-row default's),
    # for 64 rows, where our GEMM after the LayerNorm launch trailed cuBLAS's alone at opt-6.7b /
    # 13b (2026-11-27); with fc1 too, whose ReLU rides cuBLASLt's epilogue as in the torch pair.
    # With overlap the LayerNorm launch also asks L2 for the weight's first columns.
    SIXTY_FOUR_CUBLAS = [_launch(64, 64, 128, 4, 3, cublas=True), _launch(64, 64, 128, 4, 3, overlap=True, cublas=True)]

    def cases(self, smoke: bool) -> list[dict]:
        if smoke:
            return [dict(model="tiny", hidden=64, tokens=5)]
        qkv = [dict(model=m, hidden=h, tokens=t) for t in (1, 8, 64) for m, h in self.HIDDEN.items()]
        # LN + fc1 + ReLU (4 x hidden outputs), which kernels="auto" runs at the same launches
        # up to 64 rows: the default alone beside its torch pair (the ReLU in cuBLASLt's
        # epilogue). First: each shape's share of the time left is even, and these few launches
        # leave most of theirs to the QKV shapes after them.
        return [dict(model=m, hidden=h, tokens=t, fc1=True) for t in (1, 64) for m, h in self.HIDDEN.items()] + qkv

    @staticmethod
    def _out(c: dict) -> int:
        return (4 if c.get("fc1") else 3) * c["hidden"]

    def case_name(self, c: dict) -> str:
        return f"{c['model']} tokens={c['tokens']}" + " fc1" * bool(c.get("fc1"))

    def candidates(self, c: dict, smoke: bool) -> list[dict]:
        if smoke:
            return [{}, dict(config=(16, 32, 32, 4, 2)),
                    dict(config=_launch(16, 32, 32, 4, 2, split_k=2, normalize_first=True)),
                    dict(config=_launch(16, 32, 32, 4, 2, split_k=2, overlap=True)),
                    dict(config=_launch(16, 32, 32, 4, 2, cublas=True)),
                    dict(config=_launch(16, 32, 32, 4, 2, overlap=True, cublas=True))]
        skinny = c["tokens"] <= 16
        cublas = [] if skinny else [dict(config=t) for t in self.SIXTY_FOUR_CUBLAS]
        if c.get("fc1"):
            return [{}] + cublas
        # (tma only on sm_90+: elsewhere the launcher runs those as pointer loads, duplicates)
        tma = (self.SKINNY_TMA if skinny else self.SIXTY_FOUR_TMA + self.SIXTY_FOUR_WIDER) if CAPABILITY >= 90 else []
        if skinny:
            table = self.SKINNY + self.SKINNY_OPTIONS + self.SKINNY_FIRST + self.SKINNY_OVERLAP + tma
            return [{}] + [dict(config=t) for t in table]
        table = self.SIXTY_FOUR + self.SIXTY_FOUR_OPTIONS + self.SIXTY_FOUR_FIRST + self.SIXTY_FOUR_OVERLAP + tma
        # the default (normalize_first) with its LayerNorm launch in the chunked form it ran in
        # before whole rows (the 2026-11-27 sweeps): what the one-tile form saves
        return [{}, dict(chunked_ln=True)] + cublas + [dict(config=t) for t in table]

    def refinements(self, c: dict, best: dict, smoke: bool) -> list[dict]:
        return []

    def resolve(self, c: dict, config: dict) -> dict:
        if "config" in config:
            return config
        launch = ll.default_launch(c["tokens"], self._out(c), c["hidden"], DTYPE, SMS, has_ln=True)
        return dict(config=_trimmed(tuple(launch), tuple(ll.GemmLaunch(*launch[:5])), 5), **config)

    def compile_variants(self, c: dict, smoke: bool) -> list[dict]:
        return [self.resolve(c, cand) for cand in self.candidates(c, smoke)]

    def compile_group(self, c: dict):
        # The JIT specialises M (1 is a constant, 64 a multiple of 16); every OPT width is a
        # multiple of 16, so the smallest hidden size compiles for all of them; fc1 adds the ReLU.
        return (c["tokens"],) + (("fc1",) if c.get("fc1") else ())

    def compile_unit(self, config: dict):
        return json.dumps(config)

    def inputs(self, c: dict, full: bool = True) -> dict:
        t, h = c["tokens"], c["hidden"] if full else min(c["hidden"], 2048)
        g = torch.Generator(device=DEVICE).manual_seed(h + t)

        def rand(*shape, scale=1.0):
            return (torch.randn(*shape, generator=g, device=DEVICE) * scale).to(DTYPE)
        out = self._out(dict(c, hidden=h))
        return dict(x=rand(t, h), ln_w=rand(h, scale=0.1) + 1, ln_b=rand(h, scale=0.1),
                    w=rand(out, h, scale=h ** -0.5), b=rand(out, scale=0.1), relu=bool(c.get("fc1")))

    def ours(self, x: dict, config: dict):
        config = dict(config)
        # chunked_ln: no row width held whole, so the LayerNorm launch walks its rows in chunks
        rows = (mock.patch.object(gemm_config, "_LN_ROW_TILE_MAX", 0) if config.pop("chunked_ln", False)
                else contextlib.nullcontext())

        def call():
            with rows:
                return ll.layernorm_linear(x["x"], x["ln_w"], x["ln_b"], x["w"], x["b"], EPS, x["relu"], **config)
        return call

    def peer(self, x: dict):
        # what kernels="auto" runs past 64 rows: F.layer_norm, then F.linear (fc1: with the ReLU
        # in cuBLASLt's bias epilogue)
        return lambda: ll.layernorm_linear_ref(x["x"], x["ln_w"], x["ln_b"], x["w"], x["b"], EPS, x["relu"])

    def as_peer_layout(self, out: torch.Tensor, x: dict) -> torch.Tensor:
        return out

    def peer_parts(self, x: dict) -> dict:
        """The pair's two launches alone, what a fused kernel has to beat on each side; and ours:
        our LayerNorm launch, and our plain GEMM at the default launch's tiles and options on rows
        already normalised (what normalize_first runs after that launch, the default from 17
        rows; up to 16, what the fused loop costs without its LayerNorm)."""
        h = F.layer_norm(x["x"], x["x"].shape[-1:], x["ln_w"], x["ln_b"], EPS)
        (tokens, hidden), out = h.shape, x["w"].shape[0]
        launch = tuple(ll.default_launch(tokens, out, hidden, DTYPE, SMS, has_ln=True))
        return {"layer_norm": lambda: F.layer_norm(x["x"], x["x"].shape[-1:], x["ln_w"], x["ln_b"], EPS),
                "linear": lambda: ll.layernorm_linear_ref(h, None, None, x["w"], x["b"], EPS, x["relu"]),
                "our layer_norm": lambda: ll.layer_norm(x["x"], x["ln_w"], x["ln_b"], EPS),
                "our linear": lambda: ll.layernorm_linear(h, None, None, x["w"], x["b"], EPS, x["relu"],
                                                          config=launch)}

    def bytes_moved(self, c: dict) -> int:
        h, t, out = c["hidden"], c["tokens"], self._out(c)
        return (out * h + out + 2 * h + t * h + t * out) * DTYPE.itemsize

    def flops(self, c: dict) -> int:
        return 2 * c["tokens"] * self._out(c) * c["hidden"]


FAMILIES = {f.name: f for f in (Decode(), Prefill(), LnQkv())}


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------

def _sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def gpu_time(fn) -> tuple[float, str]:
    """(median device time of one call with L2 flushed before it, how it was timed): "graph"
    from CUDA graph replays, or where the call cannot be captured "events" from CUDA events
    around each call (do_bench, which charges a host path longer than its flush); off-GPU
    "wall", the wall clock of a few calls."""
    if ON_GPU:
        return device_time.timed_us(fn)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6, "wall"


def gpu_us(fn) -> float:
    return gpu_time(fn)[0]


def synced_us(fn) -> float:
    """Median wall time of a call followed by a synchronise: launch overhead included, as the
    pytest-benchmark files measure."""
    times = []
    for _ in range(10 if ON_GPU else 2):
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def copy_gbps() -> float:
    """Device copy bandwidth in GB/s (device_time.copy_gbps: bytes read plus written, the faster
    of torch's copy and an elementwise kernel); 0 off-GPU."""
    return device_time.copy_gbps() if ON_GPU else 0.0


def _mismatch(out: torch.Tensor, ref: torch.Tensor) -> str:
    """Empty when `out` matches the peer's `ref` to fp16 accuracy; else what is wrong."""
    if out.shape != ref.shape:
        return f"shape {tuple(out.shape)} != {tuple(ref.shape)}"
    out, ref = out.float(), ref.float()
    if not torch.isfinite(out).all():
        return "non-finite output"
    err = (out - ref).abs().max().item()
    tol = 2e-2 * ref.abs().max().item() + 1e-3
    return "" if err <= tol else f"max error {err:.3g} > {tol:.3g}"


def _sig(value: float) -> float:
    return float(f"{value:.4g}")   # four significant digits, however small the ratio


def _error_text(err: BaseException) -> str:
    lines = str(err).strip().splitlines() or [""]
    return f"{type(err).__name__}: {lines[-1][:160]}"


# --------------------------------------------------------------------------------------------
# Parallel compile: worker processes launch every variant once on small inputs of the same
# argument types, which fills Triton's on-disk cache for the measuring process. A launch that
# fails there is not launched again by the measuring process: one that breaks the CUDA context
# (an illegal address: every later call fails too) would cost the rest of the sweep.
# --------------------------------------------------------------------------------------------

_WORKER_INPUTS: dict = {}
_WORKER_CONTEXT_LOST = False   # set in a worker once a launch left its CUDA context unusable


def failure_key(family, case: dict, config: dict) -> tuple:
    """What identifies a launch across the shapes of one compile group: a worker ran it at the
    group's first shape, the measuring process looks it up at each shape."""
    return family.name, json.dumps(family.compile_group(case)), _label(family.resolve(case, config))


def _cuda_usable() -> bool:
    try:
        torch.zeros(1, device=DEVICE).add_(1).item()
        return True
    except Exception:
        return False


def _compile_task(task: tuple) -> list[tuple[tuple, str]]:
    """Launch each of a task's configs once; returns (failure_key, error) for those that fail.
    Once one has broken this process's CUDA context the rest are left untried (not failed):
    the measuring process compiles them."""
    global _WORKER_CONTEXT_LOST
    family_name, case, configs = task
    family = FAMILIES[family_name]
    key = (family_name, family.compile_group(case))
    if key not in _WORKER_INPUTS:
        _WORKER_INPUTS.clear()
        try:
            _WORKER_INPUTS[key] = family.inputs(case, full=False)
        except Exception:   # e.g. out of memory beside the other workers: leave it to the measuring
            return []
    failures = []
    for config in configs:
        if _WORKER_CONTEXT_LOST:
            break
        try:
            family.ours(_WORKER_INPUTS[key], config)()
            _sync()
        except Exception as err:
            failures.append((failure_key(family, case, config), _error_text(err)))
            _WORKER_CONTEXT_LOST = ON_GPU and not _cuda_usable()
    return failures


def compile_tasks(families: list, smoke: bool) -> list[tuple]:
    """(kernel, shape, launches) tasks, one per compile unit of each compile group, every
    distinct launch once: prefill (the slowest compiles) first."""
    units: dict = {}
    for family in sorted(families, key=lambda f: f.name != "prefill"):
        for case in family.cases(smoke):
            group = (family.name, family.compile_group(case))
            for config in family.compile_variants(case, smoke):
                _, configs = units.setdefault((group, family.compile_unit(config)), (case, []))
                if config not in configs:
                    configs.append(config)
    return [(group[0], case, configs) for (group, _), (case, configs) in units.items()]


def precompile(tasks: list, jobs: int, timeout: float) -> dict:
    start = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    pool = ctx.Pool(jobs)
    done, failures = 0, []
    try:
        results = pool.imap_unordered(_compile_task, tasks)
        while done < len(tasks):
            try:
                failures += results.next(timeout=max(0.0, start + timeout - time.perf_counter()))
            except multiprocessing.TimeoutError:
                break
            done += 1
    finally:
        pool.terminate()   # workers hold only compile caches; the measuring phase compiles the rest
        pool.join()
    return dict(tasks=len(tasks), launches=sum(len(configs) for _, _, configs in tasks), done=done, jobs=jobs,
                seconds=round(time.perf_counter() - start, 1),
                errors=[f"{kernel} {label} (group {group}): {error}" for (kernel, group, label), error in failures],
                failed={key: error for key, error in failures})


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------

def _measure(family, x: dict, config: dict, ref: torch.Tensor) -> dict:
    row = dict(label=_label(config), config=config, us=None, error="")
    try:
        fn = family.ours(x, config)
        row["error"] = _mismatch(family.as_peer_layout(fn(), x), ref)
        if not row["error"]:
            us, row["timing"] = gpu_time(fn)
            row["us"] = round(us, 2)
    except Exception as err:
        row["error"] = _error_text(err)
    return row


def _part_us(fn) -> float | None:
    """One launch of a shape's breakdown alone (family.peer_parts); None where it fails, which
    costs the shape nothing else."""
    try:
        return round(gpu_us(fn), 2)
    except Exception:
        return None


def sweep_case(family, case: dict, deadline: float, smoke: bool, copy_bw: float,
               failed: dict | None = None) -> dict:
    """Every candidate of one shape until `deadline`; the peer first. A candidate in `failed`
    (failure_key -> error, from the parallel compile) is reported with that error, not run."""
    result = dict(kernel=family.name, case=family.case_name(case), shape=case, peer=family.peer_name,
                  bytes=family.bytes_moved(case), flops=family.flops(case), candidates=[], skipped=0)
    try:
        x = family.inputs(case)
        peer = family.peer(x)
        ref = peer()
        peer_us, result["peer_timing"] = gpu_time(peer)
        result["peer_us"] = round(peer_us, 2)
        result["peer_synced_us"] = round(synced_us(peer), 2)
        result["peer_parts_us"] = {name: _part_us(fn) for name, fn in family.peer_parts(x).items()}
    except Exception as err:   # e.g. out of memory: nothing to compare against
        result["error"] = _error_text(err)
        return result
    pending = family.candidates(case, smoke)
    refined = False
    while pending:
        config = pending.pop(0)
        if time.perf_counter() > deadline:
            result["skipped"] += 1 + len(pending)
            break
        known = (failed or {}).get(failure_key(family, case, config))
        if known:
            result["candidates"].append(dict(label=_label(config), config=config, us=None,
                                             error=f"in the parallel compile: {known}"))
        else:
            result["candidates"].append(_measure(family, x, config, ref))
        if not pending and not refined:
            refined = True
            timed = [r for r in result["candidates"] if r["us"] is not None]
            if timed:
                best = min(timed, key=lambda r: r["us"])["config"]
                pending = family.refinements(case, best, smoke)
    timed = [r for r in result["candidates"] if r["us"] is not None]
    default = next((r for r in result["candidates"] if r["label"] == "default"), None)
    result["default_resolved"] = _label(family.resolve(case, {}))
    if default and default["us"] is not None:
        result["default_us"], result["default_timing"] = default["us"], default.get("timing")
        result["default_synced_us"] = round(synced_us(family.ours(x, {})), 2)
    if timed:
        best = min(timed, key=lambda r: r["us"])
        result.update(best_label=_label(family.resolve(case, best["config"])), best_config=best["config"],
                      best_us=best["us"], best_timing=best.get("timing"),
                      speedup_vs_peer=_sig(result["peer_us"] / best["us"]),
                      best_gbps=round(result["bytes"] / best["us"] / 1e3, 1))
        if result.get("default_us"):
            result["default_speedup_vs_peer"] = _sig(result["peer_us"] / result["default_us"])
        if copy_bw:
            result["best_copy_fraction"] = _sig(result["bytes"] / best["us"] / 1e3 / copy_bw)
            result["peer_copy_fraction"] = _sig(result["bytes"] / result["peer_us"] / 1e3 / copy_bw)
            if result.get("default_us"):
                result["default_copy_fraction"] = _sig(result["bytes"] / result["default_us"] / 1e3 / copy_bw)
    del x, peer, ref
    if ON_GPU:
        torch.cuda.empty_cache()
    return result


def run(families: list, budget: float, jobs: int, smoke: bool, log=print, save=None) -> dict:
    """Sweep `families` within `budget` seconds; `save(report)` (if given) after every shape, so
    a run killed from outside still leaves what it measured."""
    start = time.perf_counter()
    deadline = start + budget
    meta = dict(device=torch.cuda.get_device_name() if ON_GPU else "cpu (Triton interpreter)",
                date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), torch=torch.__version__,
                dtype=str(DTYPE).removeprefix("torch."), budget_s=budget, smoke=smoke)
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        pass
    failed: dict = {}
    if ON_GPU and jobs > 0:
        tasks = compile_tasks(families, smoke)
        log(f"compiling {sum(len(t[2]) for t in tasks)} launches ({len(tasks)} tasks) in {jobs} processes ...")
        meta["precompile"] = precompile(tasks, jobs, timeout=0.45 * budget)
        failed = meta["precompile"].pop("failed")
        log(f"  {meta['precompile']['done']} done in {meta['precompile']['seconds']} s, "
            f"{len(meta['precompile']['errors'])} failed")
    if WGMMA_PROBE:
        meta["wgmma_probe"] = dict(WGMMA_PROBE)
    meta["copy_gbps"] = 0.0 if smoke else round(copy_gbps(), 1)
    cases = []
    report = dict(meta=meta, goals={f.name: GOALS[f.name] for f in families}, cases=cases)
    for i, family in enumerate(families):
        shares_left = sum(SHARES[f.name] for f in families[i:])
        share = SHARES[family.name] / shares_left
        family_deadline = time.perf_counter() + (deadline - time.perf_counter()) * share
        todo = family.cases(smoke)
        for j, case in enumerate(todo):
            now = time.perf_counter()
            result = sweep_case(family, case, now + (family_deadline - now) / (len(todo) - j), smoke,
                                meta["copy_gbps"], failed)
            cases.append(result)
            log(_summary_line(result))
            meta["elapsed_s"] = round(time.perf_counter() - start, 1)
            if save:
                save(report)
    meta["elapsed_s"] = round(time.perf_counter() - start, 1)
    return report


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def _summary_line(r: dict) -> str:
    if "best_us" not in r:
        return f"{r['kernel']:8} {r['case']:24} no timed candidate ({r.get('error') or 'all failed'})"
    frac = f", {r['best_copy_fraction']:.0%} of copy BW" if r["kernel"] == "decode" and "best_copy_fraction" in r else ""
    return (f"{r['kernel']:8} {r['case']:24} peer {r['peer_us']:9.1f} us  default {_fmt(r.get('default_us')):>9}"
            f"  best {r['best_us']:9.1f} ({r['speedup_vs_peer']:.2f}x peer{frac})  {r['best_label']}")


def _mark(timing: str | None) -> str:
    """* on a time that CUDA events took around each call (it may include launch overhead)."""
    return "*" if timing == "events" else ""


def _fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def markdown(report: dict) -> str:
    meta = report["meta"]
    pre = meta.get("precompile")
    lines = [f"# Tile sweep — {meta['device']}, {meta['date']}", "",
             f"torch {meta['torch']}, triton {meta.get('triton', '?')}, {meta['dtype']}; copy bandwidth "
             f"{meta['copy_gbps'] or 'n/a'} GB/s (1 GiB copy, read + write); sweep {meta['elapsed_s']} s of a "
             f"{meta['budget_s']} s budget"
             + (f"; parallel compile of {pre['launches']} launches: {pre['done']}/{pre['tasks']} tasks in "
                f"{pre['seconds']} s" if pre else "")
             + ".", "",
             "Times are device medians with L2 flushed, from CUDA graph replays (no launch overhead; "
             "a time marked * could not be captured and comes from CUDA events around each call, "
             "do_bench); `synced` is the wall time of a call plus a synchronise (launch overhead "
             "included, as in kernels.md). Speedup = peer time / ours.", ""]
    probe = meta.get("wgmma_probe")
    if probe:
        took = f" ({probe['seconds']} s)" if "seconds" in probe else ""
        lines += [f"Gluon wgmma prefill kernel, first launches (benchmarks/wgmma_probe.py{took}): {probe['note']}"
                  + "".join(f"; {label}: {error or 'right'}" for label, error in probe["results"].items()) + ".", ""]
    for kernel, goal in report["goals"].items():
        rows = [r for r in report["cases"] if r["kernel"] == kernel]
        lines += [f"## {kernel} (goal: {goal})", "",
                  "| shape | peer us (synced) | default us (synced) | default speedup | best us | best speedup "
                  "| best GB/s (of copy) | best config | failed / skipped |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            failed = sum(1 for c in r["candidates"] if c["error"])
            frac = f" ({r['best_copy_fraction']:.0%})" if "best_copy_fraction" in r else ""
            lines.append(
                f"| {r['case']} | {_fmt(r.get('peer_us'))}{_mark(r.get('peer_timing'))} "
                f"({_fmt(r.get('peer_synced_us'))}) | "
                f"{_fmt(r.get('default_us'))}{_mark(r.get('default_timing'))} ({_fmt(r.get('default_synced_us'))}) | "
                f"{_fmt(r.get('default_speedup_vs_peer'), '.2f')} | "
                f"{_fmt(r.get('best_us'))}{_mark(r.get('best_timing'))} | "
                f"{_fmt(r.get('speedup_vs_peer'), '.2f')} | {_fmt(r.get('best_gbps'), '.0f')}{frac} | "
                f"{r.get('best_label', r.get('error', '-'))} | {failed} / {r['skipped']} |")
        lines += ["", "Default configurations: " + "; ".join(f"{r['case']}: {r.get('default_resolved', '?')}"
                                                             for r in rows), ""]
    failures = [(r["case"], c) for r in report["cases"] for c in r["candidates"] if c["error"]]
    if failures or (pre and pre["errors"]):
        lines += ["## Failed candidates", ""]
        lines += [f"- {case}: {c['label']}: {c['error']}" for case, c in failures]
        lines += [f"- compile: {e}" for e in (pre["errors"] if pre else [])]
        lines.append("")
    lines += ["## Every timed candidate (us)", ""]
    for r in report["cases"]:
        timed = sorted((c for c in r["candidates"] if c["us"] is not None), key=lambda c: c["us"])
        parts = "".join(f"; {name} alone {_fmt(us)}" for name, us in r.get("peer_parts_us", {}).items())
        lines.append(f"- {r['kernel']} {r['case']} (peer {_fmt(r.get('peer_us'))}{_mark(r.get('peer_timing'))}"
                     f"{parts}): " + ", ".join(f"{c['label']} {c['us']:.1f}{_mark(c.get('timing'))}" for c in timed))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results", help="folder for sweep.json and sweep.md")
    parser.add_argument("--budget", type=float, default=75.0,
                        help="seconds for the sweep after start-up (imports and CUDA take a few more)")
    parser.add_argument("--jobs", type=int, default=min(12, max(1, (os.cpu_count() or 2) - 2)),
                        help="compile processes (0: compile while measuring)")
    parser.add_argument("--only", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, two or three configurations per kernel")
    args = parser.parse_args(argv)
    if args.budget <= 0:
        parser.error(f"--budget must be positive, got {args.budget}")
    if not (ON_GPU or args.smoke):
        parser.error("the full sweep needs CUDA; use --smoke here")
    families = [FAMILIES[name] for name in FAMILIES if name in args.only]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save(report: dict) -> str:
        (out / "sweep.json").write_text(json.dumps(report, indent=1))
        text = markdown(report)
        (out / "sweep.md").write_text(text)
        return text
    report = run(families, args.budget, 0 if args.smoke else args.jobs, args.smoke,
                 log=lambda line: print(line, flush=True), save=save)
    print(save(report))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
