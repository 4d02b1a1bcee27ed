"""Launch configurations of the prefill-attention kernels (kernels/attention*.py): Tiles, the
tables the launcher picks from per GPU generation (with the sweeps behind each entry), the tile
sweep's candidates, and the checks of an override."""
from __future__ import annotations

from typing import NamedTuple

import torch

from .launch_math import next_pow2 as _next_pow2


class Tiles(NamedTuple):
    """One launch configuration: query rows per program, keys per step, warps, pipeline stages;
    whether the new tokens' q and off-diagonal K/V tiles arrive by TMA (sm_90+; on rows whose
    layout TMA cannot address the launcher keeps pointer loads); whether a head of two
    powers of two (80 = 64 + 16) runs as two exact tiles rather than one padded to 128; and
    whether a batch known to have no cached context runs the warp-specialised kernel
    (attention_ws.py: sm_90+, 4 warps, fp16 / bf16, TMA, heads padded, so tma
    and split_head are moot there; batches that may have context run the main kernel); and
    whether the main kernel runs a query block's new-token key tiles as one causally masked,
    pipelined loop (one_loop: the diagonal tiles' loads overlap the tiles before them; with tma
    only q comes by TMA) rather than an unmasked loop and then the diagonal tiles (the
    warp-specialised kernel always runs one loop); and whether a batch known to have no cached
    context and at most block_m new tokens per sequence runs the persistent kernel
    (attention_persistent.py: one block_m x block_m tile per sequence and head, block_n ==
    block_m; other batches run the main kernel at its default tiles); and whether, with tma,
    the main kernel takes q as a 2-D box of its rows' columns and keeps it in shared memory as
    the QK^T wgmma's operand (q_smem: a 3-D box must be reshaped, which brings q into
    registers for the whole program; q_smem frees them and holds q's shared memory instead;
    where q's heads are not packed back to back in a row, or a head is padded, the launcher
    keeps the 3-D box); and a cap on the registers of a thread (max_registers, ptxas's maxnreg;
    0: the compiler's choice), which lets two 8-warp programs share an SM at 128; and whether a
    batch known to have no cached context runs the Gluon kernel with its wgmma pipeline written
    out (wgmma: kernels/attention_wgmma.py; sm_90 only, fp16 / bf16, head_dim 64 or 128, packed
    heads TMA can address; num_warps 4 or 8 with block_m a multiple of 16 * num_warps, at least
    2 stages and num_stages * block_n >= block_m; other batches run the main kernel at its
    default tiles); with warp_specialize too, the Gluon kernel's warp-specialised form
    (kernels/attention_wgmma_ws.py: 128 query rows a program in two 64-row consumer
    warpgroups fed by one TMA producer warp; num_warps 4, the first consumer's, block_n 64 or
    128, at least 2 stages); and whether, there, the two consumers take turns at the tensor
    cores (pingpong: FlashAttention-3's inter-warpgroup schedule, one's softmax beside the
    other's wgmmas; block_n 128); with persistent instead, the Gluon kernel for short prompts
    (kernels/attention_wgmma_persistent.py: one block_m x block_m tile per sequence and head,
    block_n == block_m, taken in turn by one program an SM that holds num_stages sets of q, k
    and v slots, the next items' copies in flight while one computes; block_m 64 or 128; run
    where the host knows every prompt fits, as the Triton persistent kernel); and with
    warp_specialize (and wgmma) persistent is the warp-specialised Gluon kernel on one program
    an SM, each taking query blocks of any length in turn, the next block's rows and key tiles
    in flight while one finishes (one_tile_per_prompt tells the two apart).
    """
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    tma: bool = False
    split_head: bool = True
    warp_specialize: bool = False
    one_loop: bool = False
    persistent: bool = False
    q_smem: bool = False
    max_registers: int = 0
    wgmma: bool = False
    pingpong: bool = False


