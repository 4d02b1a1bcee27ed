"""Shared benchmark plumbing (pytest-benchmark).

On CUDA every kernel runs at OPT-1.3B/6.7B/13B shapes against its torch peer in the same session;
elsewhere only a tiny smoke shape runs (the Triton interpreter), so the benchmarks cannot rot.
Each benchmark records bytes and FLOPs so the report can give GB/s, TFLOP/s and the fraction of
the device's measured copy bandwidth and matrix throughput (the roofline).
"""
from __future__ import annotations

import pytest
import torch

import opt_fast.kernels  # noqa: F401  (sets TRITON_INTERPRET=1 where there is no CUDA)

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


def shapes(gpu: list, smoke: list) -> list:
    """The full shape list on a GPU, the smoke list elsewhere."""
    return gpu if ON_GPU else smoke


@pytest.fixture(scope="session")
def roofline() -> dict:
    """Measured ceilings of this device: copy bandwidth (bytes read + written per second) and
    fp16 matrix throughput; empty off-GPU, where there is no roofline to speak of."""
    if not ON_GPU:
        return {}
    import triton.testing
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    copy_ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=200, return_mode="median")
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    mm_ms = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    return {"copy_gbps": 2 * src.numel() / copy_ms / 1e6, "matmul_tflops": 2 * 8192 ** 3 / mm_ms / 1e9}


def run_benchmark(benchmark, fn, *, bytes_moved: int, flops: int, roofline: dict, impl: str) -> None:
    """Time `fn` (synchronising on CUDA) and record what the report needs in extra_info."""
    def call():
        fn()
        if ON_GPU:
            torch.cuda.synchronize()
    call()   # compile / warm up outside the timing
    if ON_GPU:
        benchmark.pedantic(call, rounds=50, iterations=5, warmup_rounds=5)
    else:
        benchmark.pedantic(call, rounds=1, iterations=1)
    if benchmark.stats is None:   # --benchmark-disable (the test default): ran once as a smoke test
        return
    seconds = benchmark.stats.stats.median
    info = benchmark.extra_info
    info.update(impl=impl, bytes=bytes_moved, flops=flops, gbps=bytes_moved / seconds / 1e9,
                tflops=flops / seconds / 1e12, device=torch.cuda.get_device_name() if ON_GPU else "cpu")
    if roofline:
        info.update(copy_gbps=roofline["copy_gbps"], matmul_tflops=roofline["matmul_tflops"],
                    bandwidth_fraction=info["gbps"] / roofline["copy_gbps"],
                    matmul_fraction=info["tflops"] / roofline["matmul_tflops"])
