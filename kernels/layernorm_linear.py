"""LayerNorm fused with the linear layers around it: Triton kernels, launchers, torch references.

x is `[tokens, in_features]`, weight is `[out_features, in_features]` (nn.Linear layout). One GEMM
kernel serves every linear op: an optional LayerNorm prologue (row statistics from a first pass
over K, then each A tile normalised as it is loaded) and an epilogue of bias, ReLU and residual.
The LayerNorm is applied to the activations, never folded into the weight: the folded form
`rstd * (x@W'^T - mean * colsum(W'))` cancels catastrophically on OPT's outlier rows (DESIGN §5).

Six launch options, chosen per call through the `config` override (gemm_config.GemmLaunch, with
the tile tiers and the other launch choices), and by default for the GEMMs behind a LayerNorm at
up to 64 rows in fp16 / bf16 (gemm_config.default_launch, as an H200 timed them): the row statistics
from a separate small kernel (`_row_stats_kernel`, once per row instead of once per GEMM
program); the whole LayerNorm as its own launch before a plain GEMM
(normalize_first); split-K (SPLIT_K programs per output tile, each over a contiguous share of
K, writing fp32 partials that `_split_k_reduce_kernel` sums in fixed order before the epilogue);
overlap (the weight stream started before the statistics or the launch before are ready: an L2
prefetch, and programmatic dependent launches on sm_90+); tma (the main loop's tiles as TMA
bulk copies on sm_90+); and cublas (our LayerNorm launch, then cuBLAS's GEMM instead of ours).
They serve skinny (decode-sized) GEMMs, where the weight-bound grid has too few tiles for the
SMs and every program of a row tile normalises the same rows again.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
from triton.tools.tensor_descriptor import TensorDescriptor

from .device import nvidia_capability as _capability, sm_count as _num_sms, tma_addressable as _tma_addressable
from .gemm_config import (_PREFETCH_K, _REDUCE_BLOCK, _SPLIT_CHOICES, _STATS_STAGES, GemmConfig, GemmLaunch,
                          _cdiv, _check_config, _fit, _gemm_configs, _gemm_flags, _kernel_options, _ln_blocks,
                          _default_launches, _stats_blocks, default_launch)

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INT32_MAX = 2 ** 31 - 1
# Weight rows a LayerNorm program asks L2 for at a time (PREFETCH_K): 128 x 4 line addresses.
_PREFETCH_ROWS = tl.constexpr(128)


# --------------------------------------------------------------------------------------------
# torch references (the contract every launcher below matches)
# --------------------------------------------------------------------------------------------

def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim with statistics in float32.

    fp16 sums would overflow on the outlier channels of OPT-6.7B and larger; torch's LayerNorm
    accumulates fp16 / bf16 rows in float32 itself (CPU and CUDA), so no upcast copy is needed:
    one kernel on CUDA where the upcast took five (three casts in, one out).
    """
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def layernorm_linear_ref(x: torch.Tensor, ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None,
                         weight: torch.Tensor, bias: torch.Tensor, eps: float,
                         relu: bool = False) -> torch.Tensor:
    """`[relu](LN(x) @ weight.T + bias)`; with ln_weight None the LayerNorm is skipped (post-LN).

    Serves the fused QKV projection (`weight` is `[3*hidden, hidden]`) and fc1 + ReLU.
    """
    h = x if ln_weight is None else layer_norm_ref(x, ln_weight, ln_bias, eps)
    if relu and bias is not None and h.dim() == 2:
        # fc1 + ReLU as one GEMM: on CUDA the ReLU rides cuBLASLt's bias epilogue, one kernel
        # per layer fewer than F.linear then relu_ (the ReLU itself commutes with the rounding;
        # cuBLASLt may pick another GEMM algorithm than F.linear's, not compared on a GPU yet).
        # Where cuBLASLt cannot take the shapes, torch runs the GEMM and a separate ReLU.
        return torch._addmm_activation(bias, h, weight.t())
    out = F.linear(h, weight, bias)
    return torch.relu_(out) if relu else out


def linear_residual_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        residual: torch.Tensor) -> torch.Tensor:
    """`x @ weight.T + bias + residual`: out_proj and fc2 with the residual add in the epilogue."""
    return F.linear(x, weight, bias) + residual


def linear_residual_layernorm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                  residual: torch.Tensor, ln_weight: torch.Tensor,
                                  ln_bias: torch.Tensor, eps: float) -> torch.Tensor:
    """`LN(x @ weight.T + bias + residual)`: the post-LN (OPT-350m) layout after out_proj and fc2."""
    return layer_norm_ref(linear_residual_ref(x, weight, bias, residual), ln_weight, ln_bias, eps)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

@triton.jit
def _recip_f64(x):
    """1/x for float64 x without a float64 division, which ptxas expands into a slow-path
    subroutine with a stack frame: a float32 estimate and one Newton step (error ~1e-13)."""
    r = (1.0 / x.to(tl.float32)).to(tl.float64)
    return r * (2.0 - x * r)


@triton.jit
def _rsqrt_f64(x):
    """1/sqrt(x) for float64 x > 0, as _recip_f64: float32 estimate, one Newton step."""
    r = tl.math.rsqrt(x.to(tl.float32)).to(tl.float64)
    return r * (1.5 - 0.5 * x * r * r)