# (tile kind, head class) -> tiles, for fp16/bf16. "narrow" serves batches whose sequences
# average at most _NARROW_TOKENS new tokens (short prompts, chunked-prefill steps), "wide" longer
# ones. Head classes (_tile_head_dim): 64 (heads up to 64), 80 (two exact tiles, 64 + 16: OPT-
# 2.7B), 128 (the rest, padded). Every entry compiles without spills for its targets (the compile
# check builds each). On sm_80 that rules out 128-key tiles at head_dim 128: with 8 warps each
# warp owns 16 query rows and holds a 16x128 fp32 score row block beside its accumulator.
# sm_80 (unmeasured there), from the NVIDIA H100 80GB HBM3 sweep of 2026-11-26 (benchmarks/
# results/2026-11-26-h100/sweep.json, kernel medians, fp16, no cached context):
# - narrow: 64x64 tiles, 2 stages (at 128 new tokens a query block's loops run one or two key
#   tiles; not measured beside a long cached context). b64 L128: opt-1.3b (head 64, 4 warps)
#   67.2 us; heads 80 / 128 at 8 warps, opt-2.7b / 6.7b / 13b: 144.3 / 149.1 / 183.7, the best
#   of the nine tile shapes swept at each (4-warp tiles at head 128 were not timed).
# - wide, head 64: 64x64, 4 warps, 3 stages. opt-1.3b b8 L1024 138.2 us, the best; b1 L2048 63.7
#   (best 63.3 at 2 stages).
# - wide, heads 80 / 128: 128x64 at 8 warps; at head 128 on sm_80, 128x32: with the new tokens'
#   store to the cache in its diagonal loop (WRITE_KV) 128x64 spills 32 B there, 128x32 compiles
#   with 200 registers (neither timed on an A100).
_NARROW_TOKENS = 128
_TILES = {
    ("wide", 64): Tiles(64, 64, 4, 3),
    ("wide", 80): Tiles(128, 64, 8, 3),
    ("wide", 128): Tiles(128, 32, 8, 3),
    ("narrow", 64): Tiles(64, 64, 4, 2),
    ("narrow", 80): Tiles(64, 64, 8, 2),
    ("narrow", 128): Tiles(64, 64, 8, 2),
}
# sm_90, from the NVIDIA H200 sweep of 2026-11-27 (benchmarks/results/2026-11-27-h200/sweep.json,
# the same shapes and medians; 4-warp tiles at heads 80 / 128 and TMA timed for the first time).
# One 4-warp warpgroup per 64 query rows won every head-80 / 128 shape: two such programs share
# an SM, and one's softmax runs beside the other's wgmmas, where an 8-warp program's two
# warpgroups wait on the same barriers. TMA won at heads 64 and 128, not at 80 (split into two
# tiles, six descriptors). Before, wide heads 80 / 128 ran 128x128x8x3 and narrow ones 64x64x8x2.
# - wide 64: 64x64x4x3 TMA. opt-1.3b b8 L1024 123.2 us, b1 L2048 56.4: the best (134.8 / 62.9
#   before).
# - wide 80: 64x64x4x3. opt-2.7b b8 L1024 187.7, b1 L2048 86.3: the best (245.6 / 99.3 before).
# - wide 128: 64x64x4x3 TMA. opt-6.7b / 13b b8 L1024 240.5 / 302.9: the best (289.7 / 364.7
#   before); b1 L2048 103.1 / 128.4 (117.9 / 146.0 before; the warp-specialised 128x128x4x2, a
#   sweep candidate, 101.3 / 126.1).
# - narrow 80 / 128: 64x64x4x2. opt-2.7b / 6.7b / 13b b64 L128 84.9 / 127.7 / 158.0: the best
#   (194.0 / 139.3 / 172.1 before).
# - narrow 64: 64x64x4x2 still: 60.7 us at opt-1.3b b64 L128 beside 58.1 for 64x32x4x3, which
#   the H100 had the other way round (67.2 / 68.9).
# From the second NVIDIA H200 sweep of 2026-11-27 (benchmarks/results/2026-11-27-h200-sweep/
# sweep.json, the same shapes and medians, every candidate timed):
# - wide 80: 64x64x4x3 TMA. opt-2.7b b1 L2048 66.4 us, the best (74.8 without TMA); b8 L1024
#   186.0 beside 183.8 without (the best there, q_smem 64x32x4x3 at 173.8, ran 78.5 at L2048).
# - narrow 80: 64x32x4x3 one_loop. opt-2.7b b64 L128 60.6 us, the best (69.2 at 64x64x4x2).
# - narrow 64 / 128 without cached context: the Gluon wgmma kernel (_WGMMA_TILES_SM90 below).
# TMA costs the host about 10 us a call (three descriptors built, then encoded at the launch):
# its entries drop it below _TMA_MIN_TOKENS new tokens, where a call's GPU time is too short
# for the 10-17% it saved at the sweep's 2048 to 8192 tokens to pay for that.
_TMA_MIN_TOKENS = 1024
_TILES_SM90 = {
    **_TILES,
    ("wide", 64): Tiles(64, 64, 4, 3, True),
    ("wide", 80): Tiles(64, 64, 4, 3, True),
    ("wide", 128): Tiles(64, 64, 4, 3, True),
    ("narrow", 80): Tiles(64, 32, 4, 3, one_loop=True),
    ("narrow", 128): Tiles(64, 64, 4, 2),
}
# Sweep candidates with an option (sm_90), per padded head_dim; the compile check builds each and
# the tile sweep times each. TMA: the twin of each sm_90 table entry, and the 8-warp 128x64 tile
# (on the H200, 2026-11-27, 8-13% behind 64x64x4x3 with TMA at every head-128 shape; 128x64x8x4,
# 64x64x8x2 and 128x128x8x3 with TMA, further behind, are no longer timed).
TMA_CANDIDATES = {64: [Tiles(64, 64, 4, 3, True), Tiles(64, 64, 4, 2, True), Tiles(128, 64, 8, 3, True)],
                  128: [Tiles(64, 64, 4, 3, True), Tiles(64, 64, 4, 2, True), Tiles(128, 64, 8, 3, True),
                        Tiles(64, 32, 4, 3, True, one_loop=True)]}
