"""What the kernel launchers need to know about the device they launch on."""
from __future__ import annotations

import functools
import os
import re

import torch

# Triton picks interpretation when a kernel is defined, by this same test.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# SMs assumed off CUDA (CPU, interpreter): an H100's, so the launchers pick what a GPU would.
DEFAULT_SMS = 132
DEFAULT_L2_BYTES = 50 * 2 ** 20   # an H100's L2, likewise
# Shared memory one block may use, by compute capability (the opt-in maximum): A100 163 KB, H100 /
# H200 227 KB.
SHARED_LIMITS = {80: 163 * 1024, 90: 227 * 1024}
# The oldest Triton the kernels are tested with: CI and the GPU runs use 3.6 alone. (Older ones
# fail at import: 3.4, which torch 2.8 pins, lacks Gluon's Hopper warpgroup_mma; 3.3 the host-side
# TensorDescriptor.)
MIN_TRITON = (3, 6)


@functools.lru_cache(maxsize=None)
def nvidia_capability(device: torch.device) -> int | None:
    """The NVIDIA compute capability of `device` as 80, 90, ...: None where kernels run in the
    interpreter (also on CUDA tensors) or off CUDA, 0 on ROCm (no NVIDIA feature: no inline PTX,
    TMA or warp specialisation)."""
    if INTERPRETED or device.type != "cuda":
        return None
    if torch.version.hip:
        return 0
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (DEFAULT_SMS off CUDA)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SMS


@functools.lru_cache(maxsize=None)
def l2_bytes(device: torch.device) -> int:
    """L2 cache bytes of `device` (DEFAULT_L2_BYTES off CUDA, or where none is reported)."""
    if device.type == "cuda":
        return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or DEFAULT_L2_BYTES
    return DEFAULT_L2_BYTES


def check_triton_version(version: str) -> None:
    """Raise ImportError, naming the version and the way out, where `version` (triton's
    __version__) is older than MIN_TRITON: the kernel modules would otherwise fail deep inside
    their imports (Triton 3.4, which torch 2.8 pins, lacks Gluon's warpgroup_mma), or later
    inside a kernel."""
    found = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if found < MIN_TRITON:
        wanted = ".".join(map(str, MIN_TRITON))
        raise ImportError(f"opt_fast's kernels need triton >= {wanted}, found triton {version}: "
                          f"pip install 'triton>={wanted}' (torch >= 2.10 on CUDA, whose wheels pin it)")


def check_interpreter() -> None:
    """Kernels on CPU tensors run in Triton's interpreter, which covers Triton's own library
    (tl.cdiv, ...) only if it was on when triton was first imported. Where another package
    imported triton first (transformers' models do), fail here with the way out rather than deep
    inside a kernel ("Cannot call @triton.jit'd outside of the scope of a kernel")."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    if not (INTERPRETED and isinstance(tl.standard.cdiv, InterpretedFunction)):
        raise RuntimeError("Triton kernels on CPU need Triton's interpreter, switched on before triton is first "
                           "imported: set TRITON_INTERPRET=1 in the environment, or import opt_fast before any "
                           "package that imports triton (transformers' models do)")


def tma_addressable(t: torch.Tensor) -> bool:
    """Whether a TMA descriptor can describe `t` as it is: unit last stride, a 16-byte aligned
    base, and every outer stride positive and a multiple of 16 bytes (the launchers' own checks
    allow any stride on a dimension of size 1, and broadcast views)."""
    item = t.element_size()
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all(stride > 0 and stride * item % 16 == 0 for stride in t.stride()[:-1]))
