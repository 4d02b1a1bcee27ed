"""opt_fast.kernels: the ops the OPT layers call, behind one table per implementation.

Each module holds one kernel family: its Triton kernels, the launcher that checks shapes, dtypes
and strides (named like the op), and the plain-PyTorch reference (`*_ref`). `TORCH_OPS` holds
the references; `triton_ops()` the launchers, with the same signatures.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import Callable

import torch

# Triton decides at decoration time whether a kernel is compiled or interpreted; without CUDA
# only the interpreter can run it, so say so before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402

from .device import check_interpreter, check_triton_version  # noqa: E402

check_triton_version(triton.__version__)

from . import attention, kv_cache, layernorm_linear, paged_decode, sampling  # noqa: E402


@dataclass(frozen=True)
class KernelOps:
    """The op table one model instance runs on; see each reference for shapes. The layers store
    new keys and values through the attention ops (their slot_mapping / new_kv arguments);
    write_kv_cache is the same store as a launch of its own."""
    name: str
    layer_norm: Callable | None
    layernorm_linear: Callable | None
    linear_residual: Callable | None
    linear_residual_layernorm: Callable | None
    write_kv_cache: Callable | None
    prefill_attention: Callable | None
    paged_decode_attention: Callable | None
    sample: Callable | None

    def missing(self) -> list[str]:
        return [f.name for f in fields(self) if f.name != "name" and getattr(self, f.name) is None]


_HOMES = dict(layer_norm=layernorm_linear, layernorm_linear=layernorm_linear,
              linear_residual=layernorm_linear, linear_residual_layernorm=layernorm_linear,
              write_kv_cache=kv_cache, prefill_attention=attention,
              paged_decode_attention=paged_decode, sample=sampling)

TORCH_OPS = KernelOps(name="torch", **{op: getattr(home, f"{op}_ref") for op, home in _HOMES.items()})


# The ops whose implementation a benchmark report names (write_kv_cache runs inside the attentions).
REPORTED_OPS = ("layernorm_linear", "prefill_attention", "paged_decode_attention", "sample")


def implementations(ops: KernelOps) -> dict[str, str]:
    """"torch" or "triton" for each of REPORTED_OPS in `ops`."""
    return {op: "torch" if getattr(ops, op).__name__.endswith("_ref") else "triton" for op in REPORTED_OPS}


def triton_ops() -> KernelOps:
    """The Triton launchers; an op whose kernel is not built yet is None."""
    return KernelOps(name="triton", **{op: getattr(home, op, None) for op, home in _HOMES.items()})


# Ops that `auto` leaves to torch on CUDA because cuBLAS (F.linear) and F.layer_norm beat our
# fused Triton GEMMs at every OPT shape measured: 0.23x-0.52x for LN+QKV, tokens 1-256, on an
# H200 (benchmarks/results/2026-11-26-h200-kernels/kernels.md). `kernels="triton"` still runs them.
CUBLAS_FASTER = ("layer_norm", "layernorm_linear", "linear_residual", "linear_residual_layernorm")


def get_ops(kind: str, device_type: str) -> KernelOps:
    """The op table for `kernels=kind`: "torch"; "triton" (every op a Triton kernel, interpreted
    on CPU); "auto" (on CUDA: Triton for the KV write, both attentions and sampling, torch where
    cuBLAS is faster (CUBLAS_FASTER) or no kernel is built; on CPU the torch reference, where the
    interpreter would be far too slow)."""
    if kind == "torch" or (kind == "auto" and device_type != "cuda"):
        return TORCH_OPS
    if kind not in ("auto", "triton"):
        raise ValueError(f"kernels must be 'auto', 'triton' or 'torch', got {kind!r}")
    if device_type != "cuda":
        check_interpreter()
    table = triton_ops()
    missing = table.missing()
    if kind == "triton" and missing:
        raise NotImplementedError(f"kernels='triton': no Triton kernel yet for {', '.join(missing)}; "
                                  "use kernels='torch' or 'auto'")
    if kind == "triton":
        return table
    return replace(table, name="auto", **{op: getattr(TORCH_OPS, op) for op in set(missing) | set(CUBLAS_FASTER)})
