"""Writing new keys and values into the paged KV cache: the Triton kernel, its launcher and the
torch reference op."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .device import nvidia_capability
from .launch_math import cdiv, next_pow2

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# A KV cache may also hold float8 (e4m3, vLLM's kv_cache_dtype="fp8"): half the bytes of fp16 per
# token, so twice the tokens fit and decode reads half as much. Values are stored unscaled, past
# +-FP8_MAX saturated (float8_e4m3fn has no infinity), and read back into the query's dtype.
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
CACHE_DTYPES = _DTYPES + (FP8,)
# Triton converts to and from float8 e4m3 only on sm_89 (Ada) and later.
FP8_CAPABILITY = 89
# Elements of one head tile per program: enough for a few 16-byte vectors per thread at 4 warps,
# small enough that decode (a handful of tokens) still spreads over several programs.
_TILE_ELEMENTS = 2048


@triton.jit
def _e4m3_grid(x):
    """float32 x in [-448, 448] rounded to the nearest float8 e4m3 value (ties to even, as torch
    rounds), still as float32. The conversion after it is then exact: Triton 3.6's interpreter
    rounds float8 conversions wrongly near the top of each binade (1.98 -> 1.0), and this way
    the GPU and the interpreter store the same bits. e4m3 keeps 3 mantissa bits: the quantum is
    2**(exponent - 3), and 2**-9 below 2**-6 (subnormals); the exponent comes from the bits."""
    x_bits = x.to(tl.int32, bitcast=True)
    exponent = tl.maximum(((x_bits >> 23) & 0xFF) - 127, -6)
    quantum = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)
    inverse = ((3 - exponent + 127) << 23).to(tl.float32, bitcast=True)
    # adding and taking away 1.5 * 2**23 rounds to an integer, ties to even (|x| / quantum < 16)
    steps = (tl.abs(x) * inverse + 12582912.0) - 12582912.0
    # x's sign bit back on, so that what rounds to zero keeps it (-0.0004 -> -0, as torch)
    return ((steps * quantum).to(tl.int32, bitcast=True) | (x_bits & -2147483648)).to(tl.float32, bitcast=True)


@triton.jit
def to_cache(x, dtype: tl.constexpr):
    """x rounded to the cache's dtype; to float8 through float32, saturated at +-FP8_MAX and
    rounded to nearest even (_e4m3_grid)."""
    if dtype == tl.float8e4nv:
        x = _e4m3_grid(tl.clamp(x.to(tl.float32), -448.0, 448.0))
    return x.to(dtype)


@triton.jit
def slot_offset(slot, block_size, stride_cb, stride_cs):
    """Element offset of flat cache slot `slot` (int64: block * block_size + position in it) in
    a [num_blocks, block_size, ...] cache of those strides; shared by every kernel that stores
    new tokens."""
    return (slot // block_size) * stride_cb + (slot % block_size) * stride_cs


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
    dst = (slot_offset(slot, block_size, stride_cb, stride_cs)
           + offs_h[:, None] * stride_ch + offs_d[None, :] * stride_cd)
    tl.store(key_cache_ptr + dst, to_cache(key, key_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(value_cache_ptr + dst, to_cache(value, value_cache_ptr.dtype.element_ty), mask=mask)


def check_cache_dtype(dtype: torch.dtype, device: torch.device) -> None:
    """A float8 cache needs a GPU whose Triton kernels convert float8 (sm_89+); elsewhere any
    cache dtype works (the interpreter, the torch references)."""
    capability = nvidia_capability(device) if device.type == "cuda" else None
    if dtype == FP8 and capability is not None and capability < FP8_CAPABILITY:
        raise ValueError(f"a float8 KV cache (kv_cache_dtype='fp8') needs compute capability {FP8_CAPABILITY} or "
                         f"later for the Triton kernels; this GPU has {capability}: use kernels='torch' or an "
                         "fp16 / bf16 cache")


def check_cache_pair(key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
    """Both caches `[num_blocks, block_size, heads, head_dim]` with one shape, one set of strides
    and one dtype: the kernels address both with the same offsets."""
    if key_cache.dim() != 4 or key_cache.shape != value_cache.shape:
        raise ValueError(f"key_cache and value_cache must both be [num_blocks, block_size, heads, head_dim], "
                         f"got {tuple(key_cache.shape)} and {tuple(value_cache.shape)}")
    if key_cache.stride() != value_cache.stride():
        raise ValueError(f"key_cache and value_cache must share strides, got {key_cache.stride()} "
                         f"and {value_cache.stride()}")
    if key_cache.dtype != value_cache.dtype or key_cache.dtype not in CACHE_DTYPES:
        raise ValueError(f"key_cache and value_cache must share one dtype of float16, bfloat16, float32, "
                         f"float8_e4m3fn; got {key_cache.dtype} and {value_cache.dtype}")
    check_cache_dtype(key_cache.dtype, key_cache.device)


def check_slot_mapping(slot_mapping: torch.Tensor, tokens: int, device: torch.device) -> None:
    """One int64 cache slot per new token, on the tokens' device: what every launcher that
    stores new tokens (this module's and both attentions') takes."""
    if slot_mapping.shape != (tokens,) or slot_mapping.dtype != torch.int64 or slot_mapping.device != device:
        raise ValueError(f"slot_mapping must be [{tokens}] int64 on {device}, got {tuple(slot_mapping.shape)} "
                         f"{slot_mapping.dtype} on {slot_mapping.device}")
    if tokens > 1 and slot_mapping.stride(0) != 1:     # the kernels read slot i at slot_mapping + i
        raise ValueError(f"slot_mapping must be contiguous, got stride {slot_mapping.stride(0)}")


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
    check_slot_mapping(slot_mapping, tokens, key.device)
    for name, t in (("key", key), ("value", value)):
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} dtype {t.dtype} not supported (float16, bfloat16, float32)")
    if key.dtype != value.dtype:
        raise ValueError(f"key and value dtypes {key.dtype} and {value.dtype} must match")
    devices = {t.device for t in (key, value, key_cache, value_cache, slot_mapping)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if tokens == 0:
        return
    block_d = next_pow2(head_dim)
    block_h = min(next_pow2(heads), max(1, _TILE_ELEMENTS // block_d))
    grid = (tokens, cdiv(heads, block_h))
    _write_kv_cache_kernel[grid](
        key, value, key_cache, value_cache, slot_mapping, heads, key_cache.shape[1],
        *key.stride(), *value.stride(), *key_cache.stride(),
        HEAD_DIM=head_dim, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4)


def compile_specs() -> list:
    """Every specialisation OPT runs (head_dim 64/80/128; fp16/bf16 and fp32 caches, and fp16 /
    bf16 tokens into float8 caches on sm_90), with the unit last-dim strides that the JIT turns
    into constants, as on a real launch."""
    from .compile_check import CompileSpec
    specs = []
    pairs = [(dtype, dtype, (80, 90)) for dtype in ("fp16", "bf16", "fp32")]
    pairs += [(dtype, "fp8e4nv", (90,)) for dtype in ("fp16", "bf16")]
    for dtype, cache_dtype, targets in pairs:
        for head_dim in (64, 80, 128):
            block_d = next_pow2(head_dim)
            sig = {"key_ptr": f"*{dtype}", "value_ptr": f"*{dtype}", "key_cache_ptr": f"*{cache_dtype}",
                   "value_cache_ptr": f"*{cache_dtype}", "slot_ptr": "*i64", "heads": "i32", "block_size": "i32"}
            sig.update({name: "i32" for name in ("stride_kt", "stride_kh", "stride_vt", "stride_vh",
                                                 "stride_cb", "stride_cs", "stride_ch")})
            sig.update({name: "constexpr" for name in ("stride_kd", "stride_vd", "stride_cd",
                                                       "HEAD_DIM", "BLOCK_H", "BLOCK_D")})
            consts = dict(stride_kd=1, stride_vd=1, stride_cd=1, HEAD_DIM=head_dim,
                          BLOCK_H=_TILE_ELEMENTS // block_d, BLOCK_D=block_d)
            label = f"{dtype} d{head_dim}" + ("" if cache_dtype == dtype else f" into {cache_dtype}")
            specs.append(CompileSpec(_write_kv_cache_kernel, label, sig, consts, targets=targets))
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
    key_cache.view(-1, *key_cache.shape[2:])[slots] = to_cache_ref(key[keep], key_cache.dtype)
    value_cache.view(-1, *value_cache.shape[2:])[slots] = to_cache_ref(value[keep], value_cache.dtype)


def to_cache_ref(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`to_cache` in torch: x in the cache's dtype, float8 saturated at +-FP8_MAX."""
    if dtype == FP8:
        x = x.float().clamp(-FP8_MAX, FP8_MAX)
    return x.to(dtype)


def gather_cached_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached tokens of one sequence, `[length, heads, head_dim]`.

    cache: `[num_blocks, block_size, heads, head_dim]`; block_table: `[max_blocks]` block ids.
    """
    block_size = cache.shape[1]
    num_blocks = -(-length // block_size)
    return cache[block_table[:num_blocks].long()].flatten(0, 1)[:length]
