"""The benchmarks' fixtures; the helpers they share live in benchmarking.py."""
from __future__ import annotations

import pytest
import torch

from benchmarking import ON_GPU
from device_time import copy_gbps


@pytest.fixture(scope="session")
def roofline() -> dict:
    """Measured ceilings of this device: copy bandwidth (bytes read + written per second) and
    fp16 matrix throughput; empty off-GPU, where there is no roofline to speak of."""
    if not ON_GPU:
        return {}
    import triton.testing
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    mm_ms = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    # the copy timed as the kernels' device times are, its faster form (device_time.copy_gbps)
    return {"copy_gbps": copy_gbps(), "matmul_tflops": 2 * 8192 ** 3 / mm_ms / 1e9}
