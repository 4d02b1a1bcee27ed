"""Writing new keys and values into the paged KV cache: the Triton kernel, its launcher and the
torch reference op."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Elements of one head tile per program: enough for a few 16-byte vectors per thread at 4 warps,
# small enough that decode (a handful of tokens) still spreads over several programs.
_TILE_ELEMENTS = 2048


@triton.jit
def _write_kv_cache_kernel(
    key_ptr,            # [tokens, heads, head_dim] new keys, any strides
    value_ptr,          # [tokens, heads, head_dim] new values, any strides
    key_cache_ptr,      # [num_blocks, block_size, heads, head_dim]
    value_cache_ptr,    # [num_blocks, block_size, heads, head_dim], strides of key_cache
    slot_ptr,           # [tokens] int64 flat slot, < 0 for padding tokens
    heads, block_size,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_cb, stride_cs, stride_ch, stride_cd,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,   # heads per program
    BLOCK_D: tl.constexpr,   # head_dim padded to a power of two (80 -> 128)
):
    # int64 throughout: token offsets into a long prefill, and block offsets into a cache of
    # more than 2**31 elements per layer, both overflow int32.
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    # A padding token masks every load and store rather than returning early, so the program
    # never computes an address from a negative slot that it then touches.
    mask = (offs_h < heads)[:, None] & (offs_d < HEAD_DIM)[None, :] & (slot >= 0)
    key = tl.load(key_ptr + token * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :] * stride_kd,
                  mask=mask)
    value = tl.load(value_ptr + token * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :] * stride_vd,
                    mask=mask)
    dst = ((slot // block_size) * stride_cb + (slot % block_size) * stride_cs
           + offs_h[:, None] * stride_ch + offs_d[None, :] * stride_cd)
    tl.store(key_cache_ptr + dst, key.to(key_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(value_cache_ptr + dst, value.to(value_cache_ptr.dtype.element_ty), mask=mask)


def check_cache_pair(key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
    """Both caches `[num_blocks, block_size, heads, head_dim]` with one shape and one set of
    strides: the kernels address both with the same offsets."""
    if key_cache.dim() != 4 or key_cache.shape != value_cache.shape:
        raise ValueError(f"key_cache and value_cache must both be [num_blocks, block_size, heads, head_dim], "
                         f"got {tuple(key_cache.shape)} and {tuple(value_cache.shape)}")
    if key_cache.stride() != value_cache.stride():
        raise ValueError(f"key_cache and value_cache must share strides, got {key_cache.stride()} "
                         f"and {value_cache.stride()}")


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                   value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Triton version of `write_kv_cache_ref` (same arguments): one launch for keys and values.

    Padding tokens (negative slots) are masked inside the kernel, so there is no host sync and
    the launch can be captured in a CUDA graph. The caches may have any strides, as long as
    both caches share them; key and value may have any strides of their own.
    """
    if key.dim() != 3 or key.shape != value.shape:
        raise ValueError(f"key and value must both be [tokens, heads, head_dim], got "
                         f"{tuple(key.shape)} and {tuple(value.shape)}")
    check_cache_pair(key_cache, value_cache)
    tokens, heads, head_dim = key.shape
    if key_cache.shape[2:] != key.shape[1:]:
        raise ValueError(f"cache heads x head_dim {tuple(key_cache.shape[2:])} != new tokens' "
                         f"{tuple(key.shape[1:])}")
    if slot_mapping.shape != (tokens,) or slot_mapping.dtype != torch.int64:
        raise ValueError(f"slot_mapping must be [{tokens}] int64, got {tuple(slot_mapping.shape)} "
                         f"{slot_mapping.dtype}")
    for name, t in (("key", key), ("value", value), ("key_cache", key_cache), ("value_cache", value_cache)):
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} dtype {t.dtype} not supported (float16, bfloat16, float32)")
    if key.dtype != value.dtype or key_cache.dtype != value_cache.dtype:
        raise ValueError(f"key/value dtypes {key.dtype}/{value.dtype} and cache dtypes "
                         f"{key_cache.dtype}/{value_cache.dtype} must match pairwise")
    devices = {t.device for t in (key, value, key_cache, value_cache, slot_mapping)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if tokens == 0:
        return
    block_d = triton.next_power_of_2(head_dim)
    block_h = min(triton.next_power_of_2(heads), max(1, _TILE_ELEMENTS // block_d))
    grid = (tokens, triton.cdiv(heads, block_h))
    _write_kv_cache_kernel[grid](
        key, value, key_cache, value_cache, slot_mapping, heads, key_cache.shape[1],
        *key.stride(), *value.stride(), *key_cache.stride(),
        HEAD_DIM=head_dim, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4)


def compile_specs() -> list:
    """Every specialisation OPT runs (head_dim 64/80/128; fp16/bf16 and fp32 caches), with the
    unit last-dim strides that the JIT turns into constants, as on a real launch."""
    from .compile_check import CompileSpec
    specs = []
    for dtype in ("fp16", "bf16", "fp32"):
        for head_dim in (64, 80, 128):
            block_d = triton.next_power_of_2(head_dim)
            sig = {"key_ptr": f"*{dtype}", "value_ptr": f"*{dtype}", "key_cache_ptr": f"*{dtype}",
                   "value_cache_ptr": f"*{dtype}", "slot_ptr": "*i64", "heads": "i32", "block_size": "i32"}
            sig.update({name: "i32" for name in ("stride_kt", "stride_kh", "stride_vt", "stride_vh",
                                                 "stride_cb", "stride_cs", "stride_ch")})
            sig.update({name: "constexpr" for name in ("stride_kd", "stride_vd", "stride_cd",
                                                       "HEAD_DIM", "BLOCK_H", "BLOCK_D")})
            consts = dict(stride_kd=1, stride_vd=1, stride_cd=1, HEAD_DIM=head_dim,
                          BLOCK_H=_TILE_ELEMENTS // block_d, BLOCK_D=block_d)
            specs.append(CompileSpec(_write_kv_cache_kernel, f"{dtype} d{head_dim}", sig, consts))
    return specs


def write_kv_cache_ref(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                       value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store token i's key/value at flat slot `slot_mapping[i]` (= block * block_size + offset).

    key, value: `[tokens, heads, head_dim]` (any strides); key_cache, value_cache:
    `[num_blocks, block_size, heads, head_dim]`, contiguous; slot_mapping: `[tokens]` int64, where
    a negative slot marks a padding token that is not stored.
    """
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    key_cache.view(-1, *key_cache.shape[2:])[slots] = key[keep].to(key_cache.dtype)
    value_cache.view(-1, *value_cache.shape[2:])[slots] = value[keep].to(value_cache.dtype)


def gather_cached_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached tokens of one sequence, `[length, heads, head_dim]`.

    cache: `[num_blocks, block_size, heads, head_dim]`; block_table: `[max_blocks]` block ids.
    """
    block_size = cache.shape[1]
    num_blocks = -(-length // block_size)
    return cache[block_table[:num_blocks].long()].flatten(0, 1)[:length]
