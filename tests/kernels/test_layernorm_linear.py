"""LayerNorm and the linear layers fused around it, against float64 re-computations.

Rows with outlier channels (a few channels ~100x the rest, as in OPT-6.7B and larger) are part of
every fp16 case: an fp16 sum of squares overflows on them, and folding LN into the GEMM
(`rstd * (x@W'^T - mean * colsum(W'))`) cancels catastrophically on them (DESIGN.md §4, §5).
"""
from __future__ import annotations

import pytest
import torch

from kernel_testing import DEVICE, DTYPES, OPS, TOL, assert_close_to, gen, randn

EPS = 1e-5
# (tokens, in_features, out_features): primes, non-powers of two, head_dim 80 (2.7b) hidden sizes
SHAPES = [(1, 64, 3 * 64), (7, 80, 131), (37, 160, 3 * 160), (13, 97, 61)]


def with_outliers(x64: torch.Tensor, g: torch.Generator, rows_every: int = 2,
                  channels: int = 3, magnitude: float = 100.0) -> torch.Tensor:
    """Every `rows_every`-th row gets `channels` channels at ~`magnitude`x the rest, both signs."""
    x64 = x64.clone()
    n = x64.shape[1]
    idx = torch.randperm(n, generator=g)[:channels]
    signs = torch.where(torch.rand(channels, generator=g) < 0.5, -1.0, 1.0).double()
    x64[::rows_every, idx.to(x64.device)] = (magnitude * (1 + torch.rand(channels, generator=g).double())
                                             * signs).to(x64.device) * x64.abs().mean()
    return x64


def make_x(tokens: int, n: int, g: torch.Generator, dtype: torch.dtype, outliers: bool) -> torch.Tensor:
    """Activations with a per-row offset (so mean != 0 matters), as a non-contiguous view."""
    x = randn(tokens, n + 5, g=g, dtype=torch.float64) * 2.0 + randn(tokens, 1, g=g, dtype=torch.float64)
    if outliers:
        x = with_outliers(x, g)
    x = x.to(dtype)[:, 3:3 + n]            # row stride n + 5: not contiguous
    assert not x.is_contiguous() or tokens == 1
    return x


def naive_layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    x, w, b = x.double().cpu(), w.double().cpu(), b.double().cpu()
    mean = x.sum(-1, keepdim=True) / x.shape[-1]
    var = ((x - mean) ** 2).sum(-1, keepdim=True) / x.shape[-1]     # biased, as torch's LayerNorm
    return (x - mean) / torch.sqrt(var + eps) * w + b