# head_dim 80 padded to one 128-wide tile instead of the 64 + 16 split: the table's wide tile so
# padded, timed beside the split (on the H200 the padded 8-warp tiles ran 292-364 us at opt-2.7b
# b8 L1024, the split 4-warp tile 188).
PADDED_80_CANDIDATES = [Tiles(64, 64, 4, 3, split_head=False)]
# Tiles with one_loop, per padded head_dim: sweep candidates until a GPU has timed them, at the
# 4-warp 64x64 tiles that won the H200 sweep and a 128-row 8-warp one, with q by TMA or not.
# Short prompts gain most, if anything: at 128 tokens a query block has one or two key tiles, and
# the split loops load the diagonal one only after the tile before it has computed.
ONE_LOOP_CANDIDATES = {pad: [Tiles(64, 64, 4, 2, one_loop=True), Tiles(64, 64, 4, 3, one_loop=True),
                             Tiles(64, 64, 4, 3, True, one_loop=True), Tiles(64, 32, 4, 3, one_loop=True),
                             Tiles(128, 64, 8, 3, one_loop=True)]
                       for pad in (64, 128)}
# Tiles with q in shared memory (q_smem), per padded head_dim: sweep candidates until a GPU has
# timed them. The H200 sweep's winners are 64-row tiles, two programs an SM, one's softmax beside
# the other's wgmmas; but every 64-row query block reads its keys and values again, twice the
# traffic of 128-row blocks, whose 8-warp programs held 212 registers at head 128 (one an SM).
# With q out of registers a 128x32 program holds 125 registers at head 128 without context loops
# (the sweep's launches: two programs an SM) and 160 with them and the cache write, which a cap
# of 128 brings to two an SM without spills. At head 64 a 128x64 program fits 128 registers
# uncapped. The 64x32 4-warp tile at head 128 needs 134 registers and 67 KB: three an SM.
Q_SMEM_CANDIDATES = {64: [Tiles(128, 64, 8, 3, True, q_smem=True)],
                     128: [Tiles(128, 32, 8, 3, True, q_smem=True, max_registers=128),
                           Tiles(64, 32, 4, 3, True, q_smem=True)]}
# Warp-specialised tiles (sm_90, batches without cached context) per padded head_dim: sweep
# candidates until a GPU has timed them. 128 query rows, the one block Triton 3.6 splits between
# its two consumer warpgroups (_WS_BLOCK_M); 168 registers x 12 warps, one program an SM. At most
# _WS_MAX_STAGES stages (below).
WS_CANDIDATES = {pad: [Tiles(128, block_n, 4, 2, warp_specialize=True) for block_n in (64, 32, 128)]
                 for pad in (64, 128)}
