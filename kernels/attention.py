"""Prefill attention over packed variable-length sequences: the torch reference op.

Each sequence's new queries attend causally to its own new keys and to the context already in
the paged cache, which covers plain prefill (no context), chunked prefill and recompute after
preemption with one signature.
"""
from __future__ import annotations

import torch

from .kv_cache import gather_cached_kv


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  query_start: int) -> torch.Tensor:
    """Causal attention of one sequence in float32.

    q: `[q_len, heads, head_dim]`; k, v: `[kv_len, heads, head_dim]`; query i sits at position
    `query_start + i` and sees keys 0..query_start+i.
    """
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    q_pos = torch.arange(q.shape[0], device=q.device)[:, None] + query_start
    k_pos = torch.arange(k.shape[0], device=q.device)[None, :]
    scores.masked_fill_(k_pos > q_pos, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v.float()).to(q.dtype)


def prefill_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          key_cache: torch.Tensor, value_cache: torch.Tensor,
                          cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
                          block_tables: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention for the new tokens of a batch of sequences, packed back to back.

    q, k, v: `[tokens, heads, head_dim]` new tokens; key_cache, value_cache:
    `[num_blocks, block_size, heads, head_dim]`; cu_seqlens_q: `[seqs + 1]` int32 offsets of each
    sequence in the packed tokens; context_lens: `[seqs]` int32 tokens already cached before the
    new ones; block_tables: `[seqs, max_blocks]` int32. Returns `[tokens, heads, head_dim]`.
    """
    out = torch.empty_like(q)
    starts = cu_seqlens_q.tolist()
    for i, context in enumerate(context_lens.tolist()):
        s, e = starts[i], starts[i + 1]
        keys, values = k[s:e], v[s:e]
        if context:
            keys = torch.cat([gather_cached_kv(key_cache, block_tables[i], context).to(k.dtype), keys])
            values = torch.cat([gather_cached_kv(value_cache, block_tables[i], context).to(v.dtype), values])
        out[s:e] = attention_ref(q[s:e], keys, values, scale, query_start=context)
    return out
