"""The benchmarks' fixtures; the helpers they share live in benchmarking.py."""
from __future__ import annotations

import pytest
import torch

from benchmarking import ON_GPU


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
