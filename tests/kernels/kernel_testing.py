"""Shared helpers for the kernel tests: the op tables under test, the device, tolerances, and the
naive float64 re-computations every implementation is compared against.

Nothing here calls the code under test: the naive references are written from the documented
semantics (DESIGN.md §3-§5, the docstrings in kernels/), slowly and in float64, so a bug shared by
the torch reference and a Triton kernel still shows.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import pytest
import torch

from opt_fast.kernels import TORCH_OPS, triton_ops


def kernel_device() -> str:
    """Same rule as tests/conftest.py's test_device: CUDA where there is one, else CPU."""
    return os.environ.get("OPT_FAST_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


DEVICE = kernel_device()
# Tests that compile for sm_90 in a subprocess and read the PTX (no GPU needed): CI runs them on
# CPU; on a GPU machine, whose minutes are few, they would only repeat that.
compile_only = pytest.mark.skipif(DEVICE == "cuda", reason="a compile-only check: CI runs it without a GPU")


def record_launches(monkeypatch, module, *names, launches: list | None = None) -> list:
    """Replaces the kernels `names` of `module` by wrappers that record each launch as (name,
    grid, args, kwargs) and then run it; returns the list they append to (`launches`, where
    given: one list for the kernels of several modules)."""
    launches = [] if launches is None else launches
    for name in names:
        real = getattr(module, name)

        class Recording:
            def __getitem__(self, grid, real=real, name=name):
                def launch(*args, **kwargs):
                    launches.append((name, grid, args, kwargs))
                    return real[grid](*args, **kwargs)
                return launch
        monkeypatch.setattr(module, name, Recording())
    return launches


def load_benchmark(filename: str, module_name: str):
    """benchmarks/`filename` loaded afresh as a module named `module_name` (the benchmarks are
    scripts, not a package)."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / filename
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def sweep_script():
    """benchmarks/sweep_tiles.py as a module (the tile sweep: its candidates, its smoke run)."""
    return load_benchmark("sweep_tiles.py", "sweep_tiles")


class _TritonTable:
    """The Triton op table as far as it is built: a test of an op with no kernel yet skips."""
    id = "triton"

    def __init__(self, table):
        self._table = table

    def __getattr__(self, name):
        fn = getattr(self._table, name)
        if fn is None:
            pytest.skip(f"no Triton kernel for {name} yet")
        return fn


def _op_tables() -> list:
    """Every op table under test: the torch reference, and the Triton launchers (interpreted on
    CPU: opt_fast.kernels sets TRITON_INTERPRET=1 there before any kernel is defined)."""
    return [pytest.param(TORCH_OPS, id="torch"), pytest.param(_TritonTable(triton_ops()), id="triton")]


OPS = _op_tables()

# (atol, rtol) against a float64 reference computed from the same (already rounded) inputs
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (3e-3, 3e-3)}
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, g: torch.Generator, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    """Random normal values on DEVICE, never zero-filled."""
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def assert_close_to(actual: torch.Tensor, expected64: torch.Tensor, dtype: torch.dtype,
                    scale: float | None = None, factor: float = 1.0) -> None:
    """actual (in `dtype`) against a float64 reference; atol is relative to the reference's rms
    when `scale` is None, so the check means the same thing for outputs of any magnitude."""
    assert actual.dtype == dtype, (actual.dtype, dtype)
    assert torch.isfinite(actual).all(), "non-finite values in the output"
    atol, rtol = TOL[dtype]
    if scale is None:
        scale = expected64.pow(2).mean().sqrt().item() or 1.0
    torch.testing.assert_close(actual.double().cpu(), expected64.double().cpu(),
                               atol=atol * scale * factor, rtol=rtol * factor)


def packed_qkv(tokens: int, heads: int, head_dim: int, g: torch.Generator, dtype: torch.dtype,
               q_scale: float = 1.5, own_v: bool = False):
    """q, k, v as the model passes them: strided views into one packed [T, 3, H, D] tensor. With
    `own_v`, v is a contiguous copy instead, whose token stride differs from k's: the model's k
    and v always share strides, so only such a v shows a launcher that reads v with k's."""
    qkv = randn(tokens, 3, heads, head_dim, g=g, dtype=torch.float64)
    qkv[:, 0] *= q_scale
    qkv = qkv.to(dtype)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    assert tokens == 1 or not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    if own_v:
        v = v.contiguous()
        assert tokens == 1 or v.stride(0) != k.stride(0)
    return q, k, v


def fill_empty(monkeypatch, value: float, int_value: int | None = None) -> None:
    """torch.empty returns float tensors filled with `value`, and with `int_value` (where given)
    integer ones (not bool): an element a kernel should write but does not shows up."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            return t.fill_(value)
        if int_value is not None and t.dtype != torch.bool and not t.is_complex():
            return t.fill_(int_value)
        return t
    monkeypatch.setattr(torch, "empty", poisoned)


class PagedCache:
    """A NaN-poisoned paged KV cache and block tables that are random permutations of the blocks.

    Unused table entries point at blocks no sequence owns (still all NaN), so an implementation
    that reads through them, or past a sequence's length in its last block, turns the output NaN.
    """

    def __init__(self, lengths: list[int], block_size: int, heads: int, head_dim: int,
                 dtype: torch.dtype, g: torch.Generator, spare_blocks: int = 3):
        self.block_size = block_size
        needed = [max(1, -(-n // block_size)) for n in lengths]
        self.max_blocks = max(needed) + 1      # one padding entry at least, in every row
        num_blocks = sum(needed) + spare_blocks
        perm = torch.randperm(num_blocks, generator=g)
        owned, spare = perm[:sum(needed)], perm[sum(needed):]
        rows, start = [], 0
        for n in needed:
            row = owned[start:start + n].tolist()
            start += n
            pad = spare[torch.randint(len(spare), (self.max_blocks - n,), generator=g)].tolist()
            rows.append(row + pad)
        self.block_tables = torch.tensor(rows, dtype=torch.int32, device=DEVICE)
        shape = (num_blocks, block_size, heads, head_dim)
        self.key_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
        self.value_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)

    def slot(self, seq: int, pos: int) -> int:
        return int(self.block_tables[seq, pos // self.block_size]) * self.block_size + pos % self.block_size

    def store(self, seq: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Naively write the first len(keys) positions of sequence `seq`, token by token."""
        for pos in range(keys.shape[0]):
            b, o = divmod(self.slot(seq, pos), self.block_size)
            self.key_cache[b, o] = keys[pos].to(self.key_cache.dtype)
            self.value_cache[b, o] = values[pos].to(self.value_cache.dtype)


def stored_by_hand(cache: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """A copy of `cache` ([blocks, block_size, heads, head_dim]) with rows[t] at flat slot
    slots[t] for every slot >= 0, token by token: the KV write's expectation, built without
    write_kv_cache_ref (which the torch ops themselves call)."""
    out = cache.clone()
    block_size = cache.shape[1]
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            out[slot // block_size, slot % block_size] = rows[t]
    return out


def fused_write_case(seq_lens: list[int], block_size: int, heads: int, head_dim: int, dtype: torch.dtype,
                     seed: int, unstored: tuple[int, ...] = ()):
    """A decode step's inputs with its KV write (new_kv): each sequence's cache holds all its
    tokens but the last, whose slot stays NaN; q comes strided from a packed qkv, as the model
    passes it, the last token's key and value from tensors of other strides than q's and each
    other's (a launcher that mixed them up would read the wrong rows), with its slot (-1 for
    a zero-length padding row, which only the Triton op takes). The rows in `unstored` get
    slot -1 and hold some other value at their last position in the cache: the op must attend
    to their new token all the same, and store nothing. Returns (q, cache, new_kv, keys,
    values), the keys and values the op attends to at every position."""
    g = gen(seed)
    q, new_keys, new_values = packed_qkv(len(seq_lens), heads, head_dim, g, dtype)
    # keys head-major in memory, values token-major and contiguous
    new_keys = new_keys.transpose(0, 1).contiguous().transpose(0, 1)
    new_values = new_values.contiguous()
    assert len(seq_lens) < 2 or len({q.stride(), new_keys.stride(), new_values.stride()}) == 3
    cache = PagedCache(seq_lens, block_size, heads, head_dim, dtype, g)
    keys, values, slots = [], [], []
    for i, n in enumerate(seq_lens):
        held = n if i in unstored else max(n - 1, 0)
        old_k = randn(held, heads, head_dim, g=g, dtype=dtype)
        old_v = randn(held, heads, head_dim, g=g, dtype=dtype)
        cache.store(i, old_k, old_v)
        keys.append(torch.cat([old_k[:n - 1], new_keys[i:i + 1]])[:n])
        values.append(torch.cat([old_v[:n - 1], new_values[i:i + 1]])[:n])
        slots.append(cache.slot(i, n - 1) if n and i not in unstored else -1)
    return q, cache, (new_keys, new_values, torch.tensor(slots, dtype=torch.int64, device=DEVICE)), keys, values


def naive_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                           query_start: int) -> torch.Tensor:
    """float64, one head and one query at a time: query i sits at position query_start + i and
    sees keys 0..query_start+i. q: [q_len, H, D]; k, v: [kv_len, H, D]. Returns [q_len, H, D]."""
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    out = torch.empty(q.shape, dtype=torch.float64)
    for i in range(q.shape[0]):
        visible = query_start + i + 1
        for h in range(q.shape[1]):
            scores = (k[:visible, h] @ q[i, h]) * scale
            weights = torch.exp(scores - scores.max())
            out[i, h] = (weights / weights.sum()) @ v[:visible, h]
    return out
