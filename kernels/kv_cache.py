"""Writing new keys and values into the paged KV cache: the torch reference op."""
from __future__ import annotations

import torch


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
