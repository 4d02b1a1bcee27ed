"""Launch configurations of the fused-linear GEMM (kernels/layernorm_linear.py): the block sizes
of its kernels, the tile tiers measured on an H100 (default_config), the launch options an
override may add (GemmLaunch), their checks, and which compiled variant of _fused_linear_kernel a
launch runs (_gemm_flags), for the launcher and the compile check alike.
"""
from __future__ import annotations

import functools
from types import MappingProxyType
from typing import NamedTuple

import torch

from .device import DEFAULT_SMS, INTERPRETED
from .launch_math import cdiv as _cdiv, next_pow2 as _next_pow2

GROUP_M = 8
# Elements of x per LayerNorm program, at least (16 float64 values a thread at 4 warps): rows
# narrower than it share a program; a wider row held whole is one program at more warps.
_LN_TILE = 2048
# The widest row (a power of two) the LayerNorm kernel holds whole, one row a program at 16
# float64 values a thread: 8192 columns at 16 warps, past every width of the sizes this project
# serves (5120 at 13B; OPT-66B's 9216 would run the chunked form).
_LN_ROW_TILE_MAX = 8192
_LN_VALUES_PER_THREAD = 16
# Elements of x per warp in a chunk of the GEMM's LayerNorm-statistics pass (32 fp32 values a
# thread): wide chunks for skinny M, so the pass takes few pipelined round trips to memory. Per
# warp, not per program: a 16-row, 8-warp tile with 256-column chunks (16 values a thread)
# spills on sm_80, where 512-column chunks compile clean.
_STATS_PER_WARP = 1024
_STATS_STAGES = 3   # one chunk in use, the next two in flight
_STATS_TILE = 2048   # elements of x per chunk of _row_stats_kernel: 16 fp32 values a thread at 4 warps
_REDUCE_BLOCK = 1024  # outputs per program of _split_k_reduce_kernel: 8 a thread at 4 warps


class LnBlocks(NamedTuple):
    """One launch of the LayerNorm kernel: rows and columns a program, warps, and whether a
    program holds its rows whole (one_tile: read once, statistics from the registers) or walks
    them in chunks of block_n columns (a statistics pass, then a normalising pass)."""
    block_m: int
    block_n: int
    num_warps: int
    one_tile: bool