# The warp-specialised kernel's pipeline depth: on an NVIDIA H200 (2026-11-27, benchmarks/results/
# 2026-11-27-h200/kernels.md, "Failed candidates") every 3-stage candidate returned non-finite
# outputs wherever its loop ran more than two key tiles (128x32 at every shape; 128x64 at 1024 and
# 2048 tokens, not at 128), and no 2-stage one did; the CPU interpreter, which runs no pipeline,
# matched the reference at both. Until a GPU shows deeper pipelines right, they are refused.
_WS_MAX_STAGES = 2
# (tile kind, padded head_dim) -> warp-specialised Tiles the launcher picks on sm_90 for batches
# it knows have no cached context (max_context_len=0); other batches keep the tables above.
# Empty until a GPU has timed WS_CANDIDATES beside the main kernel.
_WS_TILES_SM90: dict = {}
# Persistent tiles (batches without cached context whose prompts fit one tile), per padded
# head_dim: sweep candidates until a GPU has timed them. 128 x 128 tiles at 8 warps hold a
# 128-token prompt whole (212 registers at head 128 with the cache write: one program an SM;
# at 4 warps head 64 spills). One stage: the loop's loads sit under a branch, which Triton does
# not pipeline; the L2 prefetch is what overlaps them.
PERSISTENT_CANDIDATES = {pad: [Tiles(128, 128, 8, 1, persistent=True)] for pad in (64, 128)}
# head class (_tile_head_dim: 64, 80, 128) -> persistent Tiles the launcher picks on sm_90 for a
# batch it knows has no cached context and at most block_m new tokens per sequence: the Triton
# kernel's, or with wgmma the Gluon one's (attention_wgmma_persistent.py, heads 80 padded to
# 128). Empty until a GPU has timed PERSISTENT_CANDIDATES or the persistent WGMMA_CANDIDATES
# beside the main kernel.
_PERSISTENT_TILES_SM90: dict = {}
# Tiles of the Gluon wgmma kernel (batches without cached context, heads 64 and 128), per
# head_dim: sweep candidates until a GPU has run them; no GPU has yet. Compiled for sm_90 here
# (fp16, registers / shared memory): head 128: 128x128 at 8 warps, 2 stages (FlashAttention-3's
# tile: 246 / 160 KB, one program an SM), 64x64 at 4 warps (152 / 80 KB, two an SM), 128x64 at
# 8 warps, 3 stages (165 / 128 KB); head 64: 128x128x8x2 (225 / 80 KB), 128x64x8x3 (120 / 64 KB),
# 64x64x4x3 (120 / 56 KB). Since that sweep, 64x32 at 4 warps, for the short prompts of large
# batches, where a program's life is mostly waiting on its first loads and 64x64 fits two an SM:
# head 128, 2 stages (128 / 49 KB: four an SM) and 3 (128 / 66 KB: three); head 64, 2 stages
# (84-91 / 25 KB). And 128x32 at 8 warps, 4 stages (the fewest that keep a 128-row block's
# diagonal tiles in their slots) at head 128: 117-127 registers and 96 KB, so two programs an
# SM, four warpgroups sharing each 128-row block's keys and values, as the main kernel's fastest
# launch at opt-6.7b / 13b b8 L1024 on that H200 (128x32x8x3, q in shared memory, 128 registers
# capped: 215.6 / 268.8 us against 232.0 / 288.9 for wgmma 128x64x8x3, one program an SM).
# And the warp-specialised form (attention_wgmma_ws.py: a TMA producer warp, two 64-row consumer
# warpgroups with 240 registers each, one program an SM), FlashAttention-3's split: 128-key tiles
# at 2 stages (heads 64 and 128; 96 / 176 KB) and 64-key tiles at 3 (head 128; 144 KB), and at
# head 128 the 128-key form with FlashAttention-3's pingpong (the consumers take turns issuing
# their wgmmas); compiled clean for sm_90, never run.
# And the persistent form for prompts of at most 128 tokens (attention_wgmma_persistent.py: one
# 8-warp program an SM, one 128 x 128 tile per sequence and head, the next items' q, k and v in
# flight by TMA while one computes): two slot sets at head 128 (192 KB), two and three at 64; and
# at head 80 (OPT-2.7B, which no other Gluon tile takes), two sets of heads padded to 128.
# And the warp-specialised form persistent (FlashAttention-3's whole recipe at head 128 with
# pingpong; and at 64-key tiles, 3 stages, where the consumers read different tile counts): one
# program an SM taking 128-row query blocks in turn, longest first, its producer copying the
# next block's rows and key tiles while the consumers finish one (at 8 prompts of 1024 tokens a
# block averages 4.5 key tiles: loads waited for at a block's start, and its output and cache
# stores, are a large share of a program that does one).
WGMMA_CANDIDATES = {128: [Tiles(128, 128, 8, 2, wgmma=True), Tiles(64, 64, 4, 2, wgmma=True),
                          Tiles(128, 64, 8, 3, wgmma=True), Tiles(64, 32, 4, 2, wgmma=True),
                          Tiles(64, 32, 4, 3, wgmma=True), Tiles(128, 32, 8, 4, wgmma=True),
                          Tiles(128, 128, 4, 2, warp_specialize=True, wgmma=True),
                          Tiles(128, 64, 4, 3, warp_specialize=True, wgmma=True),
                          Tiles(128, 128, 4, 2, warp_specialize=True, wgmma=True, pingpong=True),
                          Tiles(128, 128, 4, 2, warp_specialize=True, wgmma=True, persistent=True),
                          Tiles(128, 128, 4, 2, warp_specialize=True, wgmma=True, persistent=True, pingpong=True),
                          Tiles(128, 64, 4, 3, warp_specialize=True, wgmma=True, persistent=True),
                          Tiles(128, 128, 8, 2, persistent=True, wgmma=True)],
                    64: [Tiles(128, 128, 8, 2, wgmma=True), Tiles(128, 64, 8, 3, wgmma=True),
                         Tiles(64, 64, 4, 3, wgmma=True), Tiles(64, 32, 4, 2, wgmma=True),
                         Tiles(128, 128, 4, 2, warp_specialize=True, wgmma=True),
                         Tiles(128, 128, 4, 2, warp_specialize=True, wgmma=True, persistent=True),
                         Tiles(128, 128, 8, 2, persistent=True, wgmma=True),
                         Tiles(128, 128, 8, 3, persistent=True, wgmma=True)],
                    80: [Tiles(128, 128, 8, 2, persistent=True, wgmma=True)]}
