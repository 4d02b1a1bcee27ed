"""opt_fast.kernels: the ops the OPT layers call, behind one table per implementation.

Each module holds one kernel family. Today every op is its plain-PyTorch reference; the Triton
kernels arrive behind the same signatures, so the model switches with `kernels="triton"`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .attention import prefill_attention_ref
from .kv_cache import write_kv_cache_ref
from .layernorm_linear import (layer_norm_ref, layernorm_linear_ref, linear_residual_layernorm_ref,
                               linear_residual_ref)
from .paged_decode import paged_decode_attention_ref
from .sampling import sample_ref


@dataclass(frozen=True)
class KernelOps:
    """The op table one model instance runs on; see each reference for shapes."""
    name: str
    layer_norm: Callable
    layernorm_linear: Callable
    linear_residual: Callable
    linear_residual_layernorm: Callable
    write_kv_cache: Callable
    prefill_attention: Callable
    paged_decode_attention: Callable
    sample: Callable


TORCH_OPS = KernelOps(
    name="torch",
    layer_norm=layer_norm_ref,
    layernorm_linear=layernorm_linear_ref,
    linear_residual=linear_residual_ref,
    linear_residual_layernorm=linear_residual_layernorm_ref,
    write_kv_cache=write_kv_cache_ref,
    prefill_attention=prefill_attention_ref,
    paged_decode_attention=paged_decode_attention_ref,
    sample=sample_ref,
)


def get_ops(kind: str, device_type: str) -> KernelOps:
    """The op table for `kernels=kind` ("auto" | "torch" | "triton") on a device type."""
    if kind in ("auto", "torch"):
        return TORCH_OPS
    if kind == "triton":
        raise NotImplementedError("kernels='triton': the Triton kernels are not built yet; "
                                  "use kernels='torch' (or 'auto')")
    raise ValueError(f"kernels must be 'auto', 'triton' or 'torch', got {kind!r}")