def naive_linear(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return h.double().cpu() @ w.double().cpu().T + b.double().cpu()


def ln_params(n: int, g: torch.Generator, dtype: torch.dtype):
    w = (torch.rand(n, generator=g, dtype=torch.float64) + 0.5).to(dtype).to(DEVICE)
    b = randn(n, g=g, dtype=dtype, scale=0.2)
    return w, b


def linear_params(n_in: int, n_out: int, g: torch.Generator, dtype: torch.dtype):
    return randn(n_out, n_in, g=g, dtype=dtype, scale=n_in ** -0.5), randn(n_out, g=g, dtype=dtype, scale=0.2)


@pytest.mark.parametrize("ops", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [64, 80, 97, 1024])
def test_layer_norm(ops, dtype, n):
    g = gen(n)
    x = make_x(11, n, g, dtype, outliers=dtype == torch.float16)
    w, b = ln_params(n, g, dtype)
    out = ops.layer_norm(x, w, b, EPS)
    assert out.shape == x.shape
    assert_close_to(out, naive_layer_norm(x, w, b, EPS), dtype, scale=1.0)


@pytest.mark.parametrize("ops", OPS)
@pytest.mark.parametrize("n", [80, 257, 4096])
@pytest.mark.parametrize("magnitude", [100.0, 1000.0])
def test_layer_norm_fp16_outlier_rows_exact(ops, n, magnitude):
    """fp16 rows whose sum of squares is far past fp16's 65504: the result must be the float64
    LayerNorm of the same fp16 inputs to within one fp16 rounding (half an ulp plus slack), on
    the outlier channels and on the small ones alike."""
    g = gen(n + int(magnitude))
    x64 = randn(6, n, g=g, dtype=torch.float64) * 3.0 + 1.0
    x64 = with_outliers(x64, g, rows_every=1, channels=4, magnitude=magnitude)
    x = x64.to(torch.float16)
    assert (x.double().pow(2).sum(-1) > 65504).all(), "the test rows must overflow an fp16 sum of squares"
    w, b = ln_params(n, g, torch.float16)
    out = ops.layer_norm(x, w, b, EPS)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    expected = naive_layer_norm(x, w, b, EPS)
    # fp16 spacing at the expected value (subnormal spacing 2**-24 near zero)
    exponent = torch.floor(torch.log2(expected.abs().clamp(min=2.0 ** -14)))
    ulp = torch.pow(2.0, exponent - 10)
    err = (out.double().cpu() - expected).abs()
    worst = (err / ulp).max().item()
    assert worst <= 0.75, f"error {worst:.2f} fp16 ulp (a correctly rounded result is <= 0.5)"


# mean / std of the row: a one-pass variance (E[x^2] - E[x]^2, as the folded epilogue form
# accumulates it) loses about eps * (mean/std)^2 of it
OFFSET = {torch.float32: 300.0, torch.float16: 1000.0}


@pytest.mark.parametrize("ops", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_rows_with_a_large_common_offset(ops, dtype):
    """Rows whose mean is hundreds of times their spread: the statistics must be computed
    without cancellation (two-pass or Welford), as torch's LayerNorm does."""
    g = gen(31)
    n = 160
    signs = torch.tensor([1, -1, 1, 1, -1, 1, -1, -1, 1], dtype=torch.float64, device=DEVICE)
    x = (randn(9, n, g=g, dtype=torch.float64) + OFFSET[dtype] * signs[:, None]).to(dtype)
    w, b = ln_params(n, g, dtype)
    # fp32: centring itself costs ~eps32 * mean/std (~2e-5 here) in any implementation; a one-pass
    # variance is off by ~1e-3 at this offset (fp16 inputs: ~3e-2 at theirs)
    factor = 5.0 if dtype == torch.float32 else 1.0
    assert_close_to(ops.layer_norm(x, w, b, EPS), naive_layer_norm(x, w, b, EPS), dtype, scale=1.0,
                    factor=factor)
    lw, lb = linear_params(n, 67, g, dtype)
    out = ops.layernorm_linear(x, w, b, lw, lb, EPS)
    assert_close_to(out, naive_linear(naive_layer_norm(x, w, b, EPS), lw, lb), dtype, factor=2 * factor)


def near_constant_rows(n: int, eps: float, g: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Rows of a constant plus noise of standard deviation 0, 0.3, 1 and 3 x sqrt(eps), then one
    of ordinary spread: where the variance is near eps, eps weighs on every output (elsewhere it
    moves them by about eps / variance, below any tolerance). Offsets small enough that
    centring them in float32 costs well under the tolerance."""
    spreads = torch.tensor([0.0, 0.3, 1.0, 3.0, 1.0 / eps ** 0.5], dtype=torch.float64, device=DEVICE)
    offsets = torch.tensor([0.25, -0.375, 0.125, -0.25, 0.5], dtype=torch.float64, device=DEVICE)
    noise = randn(len(spreads), n, g=g, dtype=torch.float64)
    return (offsets[:, None] + spreads[:, None] * eps ** 0.5 * noise).to(dtype)


# OPT's eps and a larger one, on rows whose variance is near it: every other LayerNorm test's rows
# vary by 1 or more, where a kernel that dropped eps (or took another) would pass.
@pytest.mark.parametrize("ops", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps", [1e-5, 1e-2])
def test_eps_weighs_on_rows_of_small_variance(ops, dtype, eps):
    n = 97
    g = gen(n + int(1 / eps))
    x = near_constant_rows(n, eps, g, dtype)
    w, b = ln_params(n, g, dtype)
    expected = naive_layer_norm(x, w, b, eps)
    # the check can fail: eps moves the expected outputs by far more than the tolerance
    atol = TOL[dtype][0]
    assert (expected - naive_layer_norm(x, w, b, eps / 100)).abs().max() > 100 * atol
    assert_close_to(ops.layer_norm(x, w, b, eps), expected, dtype, scale=1.0)
    lw, lb = linear_params(n, 29, g, dtype)
    # 5 rows (a decode step's launch: statistics from their own kernel) and 70 (a prefill's: the
    # GEMM's prologue computes them)
    for copies in (1, 14):
        out = ops.layernorm_linear(x.repeat(copies, 1), w, b, lw, lb, eps, relu=False)
        assert_close_to(out, naive_linear(expected, lw, lb).repeat(copies, 1), dtype, factor=2.0)
    # post-LN: a GEMM too small to move the sum off the residual's rows (x @ W^T + b about 1e-6)
    tiny_w, tiny_b = (t * 1e-6 for t in linear_params(n, n, g, torch.float64))
    x_in = randn(x.shape[0], n, g=g, dtype=dtype)
    out = ops.linear_residual_layernorm(x_in, tiny_w.to(dtype), tiny_b.to(dtype), x, w, b, eps)
    pre = naive_linear(x_in, tiny_w.to(dtype), tiny_b.to(dtype)) + x.double().cpu()
    assert_close_to(out, naive_layer_norm(pre, w, b, eps), dtype, scale=1.0, factor=2.0)


@pytest.mark.parametrize("ops", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("with_ln", [True, False], ids=["ln", "no_ln"])
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
def test_layernorm_linear(ops, dtype, shape, with_ln, relu):
    tokens, n_in, n_out = shape
    g = gen(tokens * 1000 + n_in + n_out)
    # outlier rows only make sense in front of a LayerNorm (post-LN input is already normalised)
    x = make_x(tokens, n_in, g, dtype, outliers=with_ln)
    ln_w, ln_b = ln_params(n_in, g, dtype) if with_ln else (None, None)
    w, b = linear_params(n_in, n_out, g, dtype)
    out = ops.layernorm_linear(x, ln_w, ln_b, w, b, EPS, relu=relu)
    assert out.shape == (tokens, n_out)
    h = naive_layer_norm(x, ln_w, ln_b, EPS) if with_ln else x.double().cpu()
    expected = naive_linear(h, w, b)
    if relu:
        expected = expected.clamp(min=0)
        assert (out >= 0).all()
        assert (out == 0).any() and (out > 0).any(), "test data should exercise both sides of ReLU"
    # fp16: the normalised activations are rounded to fp16 before the GEMM in any implementation
    assert_close_to(out, expected, dtype, factor=2.0)


@pytest.mark.parametrize("ops", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_linear_residual(ops, dtype, shape):
    tokens, n_in, n_out = shape
    g = gen(7 * tokens + n_in + 3 * n_out)
    x = make_x(tokens, n_in, g, dtype, outliers=False)
    w, b = linear_params(n_in, n_out, g, dtype)
    residual = randn(tokens, n_out, g=g, dtype=dtype, scale=3.0)
    out = ops.linear_residual(x, w, b, residual)
    assert out.shape == (tokens, n_out)
    assert_close_to(out, naive_linear(x, w, b) + residual.double().cpu(), dtype)


@pytest.mark.parametrize("ops", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_linear_residual_layernorm(ops, dtype, shape):
    tokens, n_in, n_out = shape
    g = gen(11 * tokens + n_in + 5 * n_out)
    x = make_x(tokens, n_in, g, dtype, outliers=False)
    w, b = linear_params(n_in, n_out, g, dtype)
    # a residual with an offset per row, so the LN after the add has a mean to remove
    residual = (randn(tokens, n_out, g=g, dtype=torch.float64, scale=3.0)
                + randn(tokens, 1, g=g, dtype=torch.float64, scale=5.0)).to(dtype)
    ln_w, ln_b = ln_params(n_out, g, dtype)
    out = ops.linear_residual_layernorm(x, w, b, residual, ln_w, ln_b, EPS)
    assert out.shape == (tokens, n_out)
    expected = naive_layer_norm(naive_linear(x, w, b) + residual.double().cpu(), ln_w, ln_b, EPS)
    # fp16: x @ W^T + b + residual is rounded to fp16 before the LayerNorm in the unfused layout
    assert_close_to(out, expected, dtype, scale=1.0, factor=2.0)


@pytest.mark.parametrize("ops", OPS)
def test_layernorm_linear_does_not_modify_inputs(ops):
    g = gen(3)
    x = make_x(5, 80, g, torch.float16, outliers=True)
    ln_w, ln_b = ln_params(80, g, torch.float16)
    w, b = linear_params(80, 33, g, torch.float16)
    before = [t.clone() for t in (x, ln_w, ln_b, w, b)]
    ops.layernorm_linear(x, ln_w, ln_b, w, b, EPS, relu=True)
    for t, t0 in zip((x, ln_w, ln_b, w, b), before):
        assert torch.equal(t, t0)