def _ln_blocks(n: int) -> LnBlocks:
    """The LayerNorm launch for rows of n columns: whole rows where they fit _LN_ROW_TILE_MAX,
    as many as fill a tile of _LN_TILE (narrow rows, as in the tests, share a program), with
    warps for _LN_VALUES_PER_THREAD values a thread; wider rows in chunks of 1024 columns."""
    width = _next_pow2(n)
    if width <= _LN_ROW_TILE_MAX:
        block_m = max(1, _LN_TILE // width)
        warps = max(4, block_m * width // (32 * _LN_VALUES_PER_THREAD))
        return LnBlocks(block_m, width, warps, True)
    return LnBlocks(_LN_TILE // 1024, 1024, 4, False)


def _stats_blocks(k: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_K) of _row_stats_kernel: one row a program for OPT widths (768 and up),
    so a 64-token batch spreads its loads over 64 SMs, in chunks of up to _STATS_TILE columns
    (a 5120-wide row in three round trips, pipelined); narrow rows share a program."""
    block_k = min(_STATS_TILE, _next_pow2(k))
    return max(1, 1024 // block_k), block_k


class GemmConfig(NamedTuple):
    """One launch of the GEMM kernel: tile sizes, warps and pipeline stages (what
    default_config picks: no split-K, LayerNorm statistics in the GEMM prologue)."""
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


class GemmLaunch(NamedTuple):
    """A GemmConfig and the launch options an override may add; the defaults are the launch a
    GemmConfig makes. As a tuple: (block_m, block_n, block_k, num_warps, num_stages[, split_k[,
    stats_kernel[, normalize_first[, overlap[, tma[, cublas]]]]]]).

    split_k: GEMM programs per output tile, each over a contiguous run of ceil(K tiles /
        split_k) whole BLOCK_K tiles (the last runs shorter, or empty where K has fewer tiles;
        one of _SPLIT_CHOICES). Above 1 they write float32 partials to a per-call workspace
        `[split_k, tokens, out]` and a second kernel adds them in split order (deterministic)
        and applies bias, ReLU, residual and the output cast. With a fused LayerNorm, split_k
        > 1 takes the row statistics from _row_stats_kernel, whatever stats_kernel says.
    stats_kernel: the LayerNorm row statistics from a separate launch (_row_stats_kernel) that
        the GEMM reads, instead of each GEMM program's own pass over its rows; ignored without
        a LayerNorm.
    normalize_first: the LayerNorm as its own launch (_layer_norm_kernel, rounding the rows to
        x's dtype as the unfused pair does), then the plain GEMM on them: its A tiles go from
        shared memory straight to the tensor cores instead of through registers to be
        normalised, which at 64 rows is most of the instructions of each K step (sm_90: 146 a
        step for the plain 64x64x128 loop, 562 normalising). stats_kernel is then moot;
        ignored without a LayerNorm.
    overlap: start the weight stream before what the GEMM waits on. Each GEMM program first
        asks L2 for its first _PREFETCH_K weight columns (prefetch.global.L2), then computes
        its LayerNorm statistics or waits; and on sm_90+ the GEMM after the LayerNorm or
        statistics launch, and the reduce after the split GEMM, are programmatic dependent
        launches (PDL), each started early and waiting (griddepcontrol.wait) before it reads
        or writes anything but the weight (the post-LN LayerNorm of linear_residual_layernorm
        stays a plain launch). The weight stream is what these GEMMs are bound by, and without
        this it starts only after the statistics pass or the launch before. Results are
        unchanged. Prefetch alone on sm_80; ignored off NVIDIA GPUs and under the interpreter
        (no inline PTX there).
    tma: the main loop's x and weight tiles as TMA bulk copies through host-built descriptors
        (sm_90+; the interpreter emulates them) instead of per-thread cp.async loads: fewer
        instructions and registers per K step for the weight stream. Where a tensor's layout
        cannot be described (a stride or base not 16-byte aligned, a K stride other than 1)
        and for float32 the loads stay pointer loads.
    cublas: the GEMM on cuBLAS (torch.addmm; fc1's ReLU in cuBLASLt's bias epilogue, as the
        torch pair runs it), after our LayerNorm launch where there is a LayerNorm: what
        normalize_first runs, with cuBLAS's GEMM in place of ours. The tiles are then unused
        and no option of our GEMM applies (_check_config refuses them) but overlap: with it
        the LayerNorm launch itself asks L2 for the weight's first _PREFETCH_K columns (its
        programs share the weight's rows), since cuBLAS's GEMM cannot start early and wait:
        HBM streams them during that launch's short round trips and the GEMM finds them in L2
        (NVIDIA GPUs; nothing elsewhere). For the 64-row GEMMs of opt-6.7b / 13b, where our
        GEMM after the LayerNorm launch trailed cuBLAS's alone (the H200 sweep of 2026-11-27):
        whether our one-read LayerNorm launch beside cuBLAS's GEMM beats the torch pair.
    """
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    split_k: int = 1
    stats_kernel: bool = False
    normalize_first: bool = False
    overlap: bool = False
    tma: bool = False
    cublas: bool = False


class _Tier(NamedTuple):
    """The GEMMs of up to `max_m` rows (None: any): the first of `configs` whose grid has at
    least `min_programs_per_sm` x SMs programs, else the last with its N tile halved (down to
    _MIN_BLOCK_N) until the grid has that many (narrow N: out_proj, fc2)."""
    max_m: int | None
    configs: tuple[GemmConfig, ...]
    min_programs_per_sm: float


# Measured for LN+QKV (N = 3 x K) on an NVIDIA H100 80GB HBM3 (132 SMs), fp16, 2026-11-26
# (benchmarks/results/2026-11-26-h100/sweep.json, kernel medians, L2 flushed); before, the tiers
# were 16x64x128x4x4, 32x64x128x4x4, 64x64x64x4x4 and 128x128x64x8x3, each N tile halved until
# every SM had a program.
_M_TIERS = (
    # Decode-sized M streams the weight once, bandwidth-bound: 32 KB weight tiles, 3 stages, and
    # half the SMs busy is enough. 128x128 at 4 warps where N gives 66+ programs: opt-6.7b / 13b
    # (96 / 120 programs) 57.4 / 76.4 us at 1 token, the best (60.1 / 78.8 before), 61.9 / 81.7
    # at 8 (best 61.1 / 81.5; 63.5 / 83.3 before). Else 64x256 at 8 warps: opt-1.3b (96
    # programs) 23.5 / 23.1 us at 1 / 8 tokens, the best (26.8 / 29.1 before, at 16x32 and 192
    # programs; 128x128 26.2 / 27.9). Timed with 256-column statistics chunks, it now runs 512
    # (_STATS_PER_WARP), as it spilled on sm_80; not timed so.
    _Tier(16, (GemmConfig(16, 128, 128, 4, 3), GemmConfig(16, 64, 256, 8, 3)), 0.5),
    # 17-32 rows: not swept; as before.
    _Tier(32, (GemmConfig(32, 64, 128, 4, 4),), 1.0),
    # 64 rows in one tile, 128-deep K, 3 stages, where that fills the SMs: opt-6.7b / 13b at 64
    # tokens (192 / 240 programs) 88.6 / 113.3 us, the best (104.7 / 132.5 before). Else half
    # the rows per tile: opt-1.3b (96 programs at 64 rows) 33.6 us at 32x64x128x4x4, the best
    # (49.6 before; 64x64x128x4x3 36.4; the same 192 programs from 64x32 tiles 43.3).
    _Tier(64, (GemmConfig(64, 64, 128, 4, 3), GemmConfig(32, 64, 128, 4, 4), GemmConfig(16, 64, 128, 4, 4)), 1.0),
    # Prefill is compute-bound: 128x128 tiles at 8 warps (not swept; as before).
    _Tier(None, (GemmConfig(128, 128, 64, 8, 3),), 1.0),
)
_MIN_BLOCK_N = 16    # tl.dot's smallest N
# What an override may ask for (benchmarks/sweep_tiles.py).
_BLOCK_CHOICES = (16, 32, 64, 128, 256)
_WARP_CHOICES = (1, 2, 4, 8)
_STAGE_CHOICES = (1, 2, 3, 4, 5, 6)
# Up to 8: past that the workspace traffic (8 x M x N floats each way) nears the weight's at 64
# tokens, and a K of 768 (opt-125m) has only 6 tiles of 128.
_SPLIT_CHOICES = (1, 2, 3, 4, 6, 8)
# Weight columns an overlapping launch prefetches per program (GemmLaunch.overlap): 1 KB of each
# fp16 weight row, 12-16 MB over an unsplit opt-6.7b / 13b QKV grid, a quarter of an H100's L2;
# at 3 TB/s the ~4 us a statistics pass or a LayerNorm launch takes. Each split prefetches its
# own 512 columns, so split-K multiplies it (split 4: about the whole L2).
_PREFETCH_K = 512


def _fit(config, dtype: torch.dtype):
    """The config (GemmConfig or GemmLaunch) as `dtype` runs it; launch options are kept, but
    for tma under float32."""
    if dtype == torch.float32:
        # fp32 "ieee" dots run on FMA units with both operand tiles in registers: keep them small
        # (64x64 with the LN prologue already spills on sm_80; 32x64 split-K with LN spills 8 B
        # on sm_90, so split-K runs 16-row tiles)
        rows = 16 if isinstance(config, GemmLaunch) and config.split_k > 1 else 32
        fitted = config._replace(block_m=min(config.block_m, rows), block_n=min(config.block_n, 64),
                                 block_k=min(config.block_k, 32), num_warps=4, num_stages=2)
        # TMA feeds tensor cores, which fp32 "ieee" dots do not use
        return fitted._replace(tma=False) if isinstance(config, GemmLaunch) else fitted
    return config


# The launch decisions below are pure functions of small hashable arguments and of this module's
# tables, and run on every launch (each layer of every step): cached, they cost a dictionary
# lookup instead of several microseconds of Python. Their dict results are read-only views,
# shared between calls. Code that patches a table they read (_M_TIERS, _STATS_PER_WARP, ...)
# must call their cache_clear().
_launch_cache = functools.lru_cache(maxsize=4096)


@_launch_cache
def _kernel_options(config: GemmConfig, dtype: torch.dtype) -> MappingProxyType:
    """The kernel's constexprs and launch options for a (fitted) config."""
    stats_k = max(config.block_k, _STATS_PER_WARP * config.num_warps // config.block_m)
    return MappingProxyType(dict(
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=GROUP_M,
        STATS_K=stats_k, STATS_STAGES=1 if dtype == torch.float32 else _STATS_STAGES,
        UPCAST_DOT=INTERPRETED and dtype == torch.bfloat16,
        num_warps=config.num_warps, num_stages=config.num_stages))


def _tier(m: int) -> _Tier:
    return next(t for t in _M_TIERS if t.max_m is None or m <= t.max_m)


def _min_programs(m: int, sms: int) -> int:
    """The grid size default_config aims for with m rows on `sms` SMs (see _M_TIERS)."""
    return int(_tier(m).min_programs_per_sm * sms)


@_launch_cache
def default_config(m: int, n: int, dtype: torch.dtype, sms: int = DEFAULT_SMS) -> GemmConfig:
    """Tiles for an [m, k] x [k, n] GEMM from host-known shapes (reasoning at _M_TIERS)."""
    wanted = _min_programs(m, sms)

    def programs(c: GemmConfig) -> int:
        return _cdiv(m, c.block_m) * _cdiv(n, c.block_n)
    config = next((c for c in _tier(m).configs if programs(c) >= wanted), _tier(m).configs[-1])
    while config.block_n > _MIN_BLOCK_N and programs(config) < wanted:
        config = config._replace(block_n=config.block_n // 2)
    return _fit(config, dtype)


# The launch options a GEMM behind a LayerNorm (QKV, fc1) adds to its tiles by default at up to
# 64 rows, fp16 / bf16 (float32's CUDA-core tiles were not timed with options). Measured for
# LN+QKV on an NVIDIA H200 (132 SMs), fp16, 2026-11-27 (benchmarks/results/2026-11-27-h200-sweep,
# device medians, L2 flushed; speedups over F.layer_norm + F.linear in the same process):
# - Up to 16 rows the weight stream binds, and it should start at once: overlap (prefetch, and
#   the GEMM a dependent launch of the statistics launch on sm_90). Where 128-column tiles give
#   half the SMs a program, the statistics come from their own launch (stats_kernel): opt-6.7b /
#   13b (96 / 120 programs) 32.1 / 43.7 us at 1 token, 1.20x, the best of 32 launches each
#   (36.6 / 50.3 before, at the plain 16x128x128x4x3). Else split-K, the fewest splits that
#   give half the SMs a program: opt-1.3b (48 tiles, split 2) 13.7 us, 1.24x, the best (22.7 at
#   16x64x256x8x3 before; split 4: 15.7); 8 tokens alike (1.17x, 1.17x, 1.17x).
# - 17 to 64 rows: the LayerNorm as its own launch, then the plain GEMM on its rows
#   (normalize_first; the fused loop normalises each A tile again in every program of a row
#   tile), overlapped, by TMA, in one 64-row tile, 4 stages where that grid leaves SMs without
#   a program (more bytes in flight a program), else 3: opt-1.3b (96 programs) 14.6 us, 1.15x;
#   opt-6.7b / 13b (192 / 240) 36.1 / 52.5 us, 1.09x / 1.02x (the best 36.1 / 51.2; before
#   30.2, 81.4, 102.5 us at the fused 32- and 64-row tiles). 17 to 32 rows were not timed:
#   the same weight stream, so the same launch.
_LN_SKINNY = GemmConfig(16, 128, 128, 4, 3)
_LN_SIXTY_FOUR = GemmConfig(64, 64, 128, 4, 3)
_LN_OPTION_ROWS = 64


def takes_ln_options(m: int, dtype: torch.dtype, has_ln: bool) -> bool:
    """Whether default_launch gives an [m, k] GEMM the measured options above: behind a
    LayerNorm, fp16 / bf16, at most 64 rows. There the fused LayerNorm + GEMM ran 1.02-1.24x
    the torch pair; `kernels="auto"` takes it there and only there, on sm_90 (kernels/__init__.py)."""
    return has_ln and dtype != torch.float32 and m <= _LN_OPTION_ROWS


@_launch_cache
def default_launch(m: int, n: int, k: int, dtype: torch.dtype, sms: int = DEFAULT_SMS,
                   has_ln: bool = False) -> GemmLaunch:
    """The launch (tiles and options) for an [m, k] x [k, n] GEMM from host-known shapes: where
    takes_ln_options, the measured options above; else default_config's tiles with none."""
    if not takes_ln_options(m, dtype, has_ln):
        return GemmLaunch(*default_config(m, n, dtype, sms))
    if m > _LN_SKINNY.block_m:
        tiles = _cdiv(m, _LN_SIXTY_FOUR.block_m) * _cdiv(n, _LN_SIXTY_FOUR.block_n)
        stages = 4 if tiles < sms else _LN_SIXTY_FOUR.num_stages
        return GemmLaunch(*_LN_SIXTY_FOUR._replace(num_stages=stages), normalize_first=True, overlap=True, tma=True)
    tiles, wanted = _cdiv(n, _LN_SKINNY.block_n), _min_programs(m, sms)
    if tiles >= wanted:
        return GemmLaunch(*_LN_SKINNY, stats_kernel=True, overlap=True)
    # the fewest splits that reach the programs wanted, each over at least one K tile
    k_tiles = max(1, _cdiv(k, _LN_SKINNY.block_k))
    splits = [s for s in _SPLIT_CHOICES[1:] if s <= k_tiles] or [1]
    split_k = next((s for s in splits if tiles * s >= wanted), splits[-1])
    return GemmLaunch(*_LN_SKINNY, split_k=split_k, overlap=True)


def _default_launches() -> list[GemmLaunch]:
    """Every launch default_launch can add options to (fp16 / bf16), for the compile check."""
    sixty_four = [GemmLaunch(*_LN_SIXTY_FOUR._replace(num_stages=s), normalize_first=True, overlap=True, tma=True)
                  for s in (_LN_SIXTY_FOUR.num_stages, 4)]
    return sixty_four + [GemmLaunch(*_LN_SKINNY, stats_kernel=True, overlap=True)] + [
        GemmLaunch(*_LN_SKINNY, split_k=s, overlap=True) for s in _SPLIT_CHOICES]


def _gemm_configs(dtype: torch.dtype) -> list[GemmConfig]:
    """Every configuration default_config can return for `dtype`, for the compile check: each
    tier's configs, and its last one at every narrower N tile."""
    configs = []
    for tier in _M_TIERS:
        candidates = list(tier.configs)
        block_n = tier.configs[-1].block_n // 2
        while block_n >= _MIN_BLOCK_N:
            candidates.append(tier.configs[-1]._replace(block_n=block_n))
            block_n //= 2
        for config in (_fit(c, dtype) for c in candidates):
            if config not in configs:
                configs.append(config)
    return configs


def _check_config(config) -> GemmLaunch:
    """An override as a GemmLaunch: a 5- to 11-tuple (GemmConfig and GemmLaunch are tuples)."""
    if not isinstance(config, tuple) or not 5 <= len(config) <= len(GemmLaunch._fields):
        raise ValueError("config must be (block_m, block_n, block_k, num_warps, num_stages[, split_k"
                         f"[, stats_kernel[, normalize_first[, overlap[, tma[, cublas]]]]]]), got {config!r}")
    config = GemmLaunch(*config)
    for name in ("block_m", "block_n", "block_k", "num_warps", "num_stages", "split_k"):
        allowed = {"num_warps": _WARP_CHOICES, "num_stages": _STAGE_CHOICES,
                   "split_k": _SPLIT_CHOICES}.get(name, _BLOCK_CHOICES)
        value = getattr(config, name)
        # 2.0 == 2 and True == 1: only real ints reach the kernels' constexprs and the grid
        if not isinstance(value, int) or isinstance(value, bool) or value not in allowed:
            raise ValueError(f"config.{name} must be one of {allowed}, got {value!r}")
    for name in ("stats_kernel", "normalize_first", "overlap", "tma", "cublas"):
        if not isinstance(getattr(config, name), bool):
            raise ValueError(f"config.{name} must be True or False, got {getattr(config, name)!r}")
    if config.cublas:
        # options of our GEMM kernel, which a cuBLAS launch does not run (overlap it does: our
        # LayerNorm launch then prefetches cuBLAS's weight)
        ours = ["split_k"] * (config.split_k > 1) + [
            name for name in ("stats_kernel", "tma") if getattr(config, name)]
        if ours:
            raise ValueError(f"config.cublas runs cuBLAS's GEMM, which takes none of our GEMM's options "
                             f"({', '.join(ours)}), got {config!r}")
    return config


@_launch_cache
def _gemm_flags(config: GemmLaunch, has_ln: bool, relu: bool, has_res: bool,
                capability: int | None) -> MappingProxyType:
    """The _fused_linear_kernel variant a launch runs (its flag constexprs), for an op with or
    without a LayerNorm, ReLU and residual, on a GPU of `capability` (None: the interpreter):
    normalize_first takes the LayerNorm out of the GEMM; split-K moves the epilogue to the
    reduce and the statistics to their own launch, as stats_kernel does; overlap prefetches on
    NVIDIA GPUs (no inline PTX in the interpreter) and, on sm_90+, waits on a launch before
    (PDL_WAIT) and lets the reduce start early (LAUNCH_DEPENDENTS); tma loads through
    descriptors on sm_90+ and in the interpreter, which emulates them (the launcher still
    falls back where a tensor's layout has no descriptor). The launcher and the compile check
    both read it."""
    fused_ln = has_ln and not config.normalize_first
    partial = config.split_k > 1
    stats_from_memory = fused_ln and (config.stats_kernel or partial)
    overlap = config.overlap and bool(capability)
    pdl = overlap and capability >= 90
    return MappingProxyType(dict(
        HAS_LN=fused_ln, RELU=relu and not partial, HAS_RESIDUAL=has_res and not partial,
        STATS_FROM_MEMORY=stats_from_memory, PARTIAL_OUT=partial, PREFETCH_K=_PREFETCH_K if overlap else 0,
        PDL_WAIT=pdl and (stats_from_memory or (has_ln and not fused_ln)), LAUNCH_DEPENDENTS=pdl and partial,
        USE_TMA=config.tma and (capability is None or capability >= 90)))
