"""write_kv_cache: exactly the mapped slots change, padding tokens (slot < 0) are skipped."""
from __future__ import annotations

import pytest
import torch

from kernel_testing import DEVICE, DTYPES, OPS, gen, packed_qkv


# OPT's heads, and beside them the tiny test models' 16 and a head whose rows are not 16-byte
# multiples (34), with values of their own strides (the model's share k's: a launcher that read
# them with k's would pass every other test)
@pytest.mark.parametrize("ops", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("head_dim,own_v", [(64, False), (80, False), (128, False), (16, True), (34, True)])
@pytest.mark.parametrize("tokens", [1, 17, 67])
def test_write_kv_cache_writes_exactly_the_mapped_slots(ops, dtype, block_size, head_dim, own_v, tokens):
    heads, num_blocks = 3, 11
    g = gen(tokens * 1000 + block_size * 10 + head_dim)
    _, key, value = packed_qkv(tokens, heads, head_dim, g, dtype, own_v=own_v)   # strided views, as the model passes
    num_slots = num_blocks * block_size
    slots = torch.randperm(num_slots, generator=g)[:tokens]
    # every third token (not the first, so a 1-token batch still writes) is padding
    padding = torch.zeros(tokens, dtype=torch.bool)
    padding[1::3] = True
    slot_mapping = torch.where(padding, -1, slots).to(torch.int64).to(DEVICE)
    shape = (num_blocks, block_size, heads, head_dim)
    key_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    value_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    key_in, value_in = key.clone(), value.clone()

    ops.write_kv_cache(key, value, key_cache, value_cache, slot_mapping)

    assert torch.equal(key, key_in) and torch.equal(value, value_in)
    written = torch.zeros(num_slots, dtype=torch.bool)
    for i in range(tokens):
        if padding[i]:
            continue
        s = int(slots[i])
        written[s] = True
        b, o = divmod(s, block_size)
        assert torch.equal(key_cache[b, o], key[i]), f"key of token {i} not at slot {s}"
        assert torch.equal(value_cache[b, o], value[i]), f"value of token {i} not at slot {s}"
    untouched = ~written.view(num_blocks, block_size)
    assert torch.isnan(key_cache[untouched.to(DEVICE)]).all(), "a slot that no token maps to was written"
    assert torch.isnan(value_cache[untouched.to(DEVICE)]).all(), "a slot that no token maps to was written"


@pytest.mark.parametrize("ops", OPS)
def test_write_kv_cache_all_padding_writes_nothing(ops):
    g = gen(5)
    _, key, value = packed_qkv(6, 2, 64, g, torch.float16)
    key_cache = torch.full((4, 16, 2, 64), float("nan"), dtype=torch.float16, device=DEVICE)
    value_cache = key_cache.clone()
    ops.write_kv_cache(key, value, key_cache, value_cache, torch.full((6,), -1, dtype=torch.int64, device=DEVICE))
    assert torch.isnan(key_cache).all() and torch.isnan(value_cache).all()


@pytest.mark.parametrize("ops", OPS)
def test_write_kv_cache_overwrites_previous_contents(ops):
    """A slot freed and reused (after preemption) holds stale finite data: the write replaces it
    and the neighbours keep theirs."""
    g = gen(9)
    _, key, value = packed_qkv(5, 2, 80, g, torch.float32)
    key_cache = torch.randn((3, 8, 2, 80), generator=g).to(DEVICE)
    value_cache = torch.randn((3, 8, 2, 80), generator=g).to(DEVICE)
    k0, v0 = key_cache.clone(), value_cache.clone()
    slot_mapping = torch.tensor([23, 0, 9, -1, 8], dtype=torch.int64, device=DEVICE)
    ops.write_kv_cache(key, value, key_cache, value_cache, slot_mapping)
    flat_k, flat_v = key_cache.view(24, 2, 80), value_cache.view(24, 2, 80)
    for i, s in enumerate(slot_mapping.tolist()):
        if s >= 0:
            assert torch.equal(flat_k[s], key[i]) and torch.equal(flat_v[s], value[i])
    others = torch.tensor([s not in (23, 0, 9, 8) for s in range(24)], device=DEVICE)
    assert torch.equal(flat_k[others], k0.view(24, 2, 80)[others])
    assert torch.equal(flat_v[others], v0.view(24, 2, 80)[others])


@pytest.mark.parametrize("ops", OPS)
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_write_kv_cache_more_heads_than_one_program_holds(ops, head_dim):
    """37 heads (OPT-13B has 40): the Triton launch splits them over several programs per token
    (32 heads of 64 a program, 16 of 80 or 128), the last one partial; every head lands."""
    heads, num_blocks, block_size = 37, 3, 8
    g = gen(head_dim + 37)
    _, key, value = packed_qkv(5, heads, head_dim, g, torch.float16)
    shape = (num_blocks, block_size, heads, head_dim)
    key_cache = torch.full(shape, float("nan"), dtype=torch.float16, device=DEVICE)
    value_cache = key_cache.clone()
    slot_mapping = torch.tensor([17, -1, 0, 23, 9], dtype=torch.int64, device=DEVICE)
    ops.write_kv_cache(key, value, key_cache, value_cache, slot_mapping)
    flat_k, flat_v = key_cache.view(-1, heads, head_dim), value_cache.view(-1, heads, head_dim)
    for i, s in enumerate(slot_mapping.tolist()):
        if s >= 0:
            assert torch.equal(flat_k[s], key[i]) and torch.equal(flat_v[s], value[i]), f"token {i}"
    unused = torch.tensor([s not in (17, 0, 23, 9) for s in range(num_blocks * block_size)], device=DEVICE)
    assert flat_k[unused].isnan().all() and flat_v[unused].isnan().all()