@triton.jit
def _prefetch_weight_l2(w_ptr,   # [N, K - k_lo] nn.Linear weight from a split's first column, any strides
                        cols, stride_wn, stride_wk, k_len, PREFETCH_K: tl.constexpr):
    """Asks L2 for the first PREFETCH_K columns (cut at k_len) of the weight rows `cols`
    (`[BLOCK_N]`, inside [0, N)), one request per 128-byte line; nothing waits on it. So a
    program that must first wait (for its LayerNorm statistics, or for the launch before it)
    streams its first weight tiles from HBM while it waits. Nothing where k_len <= 0 (K = 0, or a split past
    K, whose shifted w_ptr is past the weight); else every address is inside the weight. Issued
    4 lines of each row at a time: all of a row's 64-bit addresses at once made ptxas spill 8 B
    at several split-K tiles."""
    LINE_K: tl.constexpr = 1024 // w_ptr.dtype.element_ty.primitive_bitwidth   # elements a line
    if k_len > 0:
        for k0 in tl.static_range(0, PREFETCH_K, 4 * LINE_K):
            ks = tl.minimum(k0 + tl.arange(0, 4) * LINE_K, k_len - 1)
            tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // dummy $0", "=r,l",
                                      [w_ptr + cols[:, None] * stride_wn + ks[None, :] * stride_wk],
                                      dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _row_stats(x_ptr,            # [M, K] rows to normalise, any strides
               rows, row_mask, stride_xm, stride_xk, K, eps,
               BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
               STAGES: tl.constexpr):
    """Mean and 1/std (`[BLOCK_M]`, in ACC: float32 or float64) of `rows` over K.

    Each BLOCK_K chunk is centred on its own mean before squaring and the chunks are merged with
    Chan's parallel update, so rows whose mean is far above their spread, or with channels ~100x
    the rest, lose nothing to cancellation (a one-pass E[x^2] - E[x]^2 would). The merge and rstd
    run in float64 on `[BLOCK_M]` vectors (negligible work): in float32 their roundings alone
    cost ~1e-7 of rstd, which shows as fp16 misrounding where LN's two terms nearly cancel.
    STAGES > 1 software-pipelines the chunk loads (cp.async), so a GEMM prologue does not wait
    out one memory latency per chunk.
    """
    mean = tl.zeros([BLOCK_M], dtype=tl.float64)
    m2 = tl.zeros([BLOCK_M], dtype=tl.float64)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = row_mask[:, None] & (cols < K)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                    mask=mask, other=0.0).to(ACC)
        n_seen = tl.cast(k0, tl.float64)                      # every earlier chunk was full
        n_chunk = tl.cast(tl.minimum(K - k0, BLOCK_K), tl.float64)
        chunk_mean = tl.sum(x, axis=1) * _recip_f64(n_chunk).to(ACC)
        centred = tl.where(mask, x - chunk_mean[:, None], 0.0)
        chunk_m2 = tl.sum(centred * centred, axis=1).to(tl.float64)
        chunk_share = n_chunk * _recip_f64(n_seen + n_chunk)
        delta = chunk_mean.to(tl.float64) - mean
        mean += delta * chunk_share
        m2 += chunk_m2 + delta * delta * (n_seen * chunk_share)
    rstd = _rsqrt_f64(m2 * _recip_f64(tl.cast(K, tl.float64)) + eps)
    return mean.to(ACC), rstd.to(ACC)


@triton.jit
def _prefetch_gemm_weight(gemm_w_ptr,   # [P, K] weight of the GEMM after a LayerNorm launch, any strides
                          P, stride_gn, stride_gk, K, PREFETCH_K: tl.constexpr):
    """With PREFETCH_K > 0 (NVIDIA GPUs), a LayerNorm program's share of the rows of the GEMM's
    weight, whose first PREFETCH_K columns it asks L2 for (_prefetch_weight_l2): the GEMM after
    it cannot start early and prefetch for itself (cuBLAS's: GemmLaunch.cublas with overlap), so
    HBM streams them while the LayerNorm launch's own short round trips leave it idle, and the
    GEMM finds them in L2. Nothing waits on it."""
    if PREFETCH_K > 0:
        share = tl.cdiv(P, tl.num_programs(0))
        first = tl.program_id(0) * share
        for r0 in range(first, tl.minimum(first + share, P), _PREFETCH_ROWS):
            _prefetch_weight_l2(gemm_w_ptr, tl.minimum(r0 + tl.arange(0, _PREFETCH_ROWS), P - 1), stride_gn,
                                stride_gk, K, PREFETCH_K)


@triton.jit
def _layer_norm_kernel(x_ptr,     # [M, N] input, any strides (may alias out_ptr: see below)
                       w_ptr,     # [N] gamma, contiguous
                       b_ptr,     # [N] beta, contiguous
                       out_ptr,   # [M, N] output, any strides
                       gemm_w_ptr,  # PREFETCH_K: [P, N] weight of the GEMM after it, any strides; else None
                       M, N, stride_xm, stride_xn, stride_om, stride_on, eps, P, stride_gn, stride_gk,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ONE_TILE: tl.constexpr,
                       LAUNCH_DEPENDENTS: tl.constexpr, PREFETCH_K: tl.constexpr):
    # LAUNCH_DEPENDENTS (sm_90+): the GEMM after it, a programmatic dependent launch, may start
    # now and prefetch its weights; it waits for this grid to finish before reading its output.
    if LAUNCH_DEPENDENTS:
        gdc_launch_dependents()
    # float64 throughout: in float32 the roundings of (x - mean) * rstd * gamma + beta misround
    # fp16 results where the two terms nearly cancel (error past 0.75 ulp on outlier rows). The
    # kernel is memory-bound, so on A100 / H100 the float64 math is hidden behind the loads.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    if ONE_TILE:
        # BLOCK_N >= N: whole rows in registers, read once. Ahead of a decode-sized GEMM
        # (normalize_first) the launch is one memory round trip instead of two per chunk (the
        # statistics pass, then the normalising pass reading x again), which the GEMM waits out.
        # Two-pass statistics from the registers: the exact mean, then the centred squares.
        cols = tl.arange(0, BLOCK_N)
        col_mask = cols < N
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xn,
                    mask=mask, other=0.0).to(tl.float64)
        # (gamma and beta widened only where used: held in float64 across the statistics, the
        # 8192-column tile spilled on sm_80)
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0)
        b = tl.load(b_ptr + cols, mask=col_mask, other=0.0)
        # after this launch's own loads, which the prefetches must not queue ahead of
        _prefetch_gemm_weight(gemm_w_ptr, P, stride_gn, stride_gk, N, PREFETCH_K)
        inv_n = _recip_f64(tl.cast(N, tl.float64))
        mean = tl.sum(x, axis=1) * inv_n
        centred = tl.where(mask, x - mean[:, None], 0.0)
        rstd = _rsqrt_f64(tl.sum(centred * centred, axis=1) * inv_n + eps)
        y = centred * rstd[:, None] * w.to(tl.float64)[None, :] + b.to(tl.float64)[None, :]
        # via float32 as below; every load is done before the store, so out may alias x
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on,
                 y.to(tl.float32).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        _prefetch_gemm_weight(gemm_w_ptr, P, stride_gn, stride_gk, N, PREFETCH_K)
        mean, rstd = _row_stats(x_ptr, rows, row_mask, stride_xm, stride_xn, N, eps,
                                BLOCK_M, BLOCK_N, tl.float64, 1)
        # A program owns whole rows and reads each chunk before writing it, so the post-LN GEMM
        # can normalise its output in place.
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_mask = cols < N
            mask = row_mask[:, None] & col_mask[None, :]
            x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xn,
                        mask=mask, other=0.0).to(tl.float64)
            w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float64)
            b = tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float64)
            y = (x - mean[:, None]) * rstd[:, None] * w[None, :] + b[None, :]
            # via float32: there is no direct float64 -> bfloat16 conversion (and the extra
            # rounding moves a 16-bit result by at most 2**-13 of its ulp)
            tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on,
                     y.to(tl.float32).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _row_stats_kernel(x_ptr,       # [M, K] rows to normalise, any strides
                      stats_ptr,   # [2, M] float32, contiguous: mean in row 0, rstd in row 1
                      M, K, stride_xm, stride_xk, eps,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
                      LAUNCH_DEPENDENTS: tl.constexpr):
    if LAUNCH_DEPENDENTS:    # as in _layer_norm_kernel
        gdc_launch_dependents()
    # The GEMM prologue's statistics (same Chan merge in float64, same float32 results), written
    # once per row, so that split-K programs and every N tile of a row block load two floats
    # instead of re-reading the row over the whole K.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    mean, rstd = _row_stats(x_ptr, rows, row_mask, stride_xm, stride_xk, K, eps,
                            BLOCK_M, BLOCK_K, tl.float32, STAGES)
    tl.store(stats_ptr + rows, mean, mask=row_mask)
    tl.store(stats_ptr + M + rows, rstd, mask=row_mask)


