"""Fused LayerNorm + linear kernels (kernels/layernorm_linear.py) against torch.

Each (op, model, tokens) group times ours ("triton") beside the unfused torch ops the reference
table runs ("torch": F.layer_norm, then cuBLAS through F.linear, then the adds), so the report
shows where the fused kernel wins and where a plain cuBLAS GEMM should be kept (DESIGN §5).
On CUDA: OPT-1.3B / 6.7B / 13B widths at 1, 8, 64 and 256 tokens, fp16; elsewhere one tiny
smoke shape through the Triton interpreter.

    pytest benchmarks/bench_layernorm_linear.py --benchmark-enable --benchmark-json=out.json
    python benchmarks/report.py out.json out.md
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarking import DEVICE, run_benchmark, shapes
from opt_fast.kernels import layernorm_linear as ll

EPS = 1e-5
DTYPE = torch.float16
# (model, hidden, tokens): tokens as decode batch sizes and a short prefill
SHAPES = shapes(gpu=[(model, hidden, tokens)
                     for model, hidden in (("opt-1.3b", 2048), ("opt-6.7b", 4096), ("opt-13b", 5120))
                     for tokens in (1, 8, 64, 256)],
                smoke=[("tiny", 64, 5)])
# op -> (out_features, in_features) as multiples of hidden
OPS = {"ln_qkv": (3, 1), "ln_fc1_relu": (4, 1), "out_proj_residual": (1, 1), "fc2_residual": (1, 4)}


def _operands(op: str, hidden: int, tokens: int) -> dict:
    n_mult, k_mult = OPS[op]
    n, k = n_mult * hidden, k_mult * hidden
    g = torch.Generator(device=DEVICE).manual_seed(hidden + tokens)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=DEVICE) * scale).to(DTYPE)

    t = dict(x=rand(tokens, k), weight=rand(n, k, scale=k ** -0.5), bias=rand(n, scale=0.1))
    if op.startswith("ln_"):
        t.update(ln_weight=rand(k, scale=0.1) + 1, ln_bias=rand(k, scale=0.1))
    else:
        t["residual"] = rand(tokens, n)
    return t


def _impls(op: str, t: dict) -> dict:
    relu = op.endswith("relu")
    if op.startswith("ln_"):
        def torch_ln_linear():
            h = F.linear(F.layer_norm(t["x"], t["x"].shape[-1:], t["ln_weight"], t["ln_bias"], EPS),
                         t["weight"], t["bias"])
            return torch.relu_(h) if relu else h
        return {"triton": lambda: ll.layernorm_linear(t["x"], t["ln_weight"], t["ln_bias"], t["weight"],
                                                      t["bias"], EPS, relu=relu),
                "torch": torch_ln_linear}
    return {"triton": lambda: ll.linear_residual(t["x"], t["weight"], t["bias"], t["residual"]),
            "torch": lambda: F.linear(t["x"], t["weight"], t["bias"]) + t["residual"]}


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("model,hidden,tokens", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("op", list(OPS))
def test_layernorm_linear(benchmark, roofline, op, model, hidden, tokens, impl):
    t = _operands(op, hidden, tokens)
    n, k = t["weight"].shape
    fn = _impls(op, t)[impl]
    # a wrong kernel must not be timed as a fast one: compare once against the torch peer
    expected = _impls(op, t)["torch"]().float()
    torch.testing.assert_close(fn().float(), expected, atol=2e-2 * expected.abs().max().item(), rtol=2e-2)
    benchmark.group = f"{op} {model} tokens={tokens}"
    # inputs, weights and outputs once each; flops of the GEMM only
    bytes_moved = sum(v.numel() * v.element_size() for v in t.values()) + tokens * n * t["x"].element_size()
    run_benchmark(benchmark, fn, bytes_moved=bytes_moved, flops=2 * tokens * n * k,
                  roofline=roofline, impl=impl)
