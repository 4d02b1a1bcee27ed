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

from .device import check_interpreter, check_triton_version, nvidia_capability  # noqa: E402

check_triton_version(triton.__version__)

from . import attention, kv_cache, layernorm_linear, paged_decode, sampling  # noqa: E402
from .gemm_config import takes_ln_options  # noqa: E402


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
    """"torch", "triton", or an op's own account of a mix, for each of REPORTED_OPS in `ops`."""
    def kind(fn: Callable) -> str:
        return getattr(fn, "implementation", "torch" if fn.__name__.endswith("_ref") else "triton")
    return {op: kind(getattr(ops, op)) for op in REPORTED_OPS}


def triton_ops() -> KernelOps:
    """The Triton launchers; an op whose kernel is not built yet is None."""
    return KernelOps(name="triton", **{op: getattr(home, op, None) for op, home in _HOMES.items()})


# Ops that `auto` leaves to torch on CUDA because cuBLAS (F.linear) and F.layer_norm beat our
# Triton GEMMs: at every OPT shape measured before the launch options, 0.23x-0.52x for LN+QKV,
# tokens 1-256, on an H200 (benchmarks/results/2026-11-26-h200-kernels/kernels.md); out_proj and
# fc2 run the same GEMM with no option. `kernels="triton"` still runs them. LN+QKV and LN+fc1
# take the fused kernel where default_launch gives them the measured options (auto_layernorm_linear).
CUBLAS_FASTER = ("layer_norm", "linear_residual", "linear_residual_layernorm")
_MEASURED_CAPABILITY = 90   # Hopper: the H100 / H200 the fused LayerNorm GEMMs were timed on


def auto_layernorm_linear(x: torch.Tensor, ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None,
                          weight: torch.Tensor, bias: torch.Tensor, eps: float, relu: bool = False) -> torch.Tensor:
    """`kernels="auto"`'s layernorm_linear: the fused Triton kernel behind a LayerNorm at up to
    64 fp16 / bf16 rows (gemm_config.takes_ln_options: decode steps of up to 64 sequences) on
    Hopper (sm_90), the torch pair (F.layer_norm, then cuBLAS) otherwise. Measured for LN+QKV on
    an H200 (benchmarks/results/2026-11-27-h200-sweep, device time, the launches these defaults
    make): 1.24x / 1.20x / 1.20x the pair at 1 token for OPT-1.3B / 6.7B / 13B, 1.17x at 8,
    1.15x / 1.09x / 1.02x at 64. fc1 (+ ReLU) streams its weight the same way at the same
    launch; not timed on its own. Past 64 rows the GEMM takes no option, as when it ran
    0.23x-0.52x the pair (CUBLAS_FASTER). Only sm_90, the cards it was measured on: on an A100
    the options lose their Hopper parts (no TMA, no programmatic dependent launch), and no run
    has timed what is left there or on later cards. (The interpreter, which the launchers treat
    as an sm_90, takes the kernel too: the tests run it so.)"""
    capability = nvidia_capability(x.device)
    if (ln_weight is not None and takes_ln_options(x.shape[0], x.dtype, has_ln=True)
            and capability in (None, _MEASURED_CAPABILITY)):
        return layernorm_linear.layernorm_linear(x, ln_weight, ln_bias, weight, bias, eps, relu)
    return layernorm_linear.layernorm_linear_ref(x, ln_weight, ln_bias, weight, bias, eps, relu)


auto_layernorm_linear.implementation = "triton up to 64 rows behind a LayerNorm on sm_90, else torch"


def get_ops(kind: str, device_type: str) -> KernelOps:
    """The op table for `kernels=kind`: "torch"; "triton" (every op a Triton kernel, interpreted
    on CPU); "auto" (on CUDA: Triton for the KV write, both attentions and sampling, and for
    LN+QKV / LN+fc1 at up to 64 fp16 / bf16 rows on sm_90 (auto_layernorm_linear), torch where cuBLAS is
    faster (CUBLAS_FASTER) or no kernel is built; on CPU the torch reference, where the
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
    chosen = {op: getattr(TORCH_OPS, op) for op in set(missing) | set(CUBLAS_FASTER)}
    if "layernorm_linear" not in missing:
        chosen["layernorm_linear"] = auto_layernorm_linear
    return replace(table, name="auto", **chosen)