# (tile kind, head_dim) -> wgmma Tiles the launcher picks on sm_90 for batches it knows have no
# cached context, where the kernel takes the inputs (else the tables above). On the NVIDIA H200
# of 2026-11-27 (benchmarks/results/2026-11-27-h200-sweep; its probe ran every candidate right,
# both block layouts and the fused cache write) the 4-warp 64x64 tiles won the narrow shapes:
# opt-1.3b b64 L128 (head 64, 3 stages) 46.0 us, opt-6.7b / 13b (head 128, 2 stages) 83.2 / 103.0,
# the best of 26-30 launches each (50.9 / 105.3 / 130.1 at the main kernel's 64x64x4x2). At the
# wide shapes the main kernel's 64x64x4x3 TMA stayed ahead or level (at head 128, b1 L2048: 85.1
# / 107.0 beside 92.6 / 115.8 for wgmma 128x64x8x3).
_WGMMA_TILES_SM90 = {
    ("narrow", 64): Tiles(64, 64, 4, 3, wgmma=True),
    ("narrow", 128): Tiles(64, 64, 4, 2, wgmma=True),
}
# fp32 (ieee) multiplies on CUDA cores and holds fp32 operands in registers: small tiles (3
# stages: at 2, head_dim 64 spills 8 B on sm_90).
_TILES_FP32 = Tiles(16, 16, 4, 3)
# What an override may ask for (benchmarks/sweep_tiles.py); BLOCK_M must be a multiple of BLOCK_N.
_BLOCK_CHOICES = (16, 32, 64, 128, 256)
_WARP_CHOICES = (1, 2, 4, 8, 16)
_STAGE_CHOICES = (1, 2, 3, 4, 5, 6)
# A register cap per thread (tiles.max_registers): 0 for none, else at most the 255 a thread
# can address; a tile that does not fit its cap spills (the compile check fails on any spill).
_REGISTER_CAPS = (0, *range(16, 256))
# Capability assumed where none can be queried (CPU, interpreter): an H100, as for SM counts.
# (ROCm reports 0, no NVIDIA feature: the sm_80 tables, no TMA.)
_DEFAULT_CAPABILITY = 90
# TMA (host-built descriptors for tiles.tma, device-built ones in the warp-specialised kernel) and
# Triton's warp specialisation need Hopper or later.
_TMA_CAPABILITY = 90
# Warps of a warp-specialised program: the one count at which Triton 3.6 splits the loop on sm_90
# (into a 4-warp producer and two 4-warp consumers). Query rows of its block: at 128 each consumer
# takes 64; at 64 both consumers compute the whole block (the compiled TTGIR shows the two
# partitions identical), twice the work for the same result.
_WS_WARPS = 4
_WS_BLOCK_M = 128
# Warps of a program of the wgmma kernel: one or two warpgroups. The one capability it runs on:
# wgmma is sm_90a's alone (compiled for sm_100 or sm_120, LLVM aborts the process on its first
# wgmma, a crash no caller could catch).
_WGMMA_WARPS = (4, 8)
WGMMA_CAPABILITY = 90
# Key tiles of the warp-specialised Gluon kernel (attention_wgmma_ws.py): what a consumer's
# registers hold beside its accumulator.
_WGMMA_WS_BLOCK_NS = (64, 128)
# Query rows (and keys) of a persistent Gluon tile (attention_wgmma_persistent.py): a prompt's
# whole [block_m, block_m] score tile sits in registers beside its accumulator.
_WGMMA_PERSISTENT_BLOCKS = (64, 128)


