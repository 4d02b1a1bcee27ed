"""The Triton launchers of kernels/layernorm_linear.py beyond the shared op tests: bf16, strided
and NaN-poisoned operands, K and M past one tile (tails, Chan merges, the grouped grid), argument
checks, the block-size heuristic against the compile-check list, and each M tier's own pick.

Shapes stay small: on CPU every kernel runs under the Triton interpreter.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from triton.tools.tensor_descriptor import TensorDescriptor

import kernel_testing
from kernel_testing import DEVICE, TOL, compile_only, gen, randn, sweep_script
from opt_fast.kernels import gemm_config as gc
from opt_fast.kernels import layernorm_linear as ll
from opt_fast.kernels.device import INTERPRETED
from test_layernorm_linear import (EPS, linear_params, ln_params, naive_layer_norm, naive_linear,
                                   near_constant_rows, with_outliers)

# (atol, rtol) against float64, relative to the reference's rms: bf16 keeps 8 significant bits
TOLERANCE = {**TOL, torch.bfloat16: (1.5e-2, 1.5e-2)}
ALL_DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
              pytest.param(torch.bfloat16, id="bf16")]
# Triton 3.6's interpreter runs tl.dot on bf16's uint16 storage (np.matmul of the raw bits): the
# launcher has the kernel widen bf16 tiles to fp32 there first (UPCAST_DOT), so bf16 GEMMs run
# everywhere too.
GEMM_DTYPES = ALL_DTYPES


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
    """x row-major and the weight column-major, both windows into NaN, under the launcher's own
    tiles; K = 300 and 131 are no multiple of any K tile, so the last K tile is partial. (Which
    statistics chunks merge depends on those tiles: at 5 tokens in fp16 one chunk of 512 covers
    the row; test_layernorm_linear_config_overrides pins chunks of unequal size.)"""
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


@pytest.fixture
def ln_row_tile_max(monkeypatch):
    """Sets the widest row the LayerNorm kernel holds whole (0: every width chunked)."""
    return lambda value: monkeypatch.setattr(gc, "_LN_ROW_TILE_MAX", value)


def test_layer_norm_blocks():
    """Every OPT width is held whole, one row a program at 16 values a thread; narrow rows share
    a program; rows past 8192 columns go in 1024-column chunks."""
    assert [tuple(gc._ln_blocks(n)) for n in (40, 768, 2560, 5120, 8192)] == [
        (32, 64, 4, True), (2, 1024, 4, True), (1, 4096, 8, True), (1, 8192, 16, True), (1, 8192, 16, True)]
    assert tuple(gc._ln_blocks(8193)) == (2, 1024, 4, False)


def _layer_norm_rows(monkeypatch, dtype, n) -> dict:
    """LayerNorm of 5 rows of n columns (outliers, a large common offset, a window into NaN)
    against float64; returns the launch's options (ONE_TILE, BLOCK_N, num_warps, ...)."""
    launches = record_launches(monkeypatch, "_layer_norm_kernel")
    g = gen(n)
    x = poisoned_view(with_outliers(randn(5, n, g=g, dtype=torch.float64), g, rows_every=1) + 300.0, dtype)
    w, b = ln_params(n, g, dtype)
    check(ll.layer_norm(x, w, b, EPS), naive_layer_norm(x, w, b, EPS), dtype, factor=1.0)
    [(_, _, _, options)] = launches
    return options


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_layer_norm_rows_past_one_chunk(monkeypatch, ln_row_tile_max, dtype):
    """The chunked form at 2500 columns: three 1024-column chunks, the last partial, merged per
    row."""
    ln_row_tile_max(0)
    options = _layer_norm_rows(monkeypatch, dtype, 2500)
    assert not options["ONE_TILE"] and options["BLOCK_N"] == 1024


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_layer_norm_whole_rows(monkeypatch, dtype):
    """The same rows held whole (a 4096-column tile, 1596 of them masked) at 8 warps."""
    options = _layer_norm_rows(monkeypatch, dtype, 2500)
    assert (options["ONE_TILE"], options["BLOCK_M"], options["BLOCK_N"], options["num_warps"]) == (True, 1, 4096, 8)


def test_layer_norm_past_the_widest_tile(monkeypatch):
    """A width no OPT preset has (8209, prime): the chunked form, without any patch."""
    assert not _layer_norm_rows(monkeypatch, torch.float16, 8209)["ONE_TILE"]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_post_layernorm_in_place_in_both_forms(monkeypatch, ln_row_tile_max, dtype):
    """linear_residual_layernorm normalises the GEMM's output in place: whole rows, then
    chunked rows of 1100 columns (two chunks, so each is read before it is written)."""
    g = gen(1100)
    x = randn(3, 37, g=g, dtype=dtype)
    w, b = linear_params(37, 1100, g, dtype)
    residual = randn(3, 1100, g=g, dtype=dtype, scale=3.0)
    ln_w, ln_b = ln_params(1100, g, dtype)
    expected = naive_layer_norm(naive_linear(x, w, b) + residual.double().cpu(), ln_w, ln_b, EPS)
    launches = record_launches(monkeypatch, "_layer_norm_kernel")
    for row_tile_max in (gc._LN_ROW_TILE_MAX, 1024):
        ln_row_tile_max(row_tile_max)
        check(ll.linear_residual_layernorm(x, w, b, residual, ln_w, ln_b, EPS), expected, dtype)
        (_, _, args, options), = launches[-1:]
        assert options["ONE_TILE"] == (row_tile_max > 1024) and args[0] is args[3]   # x is out
    assert len(launches) == 2


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


# Each place the statistics are computed takes the launch's eps: the GEMM's prologue, the
# statistics kernel (stats_kernel, split-K), the LayerNorm launch (normalize_first, cublas); on
# rows whose variance is near it (test_layernorm_linear.py's shared test runs the default launches).
@pytest.mark.parametrize("options", [{}, dict(stats_kernel=True), dict(split_k=2), dict(normalize_first=True),
                                     dict(cublas=True)], ids=lambda o: ",".join(o) or "prologue")
