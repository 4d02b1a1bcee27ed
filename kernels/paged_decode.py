"""Decode attention over the paged KV cache, one query token per sequence: the torch reference."""
from __future__ import annotations

import torch


def paged_decode_attention_ref(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                               block_tables: torch.Tensor, seq_lens: torch.Tensor,
                               scale: float) -> torch.Tensor:
    """q: `[seqs, heads, head_dim]`; key_cache, value_cache: `[num_blocks, block_size, heads,
    head_dim]`; block_tables: `[seqs, max_blocks]` int32; seq_lens: `[seqs]` int32 keys per
    sequence, the current token's included. Returns `[seqs, heads, head_dim]`.

    Gathers every sequence's blocks (vLLM's `ref_paged_attn` idea), batched: slots past a
    sequence's length are zeroed, not just masked, so NaN garbage there cannot leak in via 0*NaN.
    """
    seqs, max_blocks = block_tables.shape
    block_size = key_cache.shape[1]
    table = block_tables.long()
    keys = key_cache[table].flatten(1, 2).float()      # [seqs, max_blocks*block_size, heads, dim]
    values = value_cache[table].flatten(1, 2).float()
    valid = torch.arange(max_blocks * block_size, device=q.device)[None, :] < seq_lens[:, None]
    keys = torch.where(valid[:, :, None, None], keys, 0.0)
    values = torch.where(valid[:, :, None, None], values, 0.0)
    scores = torch.einsum("shd,skhd->shk", q.float(), keys) * scale
    scores.masked_fill_(~valid[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("shk,skhd->shd", probs, values).to(q.dtype)