def tile_table(capability: int) -> dict:
    """The (kind, padded head_dim) -> Tiles table the launcher uses on a GPU of `capability`."""
    return _TILES_SM90 if capability >= 90 else _TILES


def default_tiles(head_dim: int, dtype: torch.dtype, tokens: int, seqs: int,
                  capability: int = _DEFAULT_CAPABILITY, context_free: bool = False,
                  max_query_len: int | None = None) -> Tiles:
    """Tiles for one launch, from shapes known on the host (no device sync); `context_free`: the
    batch is known to have no cached context, which lets sm_90 pick a wgmma or a
    warp-specialised entry, and with `max_query_len` (an upper bound of the new tokens per
    sequence) a persistent one."""
    if dtype == torch.float32:
        return _TILES_FP32
    kind = "narrow" if tokens <= _NARROW_TOKENS * seqs else "wide"
    persistent = _PERSISTENT_TILES_SM90.get(_tile_head_dim(head_dim)) if capability >= _TMA_CAPABILITY else None
    if persistent and context_free and max_query_len is not None and max_query_len <= persistent.block_m:
        return persistent
    if context_free and capability == WGMMA_CAPABILITY and (kind, head_dim) in _WGMMA_TILES_SM90:
        return _WGMMA_TILES_SM90[(kind, head_dim)]
    if context_free and capability >= _TMA_CAPABILITY and (kind, _padded_class(head_dim)) in _WS_TILES_SM90:
        return _WS_TILES_SM90[(kind, _padded_class(head_dim))]
    tiles = tile_table(capability)[(kind, _tile_head_dim(head_dim))]
    return tiles._replace(tma=False) if tiles.tma and tokens < _TMA_MIN_TOKENS else tiles


def one_tile_per_prompt(tiles: Tiles) -> bool:
    """Whether `tiles` run a persistent kernel whose items are whole prompts, one tile each
    (attention_persistent.py, attention_wgmma_persistent.py): the launcher runs them only where
    the host knows every prompt fits. The persistent warp-specialised Gluon kernel's items are
    query blocks, of prompts of any length."""
    return tiles.persistent and not tiles.warp_specialize


