"""The Triton launchers of kernels/layernorm_linear.py beyond the shared op tests: bf16, strided
and NaN-poisoned operands, K and M past one tile (tails, Chan merges, the grouped grid), argument
checks, the block-size heuristic against the compile-check list, and each M tier's own pick.

Shapes stay small: on CPU every kernel runs under the Triton interpreter.
"""
from __future__ import annotations

import os

import pytest
import torch

from kernel_testing import DEVICE, TOL, gen, randn
from opt_fast.kernels import layernorm_linear as ll
from test_layernorm_linear import (EPS, linear_params, ln_params, naive_layer_norm, naive_linear,
                                   with_outliers)

# (atol, rtol) against float64, relative to the reference's rms: bf16 keeps 8 significant bits
TOLERANCE = {**TOL, torch.bfloat16: (1.5e-2, 1.5e-2)}
ALL_DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
              pytest.param(torch.bfloat16, id="bf16")]
# Triton 3.6's interpreter runs tl.dot on bf16's uint16 storage (np.matmul of the raw bits), so
# bf16 GEMMs are checked on GPUs only; bf16 LayerNorm has no dot and runs everywhere.
GEMM_DTYPES = ALL_DTYPES[:2] + [pytest.param(
    torch.bfloat16, id="bf16", marks=pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                                        reason="interpreter tl.dot is wrong for bf16"))]


def check(actual: torch.Tensor, expected64: torch.Tensor, dtype: torch.dtype, factor: float = 2.0) -> None:
    assert actual.dtype == dtype and actual.shape == expected64.shape
    assert torch.isfinite(actual).all(), "non-finite values in the output"
    atol, rtol = TOLERANCE[dtype]
    scale = expected64.pow(2).mean().sqrt().item() or 1.0
    torch.testing.assert_close(actual.double().cpu(), expected64, atol=atol * scale * factor,
                               rtol=rtol * factor)


def poisoned_view(values: torch.Tensor, dtype: torch.dtype, transpose: bool = False) -> torch.Tensor:
    """`values` [rows, cols] as a strided window into a NaN-filled buffer of `dtype`; with
    `transpose` the window is column-major. A kernel that reads outside it returns NaN."""
    rows, cols = values.shape
    if transpose:
        buf = torch.full((cols + 3, rows + 2), float("nan"), dtype=dtype, device=DEVICE)
        view = buf[1:1 + cols, 2:2 + rows].T
    else:
        buf = torch.full((rows + 2, cols + 7), float("nan"), dtype=dtype, device=DEVICE)
        view = buf[1:1 + rows, 4:4 + cols]
    view.copy_(values)
    assert not view.is_contiguous()
    return view


@pytest.mark.parametrize("dtype", GEMM_DTYPES)
@pytest.mark.parametrize("tokens,n_in,n_out", [(5, 300, 70), (19, 131, 45)])
def test_layernorm_linear_poisoned_strided_operands(dtype, tokens, n_in, n_out):
    """x row-major and the weight column-major, both windows into NaN; K = 300 spans three K
    tiles of 128 with a tail, and the statistics merge chunks of unequal size (256 + 44 columns
    at 5 tokens, 128 + 128 + 44 at 19)."""
    g = gen(tokens * n_in + n_out)
    x = poisoned_view(with_outliers(randn(tokens, n_in, g=g, dtype=torch.float64), g) + 40.0, dtype)
    w = poisoned_view(randn(n_out, n_in, g=g, dtype=torch.float64, scale=n_in ** -0.5), dtype, transpose=True)
    ln_w, ln_b = ln_params(n_in, g, dtype)
    bias = randn(n_out, g=g, dtype=dtype, scale=0.2)
    out = ll.layernorm_linear(x, ln_w, ln_b, w, bias, EPS, relu=True)
    expected = naive_linear(naive_layer_norm(x, ln_w, ln_b, EPS), w, bias).clamp(min=0)
    check(out, expected, dtype)