def test_each_launch_form_takes_its_eps(options):
    eps, n = 1e-2, 160
    g = gen(n)
    x = near_constant_rows(n, eps, g, torch.float16)
    ln_w, ln_b = ln_params(n, g, torch.float16)
    w, bias = linear_params(n, 37, g, torch.float16)
    out = ll.layernorm_linear(x, ln_w, ln_b, w, bias, eps, config=ll.GemmLaunch(16, 32, 64, 4, 2, **options))
    check(out, naive_linear(naive_layer_norm(x, ln_w, ln_b, eps), w, bias), torch.float16)


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
    listed = gc._gemm_configs(dtype)
    picked = set()
    for m in (1, 8, 16, 17, 32, 33, 64, 65, 256, 4096):
        for hidden in (768, 1024, 2048, 2560, 4096, 5120, 97):
            for n in (hidden, 3 * hidden, 4 * hidden):
                cfg = gc.default_config(m, n, dtype, sms)
                assert cfg in listed, (m, n, cfg)
                picked.add(cfg)
                programs = -(-m // cfg.block_m) * -(-n // cfg.block_n)
                assert programs >= gc._min_programs(m, sms) or cfg.block_n == 16, (m, n, cfg)
    assert picked == set(listed)


# The launcher's own choice in each M tier of gc._M_TIERS, reached with small shapes by pretending
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
    assert gc.default_config(tokens, n_out, torch.float16, sms) == expected
    monkeypatch.setattr(ll, "_num_sms", lambda device: sms)
    launches = record_launches(monkeypatch, "_fused_linear_kernel")
    g = gen(tokens + n_out)
    dtype = torch.float16
    x = (with_outliers(randn(tokens, 600, g=g, dtype=torch.float64), g) + 40.0).to(dtype)
    w = randn(n_out, 600, g=g, dtype=dtype, scale=600 ** -0.5)
    ln_w, ln_b = ln_params(600, g, dtype)
    bias = randn(n_out, g=g, dtype=dtype, scale=0.2)
    residual = randn(tokens, n_out, g=g, dtype=dtype)
    # the tiers serve GEMMs without a LayerNorm (out_proj, fc2) by default ...
    out = ll.linear_residual(x, w, bias, residual)
    check(out, naive_linear(x, w, bias) + residual.double().cpu(), dtype)
    # ... and the fused LayerNorm prologue runs at their tiles too (prefill's, and overrides')
    out = ll.layernorm_linear(x, ln_w, ln_b, w, bias, EPS, config=expected)
    check(out, naive_linear(naive_layer_norm(x, ln_w, ln_b, EPS), w, bias), dtype)
    assert len(launches) == 2
    for _, _, _, kwargs in launches:
        assert tuple(kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")) == expected


# default_launch's picks for a GEMM behind a LayerNorm (fp16 / bf16, up to 64 rows), reached with
# small shapes by pretending the device has few SMs (K = 600: five K tiles of 128).
LN_LAUNCH_CASES = [  # (tokens, out features, sms, GemmLaunch, the kernels it launches in order)
    # 3 tiles of 128 columns give half the SMs a program: the statistics from their own launch
    (5, 300, 6, (16, 128, 128, 4, 3, 1, True, False, True), ["_row_stats_kernel", "_fused_linear_kernel"]),
    # too few: the fewest splits that reach sms / 2 programs (3 x 3 >= 8)
    (5, 300, 16, (16, 128, 128, 4, 3, 3, False, False, True),
     ["_row_stats_kernel", "_fused_linear_kernel", "_split_k_reduce_kernel"]),
    # none reaches 32 within five K tiles: the most splits that do not exceed them (4)
    (5, 300, 64, (16, 128, 128, 4, 3, 4, False, False, True),
     ["_row_stats_kernel", "_fused_linear_kernel", "_split_k_reduce_kernel"]),
    # 17-64 rows: the LayerNorm launch, then the plain GEMM by TMA; 3 stages where the grid's
    # 64x64 tiles cover the SMs, 4 where they do not
    (40, 70, 2, (64, 64, 128, 4, 3, 1, False, True, True, True), ["_layer_norm_kernel", "_fused_linear_kernel"]),
    (40, 70, 4, (64, 64, 128, 4, 4, 1, False, True, True, True), ["_layer_norm_kernel", "_fused_linear_kernel"]),
]


@pytest.mark.parametrize("tokens,n_out,sms,expected,kernels", LN_LAUNCH_CASES,
                         ids=lambda v: str(v).replace(" ", "") if isinstance(v, tuple) else None)
def test_each_default_layernorm_launch_runs_and_matches(monkeypatch, tokens, n_out, sms, expected, kernels):
    assert gc.default_launch(tokens, n_out, 600, torch.float16, sms, has_ln=True) == gc.GemmLaunch(*expected)
    monkeypatch.setattr(ll, "_num_sms", lambda device: sms)
    launches = record_launches(monkeypatch, *KERNELS, "_layer_norm_kernel")
    g = gen(tokens + n_out + sms)
    dtype = torch.float16
    x = (with_outliers(randn(tokens, 600, g=g, dtype=torch.float64), g) + 40.0).to(dtype)
    w = randn(n_out, 600, g=g, dtype=dtype, scale=600 ** -0.5)
    ln_w, ln_b = ln_params(600, g, dtype)
    bias = randn(n_out, g=g, dtype=dtype, scale=0.2)
    out = ll.layernorm_linear(x, ln_w, ln_b, w, bias, EPS)
    check(out, naive_linear(naive_layer_norm(x, ln_w, ln_b, EPS), w, bias), dtype)
    assert [name for name, *_ in launches] == kernels
    [gemm] = [kwargs for name, _, _, kwargs in launches if name == "_fused_linear_kernel"]
    assert tuple(gemm[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")) == expected[:5]
    assert gemm["USE_TMA"] == (len(expected) > 9 and expected[9])


def test_default_launch_adds_options_only_behind_a_layernorm_at_up_to_64_fp16_rows():
    """float32 (CUDA-core tiles, not timed with options), GEMMs without a LayerNorm (out_proj,
    fc2) and prefill-sized M keep default_config's tiles with no option."""
    for m, dtype, has_ln in ((8, torch.float32, True), (8, torch.float16, False), (64, torch.bfloat16, False),
                             (65, torch.float16, True), (4096, torch.float16, True)):
        assert gc.default_launch(m, 6144, 2048, dtype, 132, has_ln) == gc.GemmLaunch(
            *gc.default_config(m, 6144, dtype, 132)), (m, dtype, has_ln)
    for m in (1, 16, 17, 64):
        launch = gc.default_launch(m, 6144, 2048, torch.bfloat16, 132, True)
        assert launch.overlap and (launch.split_k > 1 or launch.stats_kernel or launch.normalize_first), m


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("sms", [108, 132, 140])
def test_every_default_layernorm_launch_is_compile_checked(dtype, sms):
    """What default_launch picks behind a LayerNorm for OPT shapes (and odd ones), on A100 /
    H100 / H200 SM counts, is a launch the compile check builds, and each kind of launch it
    lists for the compile check is picked for some shape."""
    checked = set(ll._checked_launches(dtype))
    picked = set()
    for m in (1, 8, 16, 17, 32, 33, 64, 65):
        for hidden in (768, 1024, 2048, 2560, 4096, 5120, 97):
            for n in (3 * hidden, 4 * hidden):
                launch = gc.default_launch(m, n, hidden, dtype, sms, has_ln=True)
                assert launch in checked, (m, n, launch)
                picked.add(launch)
    if dtype != torch.float32:
        # (split counts share one compiled GEMM, a runtime argument: the list names them all)
        assert {launch._replace(split_k=min(launch.split_k, 2)) for launch in gc._default_launches()} == \
            {launch._replace(split_k=min(launch.split_k, 2)) for launch in picked if launch.overlap}


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


# --------------------------------------------------------------------------------------------
# Launch options: the statistics kernel and split-K (GemmLaunch)
# --------------------------------------------------------------------------------------------

OPTION_TILES = (16, 32, 32, 4, 2)   # the same tile in fp32 (_fit) and fp16: K tiles of 32


def record_launches(monkeypatch, *names):
    """kernel_testing.record_launches of the ll kernels `names`."""
    return kernel_testing.record_launches(monkeypatch, ll, *names)


KERNELS = ("_row_stats_kernel", "_fused_linear_kernel", "_split_k_reduce_kernel")


@pytest.fixture
def ll_allocations(monkeypatch):
    """Every float tensor ll allocates comes NaN-filled (so a split or an output element left
    unwritten shows); returns the list of their shapes."""
    real_empty = torch.empty
    shapes = []

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if sys._getframe(1).f_globals.get("__name__") == ll.__name__:
            shapes.append(tuple(t.shape))
            if t.is_floating_point():
                t.fill_(float("nan"))
        return t
    monkeypatch.setattr(torch, "empty", empty)
    return shapes


def split_ranges(n_in: int, block_k: int, split_k: int) -> list[tuple[int, int]]:
    """The K columns each split owns, as GemmLaunch.split_k documents it: contiguous runs of
    ceil(tiles / split_k) whole K tiles, the last shorter or empty."""
    per_split = -(-(-(-n_in // block_k)) // split_k) * block_k
    return [(min(s * per_split, n_in), min((s + 1) * per_split, n_in)) for s in range(split_k)]


def check_stats(stats: torch.Tensor, x: torch.Tensor) -> None:
    """The statistics kernel's [2, M] float32 buffer against float64: the mean to a few float32
    ulps (its float32 chunk sums) plus 1e-6 of the row's spread, 1/std to 1e-6 relative (a
    one-pass variance would be off by ~1e-4 on rows offset by 40 stds)."""
    x64 = x.double().cpu()
    mean64 = x64.mean(1)
    rstd64 = ((x64 - mean64[:, None]).pow(2).mean(1) + EPS).rsqrt()
    assert stats.dtype == torch.float32 and stats.shape == (2, x.shape[0])
    stats = stats.double().cpu()
    assert ((stats[0] - mean64).abs() <= 4e-7 * mean64.abs() + 1e-6 / rstd64).all()
    assert ((stats[1] / rstd64 - 1).abs()).max().item() < 1e-6


def check_partials(workspace: torch.Tensor, h64: torch.Tensor, w: torch.Tensor, split_k: int,
                   dtype: torch.dtype) -> None:
    """Each split's float32 partial is its own K range of h @ w^T (no bias, no epilogue); a split
    with no K tiles holds exact zeros."""
    m, n = h64.shape[0], w.shape[0]
    assert workspace.dtype == torch.float32 and workspace.shape == (split_k * m, n)
    parts = workspace.view(split_k, m, n).double().cpu()
    w64 = w.double().cpu()
    atol, rtol = TOLERANCE[dtype]
    scale = (h64 @ w64.T).pow(2).mean().sqrt().item()
    for s, (lo, hi) in enumerate(split_ranges(h64.shape[1], OPTION_TILES[2], split_k)):
        if lo == hi:
            assert torch.equal(parts[s], torch.zeros(m, n, dtype=torch.float64)), f"empty split {s}"
        else:
            torch.testing.assert_close(parts[s], h64[:, lo:hi] @ w64[:, lo:hi].T, atol=2 * atol * scale,
                                       rtol=2 * rtol, msg=lambda text: f"split {s} [{lo}, {hi}): {text}")


@pytest.mark.parametrize("dtype", GEMM_DTYPES)
@pytest.mark.parametrize("split_k", [2, 3, 8])
@pytest.mark.parametrize("with_ln,relu,tokens,n_in", [
    (True, True, 19, 150),    # five K tiles, the last of 22 columns; two row blocks; split 3
                              # runs 2 + 2 + 1 tiles, split 8 leaves three splits empty
    (True, False, 5, 40),     # two K tiles: split 3 and 8 leave splits empty
    (False, True, 5, 150),
    (False, False, 19, 40)], ids=["ln_relu_k150", "ln_k40", "relu_k150", "plain_k40"])
def test_split_k_layernorm_linear(monkeypatch, ll_allocations, dtype, split_k, with_ln, relu, tokens, n_in):
    """Split-K through the workspace, the statistics kernel (with LN) and the reduce: each
    launch, each split's partial and the result against float64; operands are windows into NaN
    and every buffer ll allocates starts as NaN."""
    launches = record_launches(monkeypatch, *KERNELS)
    g = gen(1000 * split_k + 10 * tokens + n_in)
    n_out = 40
    x64 = randn(tokens, n_in, g=g, dtype=torch.float64)
    x = poisoned_view(with_outliers(x64, g) + 40.0 if with_ln else x64, dtype)
    w = poisoned_view(randn(n_out, n_in, g=g, dtype=torch.float64, scale=n_in ** -0.5), dtype, transpose=True)
    ln_w, ln_b = ln_params(n_in, g, dtype) if with_ln else (None, None)
    bias = randn(n_out, g=g, dtype=dtype, scale=0.2)
    out = ll.layernorm_linear(x, ln_w, ln_b, w, bias, EPS, relu=relu, config=OPTION_TILES + (split_k,))

    h64 = naive_layer_norm(x, ln_w, ln_b, EPS) if with_ln else x.double().cpu()
    expected = naive_linear(h64, w, bias)
    check(out, expected.clamp(min=0) if relu else expected, dtype)
    assert [name for name, *_ in launches] == list(KERNELS if with_ln else KERNELS[1:])
    assert ll_allocations == ([(tokens, n_out), (2, tokens), (split_k * tokens, n_out)] if with_ln
                              else [(tokens, n_out), (split_k * tokens, n_out)])
    (_, gemm_grid, gemm_args, gemm), (_, reduce_grid, reduce_args, reduce) = launches[-2:]
    assert gemm_grid == (-(-tokens // 16) * -(-n_out // 32), split_k)
    assert gemm["PARTIAL_OUT"] and gemm["STATS_FROM_MEMORY"] == with_ln
    assert not gemm["RELU"] and not gemm["HAS_RESIDUAL"]    # the reduce's job
    assert reduce["SPLIT_K"] == split_k and reduce["RELU"] == relu and not reduce["HAS_RESIDUAL"]
    assert reduce_args[0] is gemm_args[7] and reduce_args[3] is out
    check_partials(reduce_args[0], h64, w, split_k, dtype)
    if with_ln:
        check_stats(launches[0][2][1], x)


@pytest.mark.parametrize("dtype", GEMM_DTYPES)
def test_stats_kernel_alone(monkeypatch, ll_allocations, dtype):
    """stats_kernel without split-K: the statistics launch, then the GEMM reading them (no
    workspace, no reduce); on outlier rows with a large common offset. Without a LayerNorm the
    option launches nothing extra."""
    launches = record_launches(monkeypatch, *KERNELS)
    g = gen(77)
    x = poisoned_view(with_outliers(randn(19, 150, g=g, dtype=torch.float64), g, rows_every=1) + 300.0, dtype)
    w, bias = linear_params(150, 40, g, dtype)
    ln_w, ln_b = ln_params(150, g, dtype)
    out = ll.layernorm_linear(x, ln_w, ln_b, w, bias, EPS, relu=True, config=OPTION_TILES + (1, True))
    check(out, naive_linear(naive_layer_norm(x, ln_w, ln_b, EPS), w, bias).clamp(min=0), dtype)
    assert [name for name, *_ in launches] == list(KERNELS[:2])
    assert ll_allocations == [(19, 40), (2, 19)]
    (_, _, stats_args, _), (_, grid, gemm_args, gemm) = launches
    assert grid == (4,) and gemm["STATS_FROM_MEMORY"] and not gemm["PARTIAL_OUT"]
    assert gemm_args[3] is stats_args[1]
    check_stats(stats_args[1], x)

    launches.clear()
    out = ll.layernorm_linear(x, None, None, w, bias, EPS, config=OPTION_TILES + (1, True))
    check(out, naive_linear(x, w, bias), dtype)
    assert [name for name, *_ in launches] == ["_fused_linear_kernel"]
    assert not launches[0][3]["STATS_FROM_MEMORY"]


@pytest.mark.parametrize("dtype", GEMM_DTYPES)
@pytest.mark.parametrize("split_k", [1, 3])
def test_normalize_first(monkeypatch, ll_allocations, dtype, split_k):
    """normalize_first: the LayerNorm launch writes the normalised rows (x's dtype), then the GEMM
    runs without its LayerNorm prologue on them, split or not (no statistics launch either way);
    on outlier rows with a large common offset. stats_kernel beside it changes nothing. Without
    a LayerNorm the option launches nothing extra."""
    launches = record_launches(monkeypatch, "_layer_norm_kernel", *KERNELS)
    g = gen(78)
    x = poisoned_view(with_outliers(randn(19, 150, g=g, dtype=torch.float64), g, rows_every=1) + 300.0, dtype)
    w, bias = linear_params(150, 40, g, dtype)
    ln_w, ln_b = ln_params(150, g, dtype)
    want = naive_linear(naive_layer_norm(x, ln_w, ln_b, EPS), w, bias).clamp(min=0)
    for stats_kernel in (False, True):
        launches.clear()
        ll_allocations.clear()
        config = OPTION_TILES + (split_k, stats_kernel, True)
        out = ll.layernorm_linear(x, ln_w, ln_b, w, bias, EPS, relu=True, config=config)
        check(out, want, dtype)
        names = [name for name, *_ in launches]
        assert names == ["_layer_norm_kernel", "_fused_linear_kernel"] + ["_split_k_reduce_kernel"] * (split_k > 1)
        (_, _, ln_args, _), (_, _, gemm_args, gemm) = launches[:2]
        normed = ln_args[3]
        assert gemm_args[0] is normed and normed.dtype == dtype and normed.shape == (19, 150)
        assert not gemm["HAS_LN"] and not gemm["STATS_FROM_MEMORY"] and gemm["PARTIAL_OUT"] == (split_k > 1)
        assert ll_allocations[:2] == [(19, 40), (19, 150)]
        # the rows the GEMM multiplies are the LayerNorm rounded once to x's dtype (Triton 3.6's
        # interpreter converts float32 to bfloat16 by truncation, not to nearest: one ulp there)
        truncating = INTERPRETED and dtype == torch.bfloat16
        torch.testing.assert_close(normed.double().cpu(), naive_layer_norm(x, ln_w, ln_b, EPS).to(dtype).double().cpu(),
                                   atol=0, rtol=2 ** -7 if truncating else 0)

    launches.clear()
    out = ll.layernorm_linear(x, None, None, w, bias, EPS, config=OPTION_TILES + (split_k, False, True))
    check(out, naive_linear(x, w, bias), dtype)
    assert [name for name, *_ in launches] == ["_fused_linear_kernel"] + ["_split_k_reduce_kernel"] * (split_k > 1)


CUBLAS = OPTION_TILES + (1, False, False, False, False, True)   # GemmLaunch.cublas alone


@pytest.mark.parametrize("dtype", GEMM_DTYPES)
@pytest.mark.parametrize("relu", [False, True])
def test_cublas_gemm_after_our_layernorm(monkeypatch, ll_allocations, dtype, relu):
    """cublas: our LayerNorm launch alone writes the normalised rows, and the GEMM on exactly
    those rows (torch's, into the NaN-filled output) gives the result, ReLU included; on outlier
    rows with a large common offset. Without a LayerNorm, and for the residual ops, nothing of
    ours launches but the post-LN LayerNorm, and each result matches its reference."""
    launches = record_launches(monkeypatch, "_layer_norm_kernel", *KERNELS)
    g = gen(79)
    x = poisoned_view(with_outliers(randn(19, 150, g=g, dtype=torch.float64), g, rows_every=1) + 300.0, dtype)
    w, bias = linear_params(150, 41, g, dtype)
    ln_w, ln_b = ln_params(150, g, dtype)
    out = ll.layernorm_linear(x, ln_w, ln_b, w, bias, EPS, relu=relu, config=CUBLAS)
    [(name, _, ln_args, _)] = launches
    normed = ln_args[3]
    assert name == "_layer_norm_kernel" and normed.dtype == dtype and normed.shape == (19, 150)
    assert ll_allocations == [(19, 41), (19, 150)]
    want = naive_linear(naive_layer_norm(x, ln_w, ln_b, EPS), w, bias)
    check(out, want.clamp(min=0) if relu else want, dtype)
    # the GEMM multiplied our launch's rows: against them the only error is the GEMM's rounding
    on_normed = naive_linear(normed, w, bias)
    check(out, on_normed.clamp(min=0) if relu else on_normed, dtype)

    launches.clear()
    check(ll.layernorm_linear(x, None, None, w, bias, EPS, relu=relu, config=CUBLAS),
          naive_linear(x, w, bias).clamp(min=0) if relu else naive_linear(x, w, bias), dtype)
    # rows without the offset, so that the residual is not lost in bf16's tolerance of the sum
    y = poisoned_view(randn(19, 150, g=g, dtype=torch.float64), dtype)
    residual = poisoned_view(randn(19, 41, g=g, dtype=torch.float64), dtype)
    check(ll.linear_residual(y, w, bias, residual, config=CUBLAS), naive_linear(y, w, bias) + residual.double().cpu(),
          dtype)
    assert launches == []
    post_ln_w, post_ln_b = ln_params(41, g, dtype)
    post = ll.linear_residual_layernorm(y, w, bias, residual, post_ln_w, post_ln_b, EPS, config=CUBLAS)
    check(post, naive_layer_norm(naive_linear(y, w, bias) + residual.double().cpu(), post_ln_w, post_ln_b, EPS), dtype)
    assert [name for name, *_ in launches] == ["_layer_norm_kernel"]


CUBLAS_OVERLAP = CUBLAS[:8] + (True,) + CUBLAS[9:]   # and our LayerNorm launch prefetches its weight


@pytest.mark.parametrize("dtype", GEMM_DTYPES)
def test_cublas_with_overlap_prefetches_the_weight_from_the_layernorm_launch(monkeypatch, dtype):
    """cublas with overlap: the result of cublas alone (in the interpreter, which runs no
    inline PTX, the LayerNorm launch gets no weight to prefetch: PREFETCH_K 0; on an NVIDIA GPU
    it does, with overlap only). With the capability stubbed and the LayerNorm kernel recorded
    and not run: on NVIDIA the launch gets the GEMM's weight, its row count and strides, and
    PREFETCH_K; without overlap, or on ROCm (capability 0), none of them."""
    g = gen(83)
    x = poisoned_view(with_outliers(randn(19, 150, g=g, dtype=torch.float64), g, rows_every=1) + 300.0, dtype)
    w, bias = linear_params(150, 41, g, dtype)
    ln_w, ln_b = ln_params(150, g, dtype)
    launches = record_launches(monkeypatch, "_layer_norm_kernel")
    plain = ll.layernorm_linear(x, ln_w, ln_b, w, bias, EPS, config=CUBLAS)
    assert torch.equal(ll.layernorm_linear(x, ln_w, ln_b, w, bias, EPS, config=CUBLAS_OVERLAP), plain)
    prefetching = bool(ll._capability(x.device))     # None in the interpreter
    [(plain_weight, plain_k), (overlap_weight, overlap_k)] = [(args[4], kwargs["PREFETCH_K"])
                                                              for _, _, args, kwargs in launches]
    assert plain_weight is None and plain_k == 0
    assert overlap_weight is (w if prefetching else None) and overlap_k == (gc._PREFETCH_K if prefetching else 0)

    seen = []
    monkeypatch.setattr(ll, "_layer_norm_kernel", type("Stub", (), {
        "__getitem__": lambda self, grid: lambda *args, **kwargs: seen.append((args, kwargs))})())
    for capability, config, prefetch in ((90, CUBLAS_OVERLAP, True), (80, CUBLAS_OVERLAP, True),
                                         (90, CUBLAS, False), (0, CUBLAS_OVERLAP, False)):
        monkeypatch.setattr(ll, "_capability", lambda device, capability=capability: capability)
        ll.layernorm_linear(x, ln_w, ln_b, w, bias, EPS, config=config)
        (args, kwargs), = seen
        seen.clear()
        if prefetch:
            assert args[4] is w and args[12:15] == (41, w.stride(0), w.stride(1))
            assert kwargs["PREFETCH_K"] == gc._PREFETCH_K
        else:
            assert args[4] is None and args[12:15] == (0, 0, 0) and kwargs["PREFETCH_K"] == 0


@compile_only
def test_compiled_layernorm_prefetches_after_its_own_loads():
    """The LayerNorm launch before cuBLAS's GEMM, compiled for sm_90 (no GPU needed): L2
    prefetches of the weight, all issued after the launch's own loads of x, gamma and beta
    (else they would queue ahead of them and lengthen the launch the GEMM waits for); the plain
    launch has none."""
    script = (
        "from opt_fast.kernels import layernorm_linear as m, compile_check as cc\n"
        "specs = {s.label: s for s in m.compile_specs() if s.kernel is m._layer_norm_kernel}\n"
        "lines = cc.compile_spec(specs['fp16 1x8192 w16 prefetch-gemm'], 90).asm['ptx'].splitlines()\n"
        "prefetches = [i for i, l in enumerate(lines) if 'prefetch.global.L2' in l]\n"
        "loads = [i for i, l in enumerate(lines) if 'ld.global' in l]\n"
        "plain = cc.compile_spec(specs['fp16 1x8192 w16'], 90).asm['ptx']\n"
        "print(bool(prefetches), len(loads) >= 3 and max(loads) < min(prefetches), 'prefetch.global' in plain)\n")
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, "TRITON_INTERPRET": "0"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["True", "True", "False"]


@pytest.mark.parametrize("dtype", GEMM_DTYPES)
def test_stats_kernel_rows_past_one_chunk(monkeypatch, dtype):
    """2500 columns: the statistics kernel merges a 2048-column chunk and a 452-column tail per
    row (Chan), on outlier rows offset by 300; split-K (4) on top, ten K tiles of 256."""
    launches = record_launches(monkeypatch, "_row_stats_kernel")
    g = gen(2500)
    x = poisoned_view(with_outliers(randn(5, 2500, g=g, dtype=torch.float64), g, rows_every=1) + 300.0, dtype)
    w, bias = linear_params(2500, 16, g, dtype)
    ln_w, ln_b = ln_params(2500, g, dtype)
    out = ll.layernorm_linear(x, ln_w, ln_b, w, bias, EPS, config=(16, 16, 256, 4, 2, 4))
    check(out, naive_linear(naive_layer_norm(x, ln_w, ln_b, EPS), w, bias), dtype)
    [(_, grid, args, kwargs)] = launches
    assert kwargs["BLOCK_K"] == 2048 and grid == (5,)
    check_stats(args[1], x)


@pytest.mark.parametrize("dtype", GEMM_DTYPES)
@pytest.mark.parametrize("split_k", [3, 6])
def test_split_k_linear_residual(monkeypatch, ll_allocations, dtype, split_k):
    """out_proj / fc2 with split-K: the residual (column-major, in NaN) and the bias added once,
    in the reduce; then the post-LN variant normalising the reduced sum. stats_kernel is
    ignored without a LayerNorm."""
    launches = record_launches(monkeypatch, *KERNELS)
    g = gen(split_k)
    x = poisoned_view(randn(19, 100, g=g, dtype=torch.float64), dtype)
    w, b = linear_params(100, 41, g, dtype)
    residual = poisoned_view(randn(19, 41, g=g, dtype=torch.float64, scale=3.0), dtype, transpose=True)
    config = OPTION_TILES + (split_k, True)
    out = ll.linear_residual(x, w, b, residual, config=config)
    expected = naive_linear(x, w, b) + residual.double().cpu()
    check(out, expected, dtype)
    assert [name for name, *_ in launches] == list(KERNELS[1:])
    (_, grid, _, gemm), (_, _, reduce_args, reduce) = launches
    assert grid == (4, split_k) and gemm["PARTIAL_OUT"] and not gemm["STATS_FROM_MEMORY"]
    assert reduce["HAS_RESIDUAL"] and not reduce["RELU"] and reduce_args[2] is residual
    check_partials(reduce_args[0], x.double().cpu(), w, split_k, dtype)

    launches.clear()
    ln_w, ln_b = ln_params(41, g, dtype)
    out = ll.linear_residual_layernorm(x, w, b, residual, ln_w, ln_b, EPS, config=config)
    check(out, naive_layer_norm(expected, ln_w, ln_b, EPS), dtype)
    assert [name for name, *_ in launches] == list(KERNELS[1:])


@pytest.mark.parametrize("dtype", GEMM_DTYPES)
def test_split_k_reduce_spans_several_programs(monkeypatch, ll_allocations, dtype):
    """19 x 130 outputs: the reduce runs three programs of _REDUCE_BLOCK (1024) outputs, the last
    partial, each adding its own partials, bias and residual (column-major, in NaN); every
    other split-K test fits one reduce program."""
    launches = record_launches(monkeypatch, "_split_k_reduce_kernel")
    g = gen(130)
    x = poisoned_view(randn(19, 40, g=g, dtype=torch.float64), dtype)
    w, b = linear_params(40, 130, g, dtype)
    residual = poisoned_view(randn(19, 130, g=g, dtype=torch.float64, scale=3.0), dtype, transpose=True)
    out = ll.linear_residual(x, w, b, residual, config=OPTION_TILES + (3,))
    check(out, naive_linear(x, w, b) + residual.double().cpu(), dtype)
    ln_w, ln_b = ln_params(40, g, dtype)
    out = ll.layernorm_linear(x, ln_w, ln_b, w, b, EPS, relu=True, config=OPTION_TILES + (2,))
    check(out, naive_linear(naive_layer_norm(x, ln_w, ln_b, EPS), w, b).clamp(min=0), dtype)
    assert [grid for _, grid, _, _ in launches] == [(3,), (3,)]


def test_default_launch_has_no_extra_work(monkeypatch, ll_allocations):
    """The heuristic's launch (here one K tile: nothing to split, and a grid far short of the
    SMs, so no statistics launch) and a 5-tuple override: one GEMM launch with its prologue
    and epilogue, one allocation (the output), as before the options existed."""
    launches = record_launches(monkeypatch, *KERNELS)
    x, ln_w, ln_b, w, b, r = _valid()
    for config in (None, OPTION_TILES, OPTION_TILES + (1,), OPTION_TILES + (1, False)):
        ll_allocations.clear()
        launches.clear()
        ll.layernorm_linear(x, ln_w, ln_b, w, b, EPS, config=config)
        ll.linear_residual(x, w, b, r, config=config)
        assert [name for name, *_ in launches] == ["_fused_linear_kernel"] * 2, config
        assert ll_allocations == [(4, 16)] * 2
        for _, grid, _, kwargs in launches:
            assert len(grid) == 1 and not kwargs["PARTIAL_OUT"] and not kwargs["STATS_FROM_MEMORY"]
    assert type(gc.default_config(4, 16, torch.float16)) is ll.GemmConfig


@pytest.mark.parametrize("config,field", [
    (OPTION_TILES + (5,), "split_k"), (OPTION_TILES + (0,), "split_k"), (OPTION_TILES + (True,), "split_k"),
    (OPTION_TILES + (2.0,), "split_k"), (OPTION_TILES + (2, 1), "stats_kernel"),
    (OPTION_TILES + (2, "yes"), "stats_kernel"), (OPTION_TILES + (1, None), "stats_kernel"),
    (OPTION_TILES + (1, False, 1), "normalize_first"), (OPTION_TILES + (2, True, None), "normalize_first"),
    (OPTION_TILES + (2, True, False, 0), "overlap"), (OPTION_TILES + (1, False, False, None), "overlap"),
    (OPTION_TILES + (2, True, False, False, 0), "tma"), (OPTION_TILES + (1, False, False, False, "no"), "tma"),
    (CUBLAS[:-1] + ("yes",), "cublas"), (CUBLAS[:5] + (2,) + CUBLAS[6:], "split_k"),
    (CUBLAS[:6] + (True,) + CUBLAS[7:], "stats_kernel"), (CUBLAS[:9] + (True,) + CUBLAS[10:], "tma"),
    (CUBLAS + (False,), "config")], ids=str)
def test_launch_options_are_checked(config, field):
    x, ln_w, ln_b, w, b, r = _valid()
    with pytest.raises(ValueError, match=field):
        ll.layernorm_linear(x, ln_w, ln_b, w, b, EPS, config=config)
    with pytest.raises(ValueError, match=field):
        ll.linear_residual(x, w, b, r, config=config)


def test_workspace_past_int32_offsets_is_refused(monkeypatch):
    """split_k x tokens x out, and normalize_first's tokens x in, must fit the kernels' int32
    offsets (the limit lowered here so that small operands pass their own check and split 8's
    workspace does not)."""
    monkeypatch.setattr(ll, "_INT32_MAX", 2000)
    g = gen(8)
    x = randn(5, 16, g=g, dtype=torch.float16)
    w, b = linear_params(16, 64, g, torch.float16)
    out = ll.layernorm_linear(x, None, None, w, b, EPS, config=OPTION_TILES + (2,))   # 640 elements
    check(out, naive_linear(x, w, b), torch.float16)
    with pytest.raises(ValueError, match="split_k=8"):                                  # 2560
        ll.layernorm_linear(x, None, None, w, b, EPS, config=OPTION_TILES + (8,))
    # normalize_first's [tokens, in] buffer: a broadcast x passes its own offsets check
    ln_w, ln_b = ln_params(16, g, torch.float16)
    wide = x[:1].expand(200, 16)
    with pytest.raises(ValueError, match="normalize_first needs a 200x16 buffer"):
        ll.layernorm_linear(wide, ln_w, ln_b, w, b, EPS, config=OPTION_TILES + (1, False, True))
    with pytest.raises(ValueError, match="cublas needs a 200x16 buffer"):
        ll.layernorm_linear(wide, ln_w, ln_b, w, b, EPS, config=CUBLAS)
    out = ll.layernorm_linear(x, ln_w, ln_b, w, b, EPS, config=OPTION_TILES + (1, False, True))   # 80
    check(out, naive_linear(naive_layer_norm(x, ln_w, ln_b, EPS), w, b), torch.float16)


def test_float32_launch_options_fit_small_tiles(monkeypatch):
    """float32 keeps the options on its small CUDA-core tiles (_fit), with 16-row tiles under
    split-K (32 rows spilled there on sm_90)."""
    launches = record_launches(monkeypatch, *KERNELS)
    x, ln_w, ln_b, w, b, _ = _valid(torch.float32)
    for config, block_m in (((64, 128, 64, 8, 3, 2), 16), ((64, 128, 64, 8, 3, 1, True), 32)):
        launches.clear()
        out = ll.layernorm_linear(x, ln_w, ln_b, w, b, EPS, config=config)
        check(out, naive_linear(naive_layer_norm(x, ln_w, ln_b, EPS), w, b), torch.float32)
        gemm = [kwargs for name, _, _, kwargs in launches if name == "_fused_linear_kernel"][0]
        assert {k: gemm[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")} == \
            dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2)
        assert gemm["PARTIAL_OUT"] == (config[5] > 1) and gemm["STATS_FROM_MEMORY"]


def test_sweep_candidates_with_options_are_compile_checked():
    """Every tile-sweep candidate that asks for a launch option (benchmarks/sweep_tiles.py,
    LnQkv) runs a GEMM variant the compile check builds for sm_80 and for sm_90 (the flags of
    the heaviest prologue, as the check builds them; the heuristic's own tiles are covered
    above). cuBLAS's GEMM (cublas) launches none of ours; its LayerNorm launch is checked at
    every width."""
    sweep = sweep_script()
    configs = [c["config"] for case in sweep.FAMILIES["ln_qkv"].cases(smoke=False)
               for c in sweep.FAMILIES["ln_qkv"].candidates(case, smoke=False) if "config" in c]
    with_options = set()
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        built = ll._gemm_variants(dtype)
        for config in configs:
            launch = gc._fit(gc._check_config(tuple(config)), dtype)
            if launch != ll.GemmLaunch(*launch[:5]) and not launch.cublas:
                with_options.add(launch[5:])
                for capability in (80, 90):
                    flags = gc._gemm_flags(launch, True, True, False, capability)
                    key = (ll.GemmConfig(*launch[:5]), tuple(flags.items()))
                    assert capability in built.get(key, ()), (dtype, config, capability)
    # every option, and overlap beside each of the others, is among the candidates
    assert {o[0] > 1 for o in with_options} == {o[1] for o in with_options} == {True, False}
    assert {(o[0] > 1, o[1], o[2]) for o in with_options if o[3]} >= {(False, False, False), (True, False, False),
                                                                      (False, True, False), (False, False, True)}


# --------------------------------------------------------------------------------------------
# Launch option overlap: weight prefetch and programmatic dependent launches (PDL)
# --------------------------------------------------------------------------------------------

# (split_k, stats_kernel, normalize_first) beside overlap, and the launches each makes with a
# LayerNorm: what runs before the GEMM (nothing, statistics, the LayerNorm) and after (the reduce)
OVERLAP_CASES = [
    ((1, False, False), ["_fused_linear_kernel"]),
    ((1, True, False), ["_row_stats_kernel", "_fused_linear_kernel"]),
    ((1, False, True), ["_layer_norm_kernel", "_fused_linear_kernel"]),
    ((2, False, False), ["_row_stats_kernel", "_fused_linear_kernel", "_split_k_reduce_kernel"]),
    ((2, False, True), ["_layer_norm_kernel", "_fused_linear_kernel", "_split_k_reduce_kernel"]),
]


def record_without_running(monkeypatch, capability):
    """Replaces ll's kernels by recorders of (name, kwargs) that do not run (the interpreter
    cannot run inline PTX) and pretends the device has `capability`."""
    launches = []

    def recorder(name):
        class Recorder:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: launches.append((name, kwargs))
        return Recorder()
    for name in ("_layer_norm_kernel", *KERNELS):
        monkeypatch.setattr(ll, name, recorder(name))
    monkeypatch.setattr(ll, "_capability", lambda device: capability)
    return launches


def check_dependent_launches(launches):
    """The protocol: a launch is a programmatic dependent one exactly when it waits before it
    touches memory, the op's first launch never is, and a dependent launch follows one that
    lets it start early."""
    assert not launches[0][1].get("launch_pdl", False)
    for (_, before), (name, kwargs) in zip(launches, launches[1:]):
        dependent = kwargs.get("launch_pdl", False)
        assert dependent == kwargs.get("PDL_WAIT", False), name
        assert before.get("LAUNCH_DEPENDENTS", False) == dependent, name


def test_no_inline_ptx_where_it_cannot_run():
    """Overlap's PTX is off on CPU tensors and, under the interpreter, on CUDA tensors too."""
    assert ll._capability(torch.device("cpu")) is None
    if INTERPRETED:
        assert ll._capability(torch.device("cuda", 0)) is None


@pytest.mark.parametrize("capability", [None, 0, 80, 90], ids=["interpreter", "rocm", "sm80", "sm90"])
def test_overlap_launch_wiring(monkeypatch, capability):
    """Who waits on whom under overlap: on sm_90 each launch after the op's first is a
    programmatic dependent launch that waits before it reads (PDL_WAIT, launch_pdl) and the
    launch before it lets it start (LAUNCH_DEPENDENTS); sm_80 only prefetches; the interpreter,
    which has no inline PTX, does neither, nor does ROCm (capability 0). Without overlap nothing
    of it anywhere."""
    launches = record_without_running(monkeypatch, capability)
    x, ln_w, ln_b, w, b, _ = _valid()
    pdl = capability == 90
    for options, names in OVERLAP_CASES:
        for overlap in (True, False):
            launches.clear()
            ll.layernorm_linear(x, ln_w, ln_b, w, b, EPS, config=OPTION_TILES + options + (overlap,))
            assert [name for name, _ in launches] == names
            check_dependent_launches(launches)
            kwargs = dict(launches)
            gemm = kwargs["_fused_linear_kernel"]
            assert gemm["PREFETCH_K"] == (gc._PREFETCH_K if overlap and capability else 0)
            assert gemm["PDL_WAIT"] == (overlap and pdl and names[0] != "_fused_linear_kernel"), (options, overlap)
            assert gemm["LAUNCH_DEPENDENTS"] == (overlap and pdl and options[0] > 1)


@pytest.mark.parametrize("capability", [None, 0, 80, 90], ids=["interpreter", "rocm", "sm80", "sm90"])
def test_overlap_launch_wiring_without_layernorm(monkeypatch, capability):
    """linear_residual and linear_residual_layernorm under overlap: the GEMM is the first launch
    (prefetch only), the reduce after a split GEMM depends on it on sm_90, and the post-LN
    LayerNorm stays a plain launch after them."""
    launches = record_without_running(monkeypatch, capability)
    x, _, _, w, b, r = _valid()
    for split_k in (1, 2):
        config = OPTION_TILES + (split_k, True, True, True)   # the LayerNorm options change nothing
        for post_ln in (False, True):
            launches.clear()
            if post_ln:
                ll.linear_residual_layernorm(x, w, b, r, b, b, EPS, config=config)
            else:
                ll.linear_residual(x, w, b, r, config=config)
            names = ["_fused_linear_kernel"] + ["_split_k_reduce_kernel"] * (split_k > 1)
            assert [name for name, _ in launches] == names + ["_layer_norm_kernel"] * post_ln
            check_dependent_launches(launches)
            gemm = launches[0][1]
            assert gemm["PREFETCH_K"] == (gc._PREFETCH_K if capability else 0) and not gemm["HAS_LN"]
            assert gemm["LAUNCH_DEPENDENTS"] == (capability == 90 and split_k > 1)


@pytest.mark.parametrize("dtype", GEMM_DTYPES)
@pytest.mark.parametrize("options,names", OVERLAP_CASES, ids=lambda v: str(v).replace(" ", ""))
def test_overlap_results(dtype, options, names):
    """Every overlap form gives the result of the launch without it, against float64, on
    outlier rows with an offset, K = 600 (not a multiple of the prefetch width, so the prefetch
    clamps its columns) and windows into NaN. On a GPU this runs the prefetch and, on sm_90+,
    the dependent launches (also captured in a CUDA graph, as the engine replays them); under
    the interpreter overlap is ignored."""
    g = gen(79 + options[0])
    x = poisoned_view(with_outliers(randn(19, 600, g=g, dtype=torch.float64), g, rows_every=1) + 300.0, dtype)
    w = poisoned_view(randn(70, 600, g=g, dtype=torch.float64, scale=600 ** -0.5), dtype)
    bias = randn(70, g=g, dtype=dtype, scale=0.2)
    ln_w, ln_b = ln_params(600, g, dtype)
    want = naive_linear(naive_layer_norm(x, ln_w, ln_b, EPS), w, bias).clamp(min=0)
    config = OPTION_TILES + options + (True,)
    out = ll.layernorm_linear(x, ln_w, ln_b, w, bias, EPS, relu=True, config=config)
    check(out, want, dtype)
    without = ll.layernorm_linear(x, ln_w, ln_b, w, bias, EPS, relu=True, config=OPTION_TILES + options)
    assert torch.equal(out, without)
    if DEVICE == "cuda":
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            replayed = ll.layernorm_linear(x, ln_w, ln_b, w, bias, EPS, relu=True, config=config)
        replayed.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(replayed, out)


# --------------------------------------------------------------------------------------------
# Launch option tma: the main loop's x and weight tiles through TMA descriptors
# --------------------------------------------------------------------------------------------

def tma_window(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`values` as a strided window into a NaN-filled buffer that a TMA descriptor can still
    describe (16-byte aligned base and row stride): a descriptor reading past it reads NaN."""
    rows, cols = values.shape
    buf = torch.full((rows + 2, cols + 8), float("nan"), dtype=dtype, device=DEVICE)
    view = buf[1:1 + rows, 8:8 + cols]
    view.copy_(values)
    return view


def tma_runs(x: torch.Tensor) -> bool:
    """Whether tma loads through descriptors on x's device: sm_90+, or the interpreter."""
    capability = ll._capability(x.device)
    return capability is None or capability >= 90


# float16 and bfloat16: float32 keeps pointer loads (test_tma_falls_back_where_no_descriptor_fits)
@pytest.mark.parametrize("dtype", GEMM_DTYPES[1:])
@pytest.mark.parametrize("options", [(1, False, False), (1, False, True), (2, False, True), (8, False, False),
                                     (1, True, False)], ids=["fused", "normalize_first", "normalize_first-split2",
                                                             "split8", "stats_kernel"])
def test_tma_loads(monkeypatch, ll_allocations, dtype, options):
    """x and the weight through TMA descriptors (the interpreter emulates them): both strided
    windows into NaN (a descriptor reading past one, a row or K too far, brings NaN in), K = 600
    (not a multiple of BLOCK_K: the descriptors' zero fill is the K tail), 19 rows (past one row
    tile), split 8 (19 K tiles of 32 in runs of 3: the last split empty). Against float64, and
    bitwise equal to the same launch through pointer loads."""
    launches = record_launches(monkeypatch, "_layer_norm_kernel", *KERNELS)
    g = gen(80 + options[0])
    x = tma_window(with_outliers(randn(19, 600, g=g, dtype=torch.float64), g, rows_every=1) + 300.0, dtype)
    w = tma_window(randn(70, 600, g=g, dtype=torch.float64, scale=600 ** -0.5), dtype)
    bias = randn(70, g=g, dtype=dtype, scale=0.2)
    ln_w, ln_b = ln_params(600, g, dtype)
    out = ll.layernorm_linear(x, ln_w, ln_b, w, bias, EPS, relu=True, config=OPTION_TILES + options + (False, True))
    check(out, naive_linear(naive_layer_norm(x, ln_w, ln_b, EPS), w, bias).clamp(min=0), dtype)
    [(_, _, args, gemm)] = [launch for launch in launches if launch[0] == "_fused_linear_kernel"]
    assert gemm["USE_TMA"] == tma_runs(x)
    assert all(isinstance(d, TensorDescriptor) == tma_runs(x) for d in args[8:10])
    launches.clear()
    assert torch.equal(out, ll.layernorm_linear(x, ln_w, ln_b, w, bias, EPS, relu=True, config=OPTION_TILES + options))
    assert not [kw for name, _, _, kw in launches if name == "_fused_linear_kernel"][0]["USE_TMA"]


@pytest.mark.parametrize("dtype", GEMM_DTYPES[1:])
def test_tma_linear_residual(monkeypatch, dtype):
    """linear_residual (no LayerNorm) through the descriptors, unsplit and split."""
    launches = record_launches(monkeypatch, *KERNELS)
    g = gen(83)
    x = tma_window(randn(19, 600, g=g, dtype=torch.float64), dtype)
    w, bias = linear_params(600, 70, g, dtype)
    r = randn(19, 70, g=g, dtype=dtype)
    for split_k in (1, 2):
        launches.clear()
        out = ll.linear_residual(x, w, bias, r, config=OPTION_TILES + (split_k, False, False, False, True))
        check(out, naive_linear(x, w, bias) + r.double().cpu(), dtype)
        assert [kw["USE_TMA"] for name, _, _, kw in launches if name == "_fused_linear_kernel"] == [tma_runs(x)]


def test_tma_falls_back_where_no_descriptor_fits(monkeypatch):
    """Each tensor a descriptor cannot describe, the other one fine: x's row stride not a
    multiple of 16 bytes (7 columns of padding); x's rows 16-byte strided but its base 2 bytes
    off; x one row broadcast (row stride 0); the weight's K (150 fp16 = 300 bytes) not a
    multiple of 16 bytes; K = 0 (zero-width windows with aligned strides); and float32
    (CUDA-core dots): pointer loads, same results."""
    launches = record_launches(monkeypatch, *KERNELS)
    g = gen(84)
    fp16 = torch.float16

    def window(rows, cols, offset, pad):
        buf = torch.full((rows, cols + pad), float("nan"), dtype=fp16, device=DEVICE)
        view = buf[:, offset:offset + cols]
        view.copy_(randn(rows, cols, g=g, dtype=fp16))
        return view
    bias = randn(70, g=g, dtype=fp16)
    cases = [(window(19, 600, 4, 7), *linear_params(600, 70, g, fp16)),
             (window(19, 600, 1, 8), *linear_params(600, 70, g, fp16)),
             (randn(1, 600, g=g, dtype=fp16).expand(19, 600), *linear_params(600, 70, g, fp16)),
             # x: 150 columns of rows 168 wide, aligned; the weight's rows 156 wide
             (tma_window(randn(19, 160, g=g, dtype=torch.float64), fp16)[:, :150], window(70, 150, 0, 6), bias),
             (window(19, 0, 8, 8), window(70, 0, 8, 8), bias),
             (randn(19, 600, g=g, dtype=torch.float32), *linear_params(600, 70, g, torch.float32))]
    for x, w, bias in cases:
        launches.clear()
        out = ll.layernorm_linear(x, None, None, w, bias, EPS, config=OPTION_TILES + (1, False, False, False, True))
        check(out, naive_linear(x, w, bias), x.dtype)
        [(_, _, args, gemm)] = launches
        assert not gemm["USE_TMA"] and args[8] is None and args[9] is None


@pytest.mark.parametrize("capability,runs", [(None, True), (0, False), (80, False), (90, True)],
                         ids=["interpreter", "rocm", "sm80", "sm90"])
def test_tma_needs_hopper_or_the_interpreter(monkeypatch, capability, runs):
    """tma loads through descriptors on sm_90+ and in the interpreter (which emulates them);
    on sm_80 and ROCm (capability 0) the loads stay pointer loads."""
    launches = record_without_running(monkeypatch, capability)
    x, ln_w, ln_b, w, b, _ = _valid()
    ll.layernorm_linear(x, ln_w, ln_b, w, b, EPS, config=OPTION_TILES + (1, False, True, False, True))
    gemm = dict(launches)["_fused_linear_kernel"]
    assert gemm["USE_TMA"] == runs
