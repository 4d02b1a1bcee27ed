"""Tensor parallelism (the Megatron layout), kept out of the model code.

Each rank holds a slice of every decoder layer's matrices: qkv_proj and fc1 are split by output
rows (column-parallel; q, k and v each by heads, so a rank's heads are whole and its KV cache holds
only them), out_proj and fc2 by input columns (row-parallel). LayerNorms, the embeddings and the
LM head are replicated. A layer then needs one all-reduce after out_proj and one after fc2. Rank 0
adds the row-parallel bias and the residual into its partial sum before the reduce, so the fused
GEMM epilogue still adds them, once; the other ranks contribute the bare product.

Ranks run on CPU over gloo (tests) or one GPU each over NCCL.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import OPTConfig
from .kernels import KernelOps

# Split by output rows (weight and bias) / by input columns (weight only; the bias is whole).
_COLUMN_PARALLEL = ("qkv_proj", "fc1")
_ROW_PARALLEL = ("out_proj", "fc2")
# close() and abort() may race: the engine's thread closes while a watchdog thread aborts.
_TEARDOWN = threading.Lock()
# A collective waits at most this long for a rank: every rank loads its weights before the first
# one, so a wait this long means a rank is gone or stuck.
COLLECTIVE_TIMEOUT = timedelta(minutes=5)


def check_tensor_parallel(config: OPTConfig, world: int) -> None:
    """ValueError unless `world` ranks can split this model's heads and FFN evenly."""
    for name in ("num_attention_heads", "ffn_dim"):
        value = getattr(config, name)
        if value % world:
            raise ValueError(f"tensor_parallel_size={world} does not divide the model's {name}={value}")


def shard_dim(name: str) -> int | None:
    """The dimension along which parameter `name` is split across ranks; None if replicated."""
    module, leaf = name.split(".")[-2:]
    if module in _COLUMN_PARALLEL:
        return 0
    if module in _ROW_PARALLEL and leaf == "weight":
        return 1
    return None


def take_shard(full: torch.Tensor, dim: int | None, rank: int, world: int, packed: int = 1) -> torch.Tensor:
    """Rank `rank`'s slice of `full` along `dim` (all of it when dim is None). `packed` parts
    laid end to end along dim (q, k, v in qkv_proj) are each sliced, then joined again."""
    if dim is None or world == 1:
        return full
    parts = full.unflatten(dim, (packed, -1))
    size = parts.shape[dim + 1] // world
    return parts.narrow(dim + 1, rank * size, size).flatten(dim, dim + 1)


def shard_model(model: nn.Module, world: int) -> None:
    """Shrink, in place, the split matrices of a model built on the meta device to one rank's
    share (the loader fills them with `take_shard`)."""
    for layer in model.decoder.layers:
        attn = layer.self_attn
        attn.num_heads //= world
        hidden, local = attn.out_proj.out_features, attn.out_proj.in_features // world
        attn.qkv_proj = nn.Linear(hidden, 3 * local)
        attn.out_proj = nn.Linear(local, hidden)
        layer.fc1 = nn.Linear(hidden, layer.fc1.out_features // world)
        layer.fc2 = nn.Linear(layer.fc1.out_features, hidden)


@dataclass
class TensorParallelGroup:
    """This process's place among the tensor-parallel ranks."""
    rank: int
    world: int

    def all_reduce(self, partial: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(partial)
        return partial

    def min(self, value: int) -> int:
        """The smallest `value` any rank holds (each must hold the same to agree)."""
        t = torch.tensor([value], dtype=torch.int64, device=_collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def close(self) -> None:
        with _TEARDOWN:
            if dist.is_initialized():
                dist.destroy_process_group()

    def abort(self) -> None:
        """Leave the group at once, failing this rank's pending collectives (a peer is gone).
        NCCL only: its collectives would wait on the GPU forever, where gloo's raise anyway.
        (destroy_process_group, for a normal exit, first waits for them.)"""
        with _TEARDOWN:
            if dist.is_initialized() and dist.get_backend() == "nccl":
                dist.distributed_c10d._abort_process_group()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _check_no_group(world: int) -> None:
    if dist.is_initialized():
        raise ValueError(f"tensor_parallel_size={world}: this process already has a torch.distributed "
                         "process group, and the engine needs its own (close() another tensor-parallel "
                         "LLM or Engine of this process first)")


def open_store(world: int) -> dist.TCPStore:
    """Rank 0's rendezvous store on this host, on a free port (`.port`) the other ranks are given.
    One group per process: a process that already has a torch.distributed group is refused."""
    _check_no_group(world)
    return dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False,
                         timeout=COLLECTIVE_TIMEOUT)


def join(rank: int, world: int, store: dist.TCPStore | int, device: torch.device) -> TensorParallelGroup:
    """Join the group of `world` ranks through rank 0's store (rank 0 passes it, the others its
    port); returns once every rank has."""
    _check_no_group(world)
    if isinstance(store, int):
        store = dist.TCPStore("127.0.0.1", store, world, is_master=False, timeout=COLLECTIVE_TIMEOUT)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank,
                            world_size=world, timeout=COLLECTIVE_TIMEOUT)
    return TensorParallelGroup(rank, world)


def parallel_ops(ops: KernelOps, group: TensorParallelGroup) -> KernelOps:
    """`ops` with the row-parallel GEMMs (out_proj, fc2) ending in the all-reduce."""
    def linear_residual(x, weight, bias, residual):
        # Rank 0's partial carries the bias and the residual; the sum over ranks is the full result.
        partial = ops.linear_residual(x, weight, bias, residual) if group.rank == 0 else F.linear(x, weight)
        return group.all_reduce(partial)

    def linear_residual_layernorm(x, weight, bias, residual, ln_weight, ln_bias, eps):
        # The LayerNorm needs whole rows of the sum, so it runs after the reduce.
        return ops.layer_norm(linear_residual(x, weight, bias, residual), ln_weight, ln_bias, eps)

    return replace(ops, name=f"{ops.name}+tp{group.world}", linear_residual=linear_residual,
                   linear_residual_layernorm=linear_residual_layernorm)
