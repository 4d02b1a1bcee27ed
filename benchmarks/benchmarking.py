"""Benchmark helpers shared by the bench_*.py files (pytest-benchmark).

On CUDA every kernel runs at OPT-1.3B/6.7B/13B shapes against its torch peer in the same session;
elsewhere only a tiny smoke shape runs (the Triton interpreter), so the benchmarks cannot rot.
Each benchmark records bytes and FLOPs so the report can give GB/s, TFLOP/s and the fraction of
the device's measured copy bandwidth and matrix throughput (the roofline).
"""
from __future__ import annotations

import pytest
import torch

import opt_fast.kernels  # noqa: F401  (sets TRITON_INTERPRET=1 where there is no CUDA)
from device_time import try_graph_us

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


def shapes(gpu: list, smoke: list) -> list:
    """The full shape list on a GPU, the smoke list elsewhere."""
    return gpu if ON_GPU else smoke


def run_benchmark(benchmark, fn, *, bytes_moved: int, flops: int, roofline: dict, impl: str) -> None:
    """Time `fn` (synchronising on CUDA) and record what the report needs in extra_info; on CUDA
    also its device time from CUDA graph replays (`device_us`, None where it cannot be
    captured), which leaves out the host's launch path that the synchronised timing includes."""
    def call():
        fn()
        if ON_GPU:
            torch.cuda.synchronize()
    call()   # compile / warm up outside the timing
    if ON_GPU:
        benchmark.pedantic(call, rounds=20, iterations=5, warmup_rounds=3)
    else:
        benchmark.pedantic(call, rounds=1, iterations=1)
    if benchmark.stats is None:   # --benchmark-disable (the test default): ran once as a smoke test
        return
    seconds = benchmark.stats.stats.median
    info = benchmark.extra_info
    info.update(impl=impl, bytes=bytes_moved, flops=flops, gbps=bytes_moved / seconds / 1e9,
                tflops=flops / seconds / 1e12, device=torch.cuda.get_device_name() if ON_GPU else "cpu")
    if ON_GPU:
        # about a millisecond of calls per replay: a slow peer (the 8 ms gather reference) replays
        # one call at a time, so the graph timing adds well under a second to any benchmark
        calls = max(1, min(10, int(1e-3 / seconds)))
        info["device_us"] = try_graph_us(fn, calls=calls, replays=9 if calls > 1 else 5)
        if info["device_us"]:
            info["device_gbps"] = bytes_moved / info["device_us"] / 1e3
    if roofline:
        info.update(copy_gbps=roofline["copy_gbps"], matmul_tflops=roofline["matmul_tflops"],
                    bandwidth_fraction=info["gbps"] / roofline["copy_gbps"],
                    matmul_fraction=info["tflops"] / roofline["matmul_tflops"])