def _tile_head_dim(head_dim: int) -> int:
    """The tile tables' head class: 64 (heads up to 64), 80 (two exact tiles, as OPT-2.7B's
    64 + 16), 128 (the rest, padded to a power of two)."""
    if head_dim <= 64:
        return 64
    return 80 if _head_split(head_dim, True)[1] else 128


def _padded_class(head_dim: int) -> int:
    """64 or 128: the key of the lists by padded head_dim (TMA_CANDIDATES, WS_CANDIDATES and
    _WS_TILES_SM90: the warp-specialised kernel pads every head)."""
    return 64 if head_dim <= 64 else 128


def _check_tiles(tiles, capability: int) -> Tiles:
    if not isinstance(tiles, tuple) or not 4 <= len(tiles) <= len(Tiles._fields):
        _fail("tiles must be (block_m, block_n, num_warps, num_stages[, tma[, split_head[, warp_specialize"
              f"[, one_loop[, persistent[, q_smem[, max_registers[, wgmma[, pingpong]]]]]]]]]), got {tiles!r}")
    tiles = Tiles(*tiles)
    for name, value, allowed in (("block_m", tiles.block_m, _BLOCK_CHOICES),
                                 ("block_n", tiles.block_n, _BLOCK_CHOICES),
                                 ("num_warps", tiles.num_warps, _WARP_CHOICES),
                                 ("num_stages", tiles.num_stages, _STAGE_CHOICES)):
        if isinstance(value, bool) or value not in allowed:
            _fail(f"tiles.{name} must be one of {allowed}, got {value!r}")
    if tiles.block_m % tiles.block_n:
        _fail(f"tiles.block_m {tiles.block_m} must be a multiple of tiles.block_n {tiles.block_n}")
    for name in ("tma", "split_head", "warp_specialize", "one_loop", "persistent", "q_smem", "wgmma", "pingpong"):
        if not isinstance(getattr(tiles, name), bool):
            _fail(f"tiles.{name} must be a bool, got {getattr(tiles, name)!r}")
    for name in ("tma", "warp_specialize"):
        if getattr(tiles, name) and capability < _TMA_CAPABILITY:
            _fail(f"tiles.{name} needs compute capability {_TMA_CAPABILITY} or later, this device has {capability}")
    if tiles.wgmma and capability != WGMMA_CAPABILITY:
        _fail(f"tiles.wgmma needs compute capability {WGMMA_CAPABILITY} (wgmma is sm_90's alone), "
              f"this device has {capability}")
    if tiles.warp_specialize and (tiles.num_warps, tiles.block_m) != (_WS_WARPS, _WS_BLOCK_M):
        _fail(f"tiles.warp_specialize needs num_warps={_WS_WARPS} and block_m={_WS_BLOCK_M} (the one shape Triton 3.6 "
              f"splits into two 64-row consumers), got {tiles.num_warps} and {tiles.block_m}")
    if type(tiles.max_registers) is not int or tiles.max_registers not in _REGISTER_CAPS:
        _fail(f"tiles.max_registers must be 0 (no cap) or an int from {_REGISTER_CAPS[1]} to {_REGISTER_CAPS[-1]}, "
              f"got {tiles.max_registers!r}")
    if tiles.q_smem and not tiles.tma:
        _fail("tiles.q_smem needs tiles.tma (q's 2-D box is a TMA load)")
    if tiles.warp_specialize and tiles.one_loop:
        _fail("tiles.one_loop is the main kernel's option; the warp-specialised kernel always runs one loop")
    if tiles.warp_specialize and tiles.q_smem:
        _fail("tiles.q_smem is the main kernel's option; the warp-specialised kernel keeps q in shared memory anyway")
    if tiles.warp_specialize and not tiles.wgmma and tiles.num_stages > _WS_MAX_STAGES:
        _fail(f"tiles.warp_specialize needs num_stages <= {_WS_MAX_STAGES} (deeper pipelines gave non-finite outputs "
              f"on an H200), got {tiles.num_stages}")
    if one_tile_per_prompt(tiles) and tiles.block_n != tiles.block_m:
        _fail(f"tiles.persistent needs block_n == block_m (one tile a sequence), got {tiles.block_m}x{tiles.block_n}")
    if tiles.persistent and (tiles.tma or tiles.one_loop or (tiles.warp_specialize and not tiles.wgmma)):
        _fail("tiles.persistent is a kernel of its own: no tma or one_loop, and warp_specialize only with wgmma (the "
              "warp-specialised Gluon kernel, whose programs then take query blocks in turn)")
    if tiles.pingpong and not (tiles.wgmma and tiles.warp_specialize and tiles.block_n == tiles.block_m):
        _fail("tiles.pingpong is the warp-specialised Gluon kernel's (wgmma and warp_specialize) at block_n == "
              f"block_m (equal rounds for both consumers), got {tiles!r}")
    if tiles.wgmma:
        _check_wgmma_tiles(tiles)
    return tiles