@triton.jit
def _fused_linear_kernel(x_ptr,      # [M, K] activations, any strides
                         ln_w_ptr,   # [K] LayerNorm gamma, contiguous (read only with HAS_LN)
                         ln_b_ptr,   # [K] LayerNorm beta, contiguous (read only with HAS_LN)
                         stats_ptr,  # [2, M] float32 mean / rstd (read only with STATS_FROM_MEMORY)
                         w_ptr,      # [N, K] nn.Linear weight, any strides
                         bias_ptr,   # [N] bias, contiguous (not read with PARTIAL_OUT)
                         res_ptr,    # [M, N] residual, any strides (read only with HAS_RESIDUAL)
                         out_ptr,    # [M, N] output, any strides; with PARTIAL_OUT the float32
                                     # workspace [splits * M, N] (strides stride_om, stride_on)
                         x_desc,     # TMA descriptors of x [M, K] in [BLOCK_M, BLOCK_K] boxes
                         w_desc,     # and of w [N, K] in [BLOCK_N, BLOCK_K] boxes; None without USE_TMA
                         M, N, K,
                         stride_xm, stride_xk, stride_wn, stride_wk,
                         stride_rm, stride_rn, stride_om, stride_on, eps, k_per_split,
                         HAS_LN: tl.constexpr, RELU: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr, STATS_K: tl.constexpr, STATS_STAGES: tl.constexpr,
                         STATS_FROM_MEMORY: tl.constexpr, PARTIAL_OUT: tl.constexpr,
                         PREFETCH_K: tl.constexpr, PDL_WAIT: tl.constexpr,
                         LAUNCH_DEPENDENTS: tl.constexpr, USE_TMA: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """out = [relu]([LN](x) @ w^T + bias) [+ residual], fp32 accumulation. The LayerNorm row
    statistics come from a first pass over x in chunks of STATS_K columns, or with
    STATS_FROM_MEMORY from `stats_ptr` (written by _row_stats_kernel).

    With PARTIAL_OUT, grid axis 1 splits K: program (tile, s) sums K columns [s * k_per_split,
    (s + 1) * k_per_split) (k_per_split a multiple of BLOCK_K, so whole tiles) and stores that
    float32 partial, with no epilogue, to rows s * M ... of the workspace; a split past K stores
    zeros. _split_k_reduce_kernel adds the splits and applies the epilogue.

    PREFETCH_K > 0: each program first asks L2 for that many columns of its weight rows. With
    PDL_WAIT the program is a programmatic dependent launch (sm_90+) that may start while the
    launch before it (the LayerNorm or statistics kernel) still runs: it reads x and the
    statistics only after griddepcontrol.wait. LAUNCH_DEPENDENTS lets the reduce launch do the
    same behind this one. USE_TMA: the main loop's x and w tiles come as bulk copies through
    the descriptors (rows and columns past the tensors read as zeros; the dropped rows and
    columns past M and N are not stored either way)."""
    # Grouped order: GROUP_M row blocks share each weight column block while it is in L2.
    pid = tl.program_id(0)
    blocks_m, blocks_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group_width = GROUP_M * blocks_n
    first_m = (pid // group_width) * GROUP_M
    group_rows = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_width) % group_rows
    pid_n = (pid % group_width) // group_rows

    if PARTIAL_OUT:
        # k_per_split from the host: a division here (by the split count) kept more scalars
        # live across the K loop, which ptxas spilled at some tiles
        k_lo = tl.program_id(1) * k_per_split
        # this split's columns; <= 0 past K (no iterations, the partial stays zero), and for the
        # last split the K tail, so it also bounds the K masks
        k_len = tl.minimum(k_per_split, K - k_lo)
    else:
        k_lo = 0
        k_len = K

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask, col_mask = rows < M, cols < N
    if PARTIAL_OUT:
        # Move the K origin to this split's first column, so that the loop below is the unsplit
        # one over k_len columns (a loop from a runtime k_lo, or k_lo added to every index, kept
        # scalars live across it that ptxas spilled: 8-16 B at several tiles).
        x_ptr += k_lo * stride_xk
        w_ptr += k_lo * stride_wk
        ln_w_ptr += k_lo
        ln_b_ptr += k_lo
        # Rows and columns past M and N load the last row / column again instead of being masked
        # (the store drops them): with only the K mask in the loop, the row and column predicates
        # are not live across it, which ptxas otherwise spilled to the stack at some tiles.
        a_rows, b_cols = tl.minimum(rows, M - 1), tl.minimum(cols, N - 1)
        a_row_mask = tl.full([BLOCK_M], True, tl.int1)
        b_col_mask = tl.full([BLOCK_N], True, tl.int1)
    else:
        a_rows, b_cols, a_row_mask, b_col_mask = rows, cols, row_mask, col_mask
    if LAUNCH_DEPENDENTS:
        gdc_launch_dependents()
    if PREFETCH_K > 0:
        _prefetch_weight_l2(w_ptr, tl.minimum(cols, N - 1), stride_wn, stride_wk, k_len, PREFETCH_K)
    if PDL_WAIT:
        gdc_wait()   # x (normalize_first) and the statistics come from the launch before
    if HAS_LN:
        if STATS_FROM_MEMORY:
            mean = tl.load(stats_ptr + rows, mask=row_mask, other=0.0)
            rstd = tl.load(stats_ptr + M + rows, mask=row_mask, other=0.0)
        else:   # over all of x's K (only an unsplit GEMM computes them here)
            mean, rstd = _row_stats(x_ptr, rows, row_mask, stride_xm, stride_xk, K, eps,
                                    BLOCK_M, STATS_K, tl.float32, STATS_STAGES)
        # gamma and beta are [BLOCK_K] vectors, too narrow per thread for cp.async, so the
        # pipeliner leaves them as plain loads that each iteration would wait on: load them one
        # iteration ahead instead. gamma = beta = 0 past k_len (K, or this split's end), so the K
        # tail of the normalised tile is exactly zero.
        first_ks = tl.arange(0, BLOCK_K)
        g_next = tl.load(ln_w_ptr + first_ks, mask=first_ks < k_len, other=0.0)
        beta_next = tl.load(ln_b_ptr + first_ks, mask=first_ks < k_len, other=0.0)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k_len, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < k_len
        if USE_TMA:
            # Descriptors address the whole tensors: this split's columns from k_lo. They bound K
            # only at K, which is right because a split is whole BLOCK_K tiles (k_per_split), so
            # no tile but the last split's reaches into the next one.
            a = x_desc.load([pid_m * BLOCK_M, k_lo + k0])
        else:
            a = tl.load(x_ptr + a_rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                        mask=a_row_mask[:, None] & k_mask[None, :], other=0.0)
        if HAS_LN:
            g, beta = g_next.to(tl.float32), beta_next.to(tl.float32)
            ks_next = ks + BLOCK_K
            g_next = tl.load(ln_w_ptr + ks_next, mask=ks_next < k_len, other=0.0)
            beta_next = tl.load(ln_b_ptr + ks_next, mask=ks_next < k_len, other=0.0)
            a_norm = (a.to(tl.float32) - mean[:, None]) * rstd[:, None] * g[None, :] + beta[None, :]
            a = a_norm.to(x_ptr.dtype.element_ty)   # rounded like the unfused LN output
        # the weight tile as [BLOCK_K, BLOCK_N] = w^T, straight from nn.Linear's [N, K]
        if USE_TMA:
            b = w_desc.load([pid_n * BLOCK_N, k_lo + k0]).T
        else:
            b = tl.load(w_ptr + b_cols[None, :] * stride_wn + ks[:, None] * stride_wk,
                        mask=k_mask[:, None] & b_col_mask[None, :], other=0.0)
        if UPCAST_DOT:
            # Triton's interpreter multiplies bfloat16 tiles as their raw uint16 bits; products
            # of bf16 values are exact in fp32, as on tensor cores.
            a, b = a.to(tl.float32), b.to(tl.float32)
        # ieee: fp32 inputs would otherwise run as TF32 on GPUs (no effect on fp16 / bf16)
        acc = tl.dot(a, b, acc, input_precision="ieee")

    mask = row_mask[:, None] & col_mask[None, :]
    if PARTIAL_OUT:
        ws_rows = tl.program_id(1) * M + rows   # this split's [M, N] slab of the workspace
        tl.store(out_ptr + ws_rows[:, None] * stride_om + cols[None, :] * stride_on, acc, mask=mask)
    else:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if RELU:
            acc = tl.maximum(acc, 0.0)
        if HAS_RESIDUAL:
            acc += tl.load(res_ptr + rows[:, None] * stride_rm + cols[None, :] * stride_rn,
                           mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on,
                 acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _split_k_reduce_kernel(ws_ptr,     # [SPLIT_K, M, N] float32 partial sums, contiguous
                           bias_ptr,   # [N] bias, contiguous
                           res_ptr,    # [M, N] residual, any strides (read only with HAS_RESIDUAL)
                           out_ptr,    # [M, N] output, any strides
                           M, N, stride_rm, stride_rn, stride_om, stride_on,
                           SPLIT_K: tl.constexpr, RELU: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                           BLOCK: tl.constexpr, PDL_WAIT: tl.constexpr):
    if PDL_WAIT:   # a programmatic dependent launch: the partials are written by the GEMM before
        gdc_wait()
    # Flat over the M x N outputs: M is small where split-K pays, so 2-D tiles would be mostly
    # masked rows. The splits are added in index order (no atomics), so the result does not
    # depend on which GEMM program finished first; unrolled, so all SPLIT_K loads are in flight
    # together.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    size = M * N
    mask = offs < size
    rows, cols = offs // N, offs % N
    acc = tl.load(ws_ptr + offs, mask=mask, other=0.0)
    for split in tl.static_range(1, SPLIT_K):
        acc += tl.load(ws_ptr + split * size + offs, mask=mask, other=0.0)
    # the GEMM epilogue, in the same order
    acc += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        acc = tl.maximum(acc, 0.0)
    if HAS_RESIDUAL:
        acc += tl.load(res_ptr + rows * stride_rm + cols * stride_rn, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows * stride_om + cols * stride_on, acc.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

# The checks run on every launch (each layer of every step): each reads a tensor attribute once
# and builds its message only on failure.
def _check_2d(name: str, t, shape: tuple, x: torch.Tensor) -> None:
    """A 2-D tensor of `shape` (None: any size) with x's dtype and device; any strides."""
    size = t.shape if isinstance(t, torch.Tensor) else ()
    rows, cols = shape
    if len(size) != 2 or (rows is not None and size[0] != rows) or (cols is not None and size[1] != cols):
        want = "x".join("*" if d is None else str(d) for d in shape)
        raise ValueError(f"{name} must be a [{want}] tensor, got {getattr(t, 'shape', type(t))}")
    if t.dtype != x.dtype or (t is not x and t.device != x.device):
        raise ValueError(f"{name} is {t.dtype} on {t.device}, expected {x.dtype} on {x.device} like x")
    row_stride, col_stride = t.stride()
    if (size[0] - 1) * row_stride + (size[1] - 1) * col_stride > _INT32_MAX:
        raise ValueError(f"{name} with strides {t.stride()} does not fit the kernels' int32 offsets")


def _check_vector(name: str, t, n: int, x: torch.Tensor) -> None:
    """A contiguous [n] tensor with x's dtype and device (LayerNorm parameters, biases)."""
    if not isinstance(t, torch.Tensor) or t.shape != (n,):
        raise ValueError(f"{name} must be a [{n}] tensor, got {getattr(t, 'shape', type(t))}")
    if t.dtype != x.dtype or t.device != x.device:
        raise ValueError(f"{name} is {t.dtype} on {t.device}, expected {x.dtype} on {x.device} like x")
    if n > 1 and t.stride(0) != 1:
        raise ValueError(f"{name} must be contiguous, got stride {t.stride(0)}")


def _check_x(x) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype not in _DTYPES:
        got = getattr(x, "dtype", type(x))
        raise ValueError(f"x must be a float16, bfloat16 or float32 tensor, got {got}")
    _check_2d("x", x, (None, None), x)


def _check_linear(x, weight, bias) -> int:
    """Checks x, weight `[out, in]` and bias `[out]`; returns out."""
    _check_x(x)
    _check_2d("weight", weight, (None, x.shape[1]), x)
    _check_vector("bias", bias, weight.shape[0], x)
    return weight.shape[0]


def _override(config, dtype: torch.dtype) -> GemmLaunch | None:
    """A public `config` argument checked and fitted to `dtype` (None: the heuristic's)."""
    return None if config is None else _fit(_check_config(config), dtype)


def _launch_linear(x, ln_weight, ln_bias, weight, bias, residual, eps, relu, out, config=None) -> None:
    m, k = x.shape
    n = weight.shape[0]
    if config is None:
        config = default_launch(m, n, k, x.dtype, _num_sms(x.device), has_ln=ln_weight is not None)
    if config.cublas:
        _launch_cublas_linear(x, ln_weight, ln_bias, weight, bias, residual, eps, relu, out, config.overlap)
        return
    has_res = residual is not None
    flags = _gemm_flags(config, ln_weight is not None, relu, has_res, _capability(x.device))
    split_k, partial = config.split_k, flags["PARTIAL_OUT"]
    # a programmatic dependent launch: the launch before lets it start early (GemmLaunch.overlap)
    gemm_is_dependent = flags["PDL_WAIT"]
    if partial and split_k * m * n > _INT32_MAX:
        raise ValueError(f"config.split_k={split_k} needs a {split_k}x{m}x{n} workspace, past the "
                         "kernels' int32 offsets")
    cfg = _kernel_options(config, x.dtype)
    tiles = _cdiv(m, config.block_m) * _cdiv(n, config.block_n)
    if ln_weight is not None and not flags["HAS_LN"]:     # normalize_first
        x = _normalized_rows(x, ln_weight, ln_bias, eps, "normalize_first", gemm_is_dependent)
        ln_weight = ln_bias = None
    # unused pointer arguments get a placeholder tensor: the constexpr flag skips every access
    ln_w, ln_b = (ln_weight, ln_bias) if flags["HAS_LN"] else (x, x)
    res = residual if has_res else out
    stats = x
    if flags["STATS_FROM_MEMORY"]:
        stats = torch.empty((2, m), dtype=torch.float32, device=x.device)
        block_m, block_k = _stats_blocks(k)
        _row_stats_kernel[(_cdiv(m, block_m),)](x, stats, m, k, x.stride(0), x.stride(1), eps,
                                                BLOCK_M=block_m, BLOCK_K=block_k, STAGES=_STATS_STAGES,
                                                LAUNCH_DEPENDENTS=gemm_is_dependent, num_warps=4)
    if partial:
        # Split-K: the GEMM writes float32 partials to a [split_k * m, n] row-major workspace
        # with its epilogue flags off (so every split count and epilogue shares one compiled
        # GEMM); the reduce applies the epilogue.
        gemm_res = gemm_out = torch.empty((split_k * m, n), dtype=torch.float32, device=x.device)
        k_per_split = _cdiv(_cdiv(k, config.block_k), split_k) * config.block_k   # whole K tiles
    else:
        gemm_res, gemm_out, k_per_split = res, out, k
    grid = (tiles, split_k) if partial else (tiles,)
    descs = (None, None)
    if flags["USE_TMA"]:
        if k and _tma_addressable(x) and _tma_addressable(weight):
            descs = (TensorDescriptor.from_tensor(x, [config.block_m, config.block_k]),
                     TensorDescriptor.from_tensor(weight, [config.block_n, config.block_k]))
        else:
            flags = dict(flags, USE_TMA=False)
    _fused_linear_kernel[grid](x, ln_w, ln_b, stats, weight, bias, gemm_res, gemm_out, *descs, m, n, k,
                               x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
                               gemm_res.stride(0), gemm_res.stride(1), gemm_out.stride(0),
                               gemm_out.stride(1), eps, k_per_split, **flags, **cfg,
                               launch_pdl=gemm_is_dependent)
    if partial:
        reduce_is_dependent = flags["LAUNCH_DEPENDENTS"]
        _split_k_reduce_kernel[(_cdiv(m * n, _REDUCE_BLOCK),)](
            gemm_out, bias, res, out, m, n, res.stride(0), res.stride(1), out.stride(0), out.stride(1),
            SPLIT_K=split_k, RELU=relu, HAS_RESIDUAL=has_res, BLOCK=_REDUCE_BLOCK,
            PDL_WAIT=reduce_is_dependent, num_warps=4, launch_pdl=reduce_is_dependent)


def _launch_cublas_linear(x, ln_weight, ln_bias, weight, bias, residual, eps, relu, out,
                          prefetch: bool = False) -> None:
    """GemmLaunch.cublas: our LayerNorm launch where there is a LayerNorm (with `prefetch`,
    GemmLaunch.overlap, asking L2 for the weight's first columns), then cuBLAS's GEMM into
    `out`; the epilogue in the kernel's order (ReLU, then the residual)."""
    if ln_weight is not None:
        x = _normalized_rows(x, ln_weight, ln_bias, eps, "cublas", gemm_weight=weight if prefetch else None)
    if relu:   # the torch pair's fc1: the ReLU in cuBLASLt's bias epilogue
        torch._addmm_activation(bias, x, weight.t(), out=out)
    else:
        torch.addmm(bias, x, weight.t(), out=out)
    if residual is not None:
        out.add_(residual)


def _normalized_rows(x, weight, bias, eps, option: str, launch_dependents: bool = False,
                     gemm_weight: torch.Tensor | None = None) -> torch.Tensor:
    """x's rows through our LayerNorm launch, into a new [m, k] buffer of x's dtype: what the
    GEMM reads under `option` (normalize_first, cublas); `gemm_weight`: that GEMM's weight, whose
    first columns the launch asks L2 for (_launch_layer_norm)."""
    m, k = x.shape
    if m * k > _INT32_MAX:   # x may be a broadcast view that passed the offsets check
        raise ValueError(f"config.{option} needs a {m}x{k} buffer, past the kernels' int32 offsets")
    normed = torch.empty((m, k), dtype=x.dtype, device=x.device)
    _launch_layer_norm(x, weight, bias, eps, normed, launch_dependents=launch_dependents, gemm_weight=gemm_weight)
    return normed


def _launch_layer_norm(x, weight, bias, eps, out, launch_dependents: bool = False,
                       gemm_weight: torch.Tensor | None = None) -> None:
    """The LayerNorm launch; with `gemm_weight` ([P, n], the GEMM after it) on an NVIDIA GPU it
    also prefetches that weight's first _PREFETCH_K columns into L2 (none in the interpreter or
    on ROCm: no inline PTX there)."""
    m, n = x.shape
    blocks = _ln_blocks(n)
    gemm_w = gemm_weight if gemm_weight is not None and _capability(x.device) else None
    _layer_norm_kernel[(_cdiv(m, blocks.block_m),)](
        x, weight, bias, out, gemm_w, m, n, x.stride(0), x.stride(1), out.stride(0), out.stride(1), eps,
        *((gemm_w.shape[0], gemm_w.stride(0), gemm_w.stride(1)) if gemm_w is not None else (0, 0, 0)),
        BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, ONE_TILE=blocks.one_tile,
        LAUNCH_DEPENDENTS=launch_dependents, PREFETCH_K=_PREFETCH_K if gemm_w is not None else 0,
        num_warps=blocks.num_warps)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm of each row of x `[tokens, n]` (any strides), as `layer_norm_ref`.

    weight, bias: `[n]`. Statistics and normalisation run in float64 and are rounded once, so
    fp16 rows with outlier channels come out correctly rounded. Returns a new contiguous tensor
    of x's dtype.
    """
    _check_x(x)
    _check_vector("weight", weight, x.shape[1], x)
    _check_vector("bias", bias, x.shape[1], x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel():
        _launch_layer_norm(x, weight, bias, eps, out)
    return out


def layernorm_linear(x: torch.Tensor, ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None,
                     weight: torch.Tensor, bias: torch.Tensor, eps: float,
                     relu: bool = False, *, config: tuple | None = None) -> torch.Tensor:
    """`[relu](LN(x) @ weight.T + bias)` in one kernel; with ln_weight None a plain linear.

    x: `[tokens, in]` (any strides); weight: `[out, in]` (nn.Linear layout, any strides); bias:
    `[out]`; ln_weight, ln_bias: `[in]`. The LayerNorm is applied to each A tile as the GEMM loads
    it, from row statistics of a first pass over K (up to 64 tokens in fp16 / bf16, by default
    from a statistics launch, or as a LayerNorm launch before the GEMM: gemm_config.
    default_launch). Returns a new contiguous `[tokens, out]`.
    `config` (block_m, block_n, block_k, num_warps, num_stages[, split_k[, stats_kernel[,
    normalize_first[, overlap[, tma[, cublas]]]]]]; blocks powers of two 16..256, 1..6 stages, split_k in
    1, 2, 3, 4, 6, 8, the options bools; see GemmLaunch) overrides `default_launch`, for tests
    and the tile sweep. split_k > 1 adds a reduce launch and, with a LayerNorm, the statistics
    launch (stats_kernel=True adds that alone); normalize_first instead runs the LayerNorm
    launch, then a plain GEMM (split or not), with no statistics launch; overlap changes no
    result, only when each launch starts and what L2 holds (on a GPU); nor does tma, only how
    tiles are loaded; cublas runs cuBLAS's GEMM after the LayerNorm launch, with no option of
    ours beside it.
    float32 inputs always run small CUDA-core tiles (the options are kept, but for tma).
    """
    n = _check_linear(x, weight, bias)
    config = _override(config, x.dtype)
    if (ln_weight is None) != (ln_bias is None):
        raise ValueError("ln_weight and ln_bias must both be given or both be None")
    if ln_weight is not None:
        _check_vector("ln_weight", ln_weight, x.shape[1], x)
        _check_vector("ln_bias", ln_bias, x.shape[1], x)
    out = torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
    if out.numel():
        _launch_linear(x, ln_weight, ln_bias, weight, bias, None, eps, bool(relu), out, config)
    return out


def linear_residual(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    residual: torch.Tensor, *, config: tuple | None = None) -> torch.Tensor:
    """`x @ weight.T + bias + residual` with both adds in the GEMM epilogue (out_proj, fc2).

    x: `[tokens, in]`, residual: `[tokens, out]` (both any strides); weight: `[out, in]`; bias:
    `[out]`. Returns a new contiguous `[tokens, out]` tensor. `config` as for layernorm_linear
    (with split_k > 1 the adds run in the reduce launch; the LayerNorm options have no effect).
    """
    n = _check_linear(x, weight, bias)
    _check_2d("residual", residual, (x.shape[0], n), x)
    config = _override(config, x.dtype)
    out = torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
    if out.numel():
        _launch_linear(x, None, None, weight, bias, residual, 0.0, False, out, config)
    return out


def linear_residual_layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                              residual: torch.Tensor, ln_weight: torch.Tensor,
                              ln_bias: torch.Tensor, eps: float, *,
                              config: tuple | None = None) -> torch.Tensor:
    """`LN(x @ weight.T + bias + residual)`, the post-LN (OPT-350m) layout.

    Two launches: the GEMM writes the pre-norm sum (rounded to x's dtype, as the unfused layout
    does) and the LayerNorm kernel normalises it in place, since the statistics need whole rows,
    which no GEMM program holds. Shapes as `linear_residual`; ln_weight, ln_bias: `[out]`.
    `config` overrides the GEMM's launch as for linear_residual (split_k > 1: three launches).
    """
    n = _check_linear(x, weight, bias)
    _check_2d("residual", residual, (x.shape[0], n), x)
    _check_vector("ln_weight", ln_weight, n, x)
    _check_vector("ln_bias", ln_bias, n, x)
    config = _override(config, x.dtype)
    out = torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
    if out.numel():
        _launch_linear(x, None, None, weight, bias, residual, 0.0, False, out, config)
        _launch_layer_norm(out, ln_weight, ln_bias, eps, out)
    return out


# --------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (kernels/compile_check.py)
# --------------------------------------------------------------------------------------------

# the widths the LayerNorm kernel sees: OPT hidden sizes (768 ... 5120), and 350m's 512
_LN_WIDTHS = (512, 768, 1024, 2048, 2560, 4096, 5120)
# and a width past _LN_ROW_TILE_MAX, for the chunked form none of those runs
_LN_CHUNKED_WIDTHS = (16384,)
_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# (HAS_LN, RELU, HAS_RESIDUAL): the heaviest prologue and the heaviest epilogue. The decoder's
# other combinations (LN alone, plain, ReLU alone) use the same or fewer registers than these
# (checked once on the full set: LN and LN+ReLU compile alike, plain and ReLU below residual).
_LINEAR_FLAGS = ((True, True, False), (False, False, True))


# The JIT specialises an int argument equal to 1 as a constant, and marks ints that are multiples
# of 16 (and torch's allocations) as such: the specs do the same for the model's layout, row-major
# activations and nn.Linear weights of OPT widths. Other layouts run a generic variant.
_LN_UNIT_STRIDES = ("stride_xn", "stride_on")
_GEMM_UNIT_STRIDES = ("stride_xk", "stride_wk", "stride_rn", "stride_on")
_GEMM_DIVISIBLE = ("N", "K", "k_per_split", "stride_xm", "stride_wn", "stride_rm", "stride_om")


# Tile configs the launch options (GemmLaunch split_k, stats_kernel, normalize_first, overlap, tma)
# are compile-checked at: the tile sweep's candidates with options (benchmarks/sweep_tiles.py, LnQkv)
# and the tiers' picks they grew from. fp32 runs every config as one fitted tile (_fit).
_OPTION_CONFIGS = tuple(GemmConfig(*c) for c in (
    (16, 128, 128, 4, 3), (16, 64, 128, 4, 4), (16, 64, 256, 8, 3), (16, 32, 256, 4, 4),
    (32, 64, 128, 4, 4), (64, 64, 128, 4, 3), (64, 128, 64, 8, 3)))
# The launch options checked at each of them: every split count runs one compiled GEMM (the count
# is a runtime argument), so split 2 stands for all.
_OPTIONS = (
    dict(split_k=2), dict(stats_kernel=True), dict(normalize_first=True),
    dict(overlap=True), dict(split_k=2, overlap=True), dict(stats_kernel=True, overlap=True),
    dict(normalize_first=True, overlap=True), dict(split_k=2, normalize_first=True, overlap=True),
    dict(tma=True), dict(split_k=2, tma=True), dict(normalize_first=True, tma=True),
    dict(overlap=True, tma=True), dict(split_k=2, overlap=True, tma=True),
    dict(stats_kernel=True, overlap=True, tma=True), dict(normalize_first=True, overlap=True, tma=True),
    dict(split_k=2, normalize_first=True, overlap=True, tma=True))
# Deeper pipelines the sweep tries with tma alone (TMA copies hold no registers, so more stages
# in flight cost only shared memory): checked with the options that include tma.
_TMA_OPTION_CONFIGS = tuple(GemmConfig(*c) for c in ((16, 128, 128, 4, 4), (64, 128, 64, 8, 5), (64, 64, 128, 4, 4)))
# 64-row tiles the sweep tries only as the default's form (normalize_first, overlap, tma): a
# deeper ring of narrow K steps, a wider N tile, and twice the programs (LnQkv.SIXTY_FOUR_WIDER).
_TMA_FIRST_CONFIGS = tuple(GemmConfig(*c) for c in ((64, 64, 64, 4, 6), (64, 128, 128, 8, 3), (64, 32, 128, 4, 4)))
_TMA_FIRST = dict(normalize_first=True, overlap=True, tma=True)
# The kernels around the GEMM without and with their programmatic-dependent-launch instruction
# (griddepcontrol: sm_90+), as (flag, targets); labels say what it does in each kernel
# ("pdl-next": lets the launch after start, "pdl-wait": waits for the one before).
_PDL_VARIANTS = ((False, (80, 90)), (True, (90,)))
# (RELU, HAS_RESIDUAL) of the reduce: its two epilogue loads / ops (QKV has neither)
_REDUCE_FLAGS = ((True, False), (False, True))


def _checked_launches(dtype: torch.dtype) -> list[GemmLaunch]:
    """The GEMM launches the compile check builds for `dtype`: each one the heuristics can pick
    (default_config's tiles, default_launch's options), and each option at the override tiles,
    fitted as the launcher fits it."""
    launches = [GemmLaunch(*c) for c in _gemm_configs(dtype)]
    launches += _default_launches() if dtype != torch.float32 else []
    launches += [_fit(GemmLaunch(*c, **options), dtype) for c in _OPTION_CONFIGS for options in _OPTIONS]
    launches += [_fit(GemmLaunch(*c, **options), dtype) for c in _TMA_OPTION_CONFIGS for options in _OPTIONS
                 if options.get("tma")]
    launches += [_fit(GemmLaunch(*c, **_TMA_FIRST), dtype) for c in _TMA_FIRST_CONFIGS]
    return launches


def _gemm_variants(dtype: torch.dtype) -> dict[tuple, list[int]]:
    """The GEMM variants the compile check builds for `dtype`, as {(GemmConfig, flag items of
    _gemm_flags): [capabilities that run it]}: each of _checked_launches under the heaviest
    prologue and the heaviest epilogue (_LINEAR_FLAGS)."""
    variants: dict[tuple, list[int]] = {}
    for config in _checked_launches(dtype):
        for has_ln, relu, has_res in _LINEAR_FLAGS:
            for capability in (80, 90):
                flags = _gemm_flags(config, has_ln, relu, has_res, capability)
                targets = variants.setdefault((GemmConfig(*config[:5]), tuple(flags.items())), [])
                if capability not in targets:
                    targets.append(capability)
    return variants


def compile_specs() -> list:
    """Every specialisation the launchers can pick (block configurations x dtypes, the heaviest
    flags), for the sm_80 / sm_90 compile check. Shapes enter only through _ln_blocks and
    _stats_blocks. The GEMM with launch options (split_k, stats_kernel, normalize_first,
    overlap, tma: gemm_config.GemmLaunch) is checked at _OPTION_CONFIGS, the configs overrides
    are expected to ask for, as the variant each target runs (_gemm_variants); the LayerNorm,
    statistics and reduce kernels also as programmatic dependent launches on sm_90
    (_PDL_VARIANTS)."""
    from .compile_check import CompileSpec
    specs = []
    for dtype, t in _TYPES.items():
        ptr = f"*{t}"
        ln_sig = dict(x_ptr=ptr, w_ptr=ptr, b_ptr=ptr, out_ptr=ptr, gemm_w_ptr="constexpr", M="i32", N="i32",
                      stride_xm="i32", stride_xn="constexpr", stride_om="i32", stride_on="constexpr",
                      eps="fp32", P="i32", stride_gn="i32", stride_gk="i32", BLOCK_M="constexpr",
                      BLOCK_N="constexpr", ONE_TILE="constexpr", LAUNCH_DEPENDENTS="constexpr",
                      PREFETCH_K="constexpr")
        # the GEMM's weight to prefetch (GemmLaunch.cublas with overlap): a row stride of whole
        # 16-element groups, unit column stride
        prefetch_sig = dict(ln_sig, gemm_w_ptr=ptr, stride_gk="constexpr")
        for blocks in sorted({_ln_blocks(n) for n in _LN_WIDTHS + _LN_CHUNKED_WIDTHS}):
            label = f"{t} {blocks.block_m}x{blocks.block_n} w{blocks.num_warps}" + " chunked" * (not blocks.one_tile)
            shape = dict(BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, ONE_TILE=blocks.one_tile,
                         **dict.fromkeys(_LN_UNIT_STRIDES, 1))
            for pdl, targets in _PDL_VARIANTS:
                specs.append(CompileSpec(
                    _layer_norm_kernel, label + " pdl-next" * pdl, ln_sig,
                    dict(shape, gemm_w_ptr=None, LAUNCH_DEPENDENTS=pdl, PREFETCH_K=0),
                    divisible_by_16=("N", "stride_xm", "stride_om"), num_warps=blocks.num_warps,
                    targets=targets))
            if blocks.one_tile and dtype != torch.float32:   # before a 64-row cuBLAS GEMM
                specs.append(CompileSpec(
                    _layer_norm_kernel, label + " prefetch-gemm", prefetch_sig,
                    dict(shape, stride_gk=1, LAUNCH_DEPENDENTS=False, PREFETCH_K=_PREFETCH_K),
                    divisible_by_16=("N", "stride_xm", "stride_om", "stride_gn"), num_warps=blocks.num_warps))
        stats_sig = dict(x_ptr=ptr, stats_ptr="*fp32", M="i32", K="i32", stride_xm="i32",
                         stride_xk="constexpr", eps="fp32", BLOCK_M="constexpr", BLOCK_K="constexpr",
                         STAGES="constexpr", LAUNCH_DEPENDENTS="constexpr")
        for block_m, block_k in sorted({_stats_blocks(k) for k in _LN_WIDTHS}):
            for pdl, targets in _PDL_VARIANTS:
                specs.append(CompileSpec(
                    _row_stats_kernel, f"{t} {block_m}x{block_k}" + " pdl-next" * pdl, stats_sig,
                    dict(BLOCK_M=block_m, BLOCK_K=block_k, STAGES=_STATS_STAGES, stride_xk=1,
                         LAUNCH_DEPENDENTS=pdl),
                    divisible_by_16=("K", "stride_xm"), num_warps=4, targets=targets))
        reduce_sig = dict(ws_ptr="*fp32", bias_ptr=ptr, res_ptr=ptr, out_ptr=ptr, M="i32", N="i32",
                          stride_rm="i32", stride_rn="constexpr", stride_om="i32", stride_on="constexpr",
                          SPLIT_K="constexpr", RELU="constexpr", HAS_RESIDUAL="constexpr", BLOCK="constexpr",
                          PDL_WAIT="constexpr")
        for split_k in _SPLIT_CHOICES[1:]:
            for relu, has_res in _REDUCE_FLAGS:
                for pdl, targets in _PDL_VARIANTS:
                    specs.append(CompileSpec(
                        _split_k_reduce_kernel, f"{t} split{split_k} {'relu' if relu else 'res'}" + " pdl-wait" * pdl,
                        reduce_sig, dict(SPLIT_K=split_k, RELU=relu, HAS_RESIDUAL=has_res, BLOCK=_REDUCE_BLOCK,
                                         stride_rn=1, stride_on=1, PDL_WAIT=pdl),
                        divisible_by_16=("N", "stride_rm", "stride_om"), num_warps=4, targets=targets,
                        dependent_launch=pdl))
        gemm_sig = dict(x_ptr=ptr, ln_w_ptr=ptr, ln_b_ptr=ptr, stats_ptr=ptr, w_ptr=ptr, bias_ptr=ptr,
                        res_ptr=ptr, out_ptr=ptr, M="i32", N="i32", K="i32",
                        stride_xm="i32", stride_xk="constexpr", stride_wn="i32", stride_wk="constexpr",
                        stride_rm="i32", stride_rn="constexpr", stride_om="i32", stride_on="constexpr",
                        eps="fp32", k_per_split="i32", HAS_LN="constexpr", RELU="constexpr",
                        HAS_RESIDUAL="constexpr", BLOCK_M="constexpr", BLOCK_N="constexpr",
                        BLOCK_K="constexpr", GROUP_M="constexpr", STATS_K="constexpr",
                        STATS_STAGES="constexpr", STATS_FROM_MEMORY="constexpr", PARTIAL_OUT="constexpr",
                        PREFETCH_K="constexpr", PDL_WAIT="constexpr", LAUNCH_DEPENDENTS="constexpr",
                        USE_TMA="constexpr", UPCAST_DOT="constexpr", x_desc="constexpr", w_desc="constexpr")

        for (config, flag_items), targets in _gemm_variants(dtype).items():
            flags = dict(flag_items)
            variant = ("+".join(f for f, on in (("ln", flags["HAS_LN"]), ("relu", flags["RELU"]),
                                                ("res", flags["HAS_RESIDUAL"])) if on)
                       + " stats" * flags["STATS_FROM_MEMORY"] + " split" * flags["PARTIAL_OUT"]
                       + " prefetch" * bool(flags["PREFETCH_K"]) + " pdl-wait" * flags["PDL_WAIT"]
                       + " pdl-next" * flags["LAUNCH_DEPENDENTS"] + " tma" * flags["USE_TMA"]).strip()
            label = (f"{t} {config.block_m}x{config.block_n}x{config.block_k} w{config.num_warps}s{config.num_stages} "
                     f"{variant or 'plain'}")
            # the launcher passes the float32 statistics, the float32 workspace as both output and
            # (unread) residual, and the descriptors only with USE_TMA (None otherwise)
            signature = dict(gemm_sig, **(dict(stats_ptr="*fp32") if flags["STATS_FROM_MEMORY"] else {}),
                             **(dict(res_ptr="*fp32", out_ptr="*fp32") if flags["PARTIAL_OUT"] else {}))
            descs = dict(x_desc=None, w_desc=None)
            if flags["USE_TMA"]:
                descs = {}
                signature.update(x_desc=f"tensordesc<{t}[{config.block_m},{config.block_k}]>",
                                 w_desc=f"tensordesc<{t}[{config.block_n},{config.block_k}]>")
            cfg = _kernel_options(config, dtype)
            blocks = {k: v for k, v in cfg.items() if not k.startswith("num_")}
            specs.append(CompileSpec(
                _fused_linear_kernel, label, signature,
                dict(blocks, **flags, **descs, **dict.fromkeys(_GEMM_UNIT_STRIDES, 1)),
                uses_mma=dtype != torch.float32,    # fp32 "ieee" dots run on FMA units
                uses_tma=flags["USE_TMA"], divisible_by_16=_GEMM_DIVISIBLE, num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"], targets=tuple(targets), dependent_launch=flags["PDL_WAIT"]))
    return specs