@pytest.mark.parametrize("dtype", GEMM_DTYPES)
def test_linear_residual_poisoned_strided_operands(dtype):
    g = gen(5)
    x = poisoned_view(randn(23, 150, g=g, dtype=torch.float64), dtype)
    w, b = linear_params(150, 41, g, dtype)
    residual = poisoned_view(randn(23, 41, g=g, dtype=torch.float64, scale=3.0), dtype, transpose=True)
    out = ll.linear_residual(x, w, b, residual)
    check(out, naive_linear(x, w, b) + residual.double().cpu(), dtype)
    ln_w, ln_b = ln_params(41, g, dtype)
    out = ll.linear_residual_layernorm(x, w, b, residual, ln_w, ln_b, EPS)
    check(out, naive_layer_norm(naive_linear(x, w, b) + residual.double().cpu(), ln_w, ln_b, EPS), dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_layer_norm_rows_past_one_chunk(dtype):
    """2500 columns: three 1024-column chunks, the last partial, merged per row; outlier rows
    and a large common offset; the input a window into NaN."""
    g = gen(2500)
    x = poisoned_view(with_outliers(randn(5, 2500, g=g, dtype=torch.float64), g, rows_every=1) + 300.0, dtype)
    w, b = ln_params(2500, g, dtype)
    check(ll.layer_norm(x, w, b, EPS), naive_layer_norm(x, w, b, EPS), dtype, factor=1.0)


# Launch overrides as the tile sweep passes them: K = 600 spans several GEMM tiles and (except at
# 128 rows, 32-column chunks) several statistics chunks, M = 5 leaves most of each row tile empty.
@pytest.mark.parametrize("config", [(16, 32, 256, 4, 3), (16, 128, 64, 4, 5), (32, 16, 32, 2, 2),
                                    (64, 64, 128, 8, 4), (128, 32, 32, 4, 1)], ids=str)
def test_layernorm_linear_config_overrides(config):
    g = gen(sum(config))
    dtype = torch.float16
    x = with_outliers(randn(5, 600, g=g, dtype=torch.float64), g) + 40.0
    x = x.to(dtype)
    w = randn(70, 600, g=g, dtype=dtype, scale=600 ** -0.5)
    ln_w, ln_b = ln_params(600, g, dtype)
    bias = randn(70, g=g, dtype=dtype, scale=0.2)
    out = ll.layernorm_linear(x, ln_w, ln_b, w, bias, EPS, config=config)
    check(out, naive_linear(naive_layer_norm(x, ln_w, ln_b, EPS), w, bias), dtype)


@pytest.mark.parametrize("config,field", [((16, 48, 64, 4, 3), "block_n"), ((8, 64, 64, 4, 3), "block_m"),
                                          ((16, 64, 64, 3, 3), "num_warps"), ((16, 64, 64, 4, 0), "num_stages"),
                                          ((16, 64, 64, 4), "config")])
def test_config_overrides_are_checked(config, field):
    x, ln_w, ln_b, w, b, _ = _valid()
    with pytest.raises(ValueError, match=field):
        ll.layernorm_linear(x, ln_w, ln_b, w, b, EPS, config=config)


def test_many_row_blocks_use_the_grouped_grid():
    """1100 tokens: nine 128-row blocks, one past a GROUP_M=8 group; N = 40 takes three tiles."""
    g = gen(1100)
    dtype = torch.float16
    x = randn(1100, 24, g=g, dtype=dtype)
    ln_w, ln_b = ln_params(24, g, dtype)
    w, b = linear_params(24, 40, g, dtype)
    out = ll.layernorm_linear(x, ln_w, ln_b, w, b, EPS)
    check(out, naive_linear(naive_layer_norm(x, ln_w, ln_b, EPS), w, b), dtype)


def test_no_tokens():
    g = gen(0)
    x = randn(0, 32, g=g)
    w, b = linear_params(32, 16, g, torch.float32)
    ln_w, ln_b = ln_params(32, g, torch.float32)
    assert ll.layernorm_linear(x, ln_w, ln_b, w, b, EPS).shape == (0, 16)
    assert ll.linear_residual(x, w, b, randn(0, 16, g=g)).shape == (0, 16)
    assert ll.layer_norm(x, ln_w, ln_b, EPS).shape == (0, 32)


def _valid(dtype=torch.float16):
    g = gen(1)
    x = randn(4, 32, g=g, dtype=dtype)
    ln_w, ln_b = ln_params(32, g, dtype)
    w, b = linear_params(32, 16, g, dtype)
    return x, ln_w, ln_b, w, b, randn(4, 16, g=g, dtype=dtype)


@pytest.mark.parametrize("case", ["x_3d", "x_int", "x_fp64", "weight_k", "weight_dtype", "bias_n",
                                  "bias_strided", "ln_half", "ln_n", "residual_shape", "residual_dtype"])
def test_bad_arguments_raise_value_error(case):
    x, ln_w, ln_b, w, b, r = _valid()
    call = lambda: ll.layernorm_linear(x, ln_w, ln_b, w, b, EPS)  # noqa: E731
    if case == "x_3d":
        x = x[None]
    elif case == "x_int":
        x = x.to(torch.int32)
    elif case == "x_fp64":
        x = x.double()
    elif case == "weight_k":
        w = w[:, :-1]
    elif case == "weight_dtype":
        w = w.float()
    elif case == "bias_n":
        b = b[:-1]
    elif case == "bias_strided":
        b = torch.stack([b, b], 1)[:, 0]
    elif case == "ln_half":
        ln_b = None
    elif case == "ln_n":
        ln_w = ln_w[:-1]
    elif case == "residual_shape":
        r = r[:, :-1]
        call = lambda: ll.linear_residual(x, w, b, r)  # noqa: E731
    elif case == "residual_dtype":
        r = r.float()
        call = lambda: ll.linear_residual_layernorm(x, w, b, r, b, b, EPS)  # noqa: E731
    with pytest.raises(ValueError):
        call()


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("sms", [108, 132, 140])
def test_every_chosen_config_is_compile_checked(dtype, sms):
    """Whatever the launcher picks for OPT shapes (and odd ones), on A100 / H100 / H200 SM
    counts, is in the list compile_specs() compiles, and every config listed is picked for some
    shape; and the grid has the programs its M tier asks for unless the N tile is already at
    its narrowest."""
    listed = ll._gemm_configs(dtype)
    picked = set()
    for m in (1, 8, 16, 17, 32, 33, 64, 65, 256, 4096):
        for hidden in (768, 1024, 2048, 2560, 4096, 5120, 97):
            for n in (hidden, 3 * hidden, 4 * hidden):
                cfg = ll.default_config(m, n, dtype, sms)
                assert cfg in listed, (m, n, cfg)
                picked.add(cfg)
                programs = -(-m // cfg.block_m) * -(-n // cfg.block_n)
                assert programs >= ll._min_programs(m, sms) or cfg.block_n == 16, (m, n, cfg)
    assert picked == set(listed)


# The launcher's own choice in each M tier of ll._M_TIERS, reached with small shapes by pretending
# the device has few SMs (K = 600: several K tiles and statistics chunks, with tails).
OWN_CONFIG_CASES = [  # (tokens, out features, sms, GemmConfig the launcher must pick)
    (5, 300, 2, (16, 128, 128, 4, 3)),   # >= sms / 2 programs at 128 columns
    (5, 200, 8, (16, 64, 256, 8, 3)),    # too few at 128: 64 columns, K tiles of 256
    (5, 100, 8, (16, 32, 256, 8, 3)),    # too few even so: the N tile halved
    (64, 70, 2, (64, 64, 128, 4, 3)),    # 64 rows in one tile where that fills the SMs
    (64, 70, 4, (32, 64, 128, 4, 4)),    # else 32-row tiles
]


@pytest.mark.parametrize("tokens,n_out,sms,expected", OWN_CONFIG_CASES, ids=lambda v: str(v).replace(" ", ""))
def test_each_default_tier_runs_and_matches(monkeypatch, tokens, n_out, sms, expected):
    assert ll.default_config(tokens, n_out, torch.float16, sms) == expected
    launches = []
    real_kernel = ll._fused_linear_kernel

    class Recording:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(kwargs)
                return real_kernel[grid](*args, **kwargs)
            return launch
    monkeypatch.setattr(ll, "_num_sms", lambda device: sms)
    monkeypatch.setattr(ll, "_fused_linear_kernel", Recording())
    g = gen(tokens + n_out)
    dtype = torch.float16
    x = (with_outliers(randn(tokens, 600, g=g, dtype=torch.float64), g) + 40.0).to(dtype)
    w = randn(n_out, 600, g=g, dtype=dtype, scale=600 ** -0.5)
    ln_w, ln_b = ln_params(600, g, dtype)
    bias = randn(n_out, g=g, dtype=dtype, scale=0.2)
    out = ll.layernorm_linear(x, ln_w, ln_b, w, bias, EPS)
    check(out, naive_linear(naive_layer_norm(x, ln_w, ln_b, EPS), w, bias), dtype)
    [kwargs] = launches
    assert tuple(kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")) == expected


def test_config_override_reaches_the_launch(monkeypatch):
    """The override, not the heuristic, sets the launch; the LayerNorm statistics chunk widens
    for short row tiles (1024 elements of x per warp)."""
    launches = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((grid, kwargs))
    monkeypatch.setattr(ll, "_fused_linear_kernel", Recorder())
    x, ln_w, ln_b, w, b, _ = _valid()
    ll.layernorm_linear(x, ln_w, ln_b, w, b, EPS, config=(16, 32, 64, 2, 5))
    [(grid, kwargs)] = launches
    assert grid == (1,)   # 4 rows, 16 columns: one 16x32 tile
    assert {k: kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages", "STATS_K")} == \
        dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, num_warps=2, num_stages=5, STATS_K=128)