def _check_wgmma_tiles(tiles: Tiles) -> None:
    others = [name for name in ("one_loop", "q_smem") if getattr(tiles, name)]
    if others:
        _fail(f"tiles.wgmma is a kernel of its own (TMA, q in shared memory, no context): no {', '.join(others)}")
    if tiles.max_registers:
        _fail(f"tiles.wgmma sets its own register cap (none, or the warp-specialised form's), got max_registers "
              f"{tiles.max_registers}")
    if tiles.warp_specialize:   # block_m 128 and num_warps 4 checked with warp_specialize's other tiles
        if tiles.block_n not in _WGMMA_WS_BLOCK_NS:
            _fail(f"tiles.wgmma with warp_specialize needs block_n in {_WGMMA_WS_BLOCK_NS} (a consumer's scores "
                  f"beside its accumulator), got {tiles.block_n}")
        if tiles.num_stages < 2:
            _fail(f"tiles.wgmma needs num_stages >= 2 (the diagonal tiles stay in their slots), "
                  f"got {tiles.num_stages}")
        return
    if tiles.num_warps not in _WGMMA_WARPS or tiles.block_m % (16 * tiles.num_warps):
        _fail(f"tiles.wgmma needs num_warps in {_WGMMA_WARPS} and block_m a multiple of 16 * num_warps (each warp "
              f"owns 16-row slices of the block), got {tiles.num_warps} warps and block_m {tiles.block_m}")
    if tiles.num_stages < 2:
        _fail(f"tiles.wgmma needs num_stages >= 2 (a slot is refilled only after its tile's PV), "
              f"got {tiles.num_stages}")
    if tiles.persistent and tiles.block_m not in _WGMMA_PERSISTENT_BLOCKS:
        _fail(f"tiles.wgmma with persistent needs block_m in {_WGMMA_PERSISTENT_BLOCKS} (a whole tile of scores "
              f"beside the accumulator), got {tiles.block_m}")
    if tiles.num_stages * tiles.block_n < tiles.block_m:
        _fail(f"tiles.wgmma needs num_stages * block_n >= block_m (the KV-cache write reads a query block's "
              f"diagonal tiles from their slots after the loop), got {tiles.num_stages} x {tiles.block_n} "
              f"< {tiles.block_m}")


def _head_dim_pad(head_dim: int) -> int:
    # tl.dot needs power-of-two tiles of at least 16 along the reduction.
    return max(16, _next_pow2(head_dim))


def _head_split(head_dim: int, split_head: bool) -> tuple[int, int]:
    """(D_LO, D_HI): with split_head, a head that is the sum of two powers of two of at least 16
    (OPT-2.7B's 80 = 64 + 16) runs as two exact tiles; any other head as one tile padded to a
    power of two, its tail masked (D_HI = 0)."""
    low = 1 << (head_dim.bit_length() - 1)
    high = head_dim - low
    if split_head and low >= 16 and high >= 16 and high & (high - 1) == 0:
        return low, high
    return _head_dim_pad(head_dim), 0


def _q_box_2d(tiles: Tiles, head_dim: int) -> bool:
    """Whether q comes by 2-D TMA boxes of its row's columns (Tiles.q_smem): only where no head
    is padded, since a padded box would read the next head's columns, not zeros. The launcher
    also needs q's heads back to back in a row."""
    return tiles.q_smem and tiles.tma and sum(_head_split(head_dim, tiles.split_head)) == head_dim


def _fail(message: str):
    raise ValueError(f"prefill_attention: {message}")
