"""The per-step attention metadata, set by the model runner and read by every attention layer.

One Context per forward pass instead of arguments threaded through each module. Tokens are
packed prefills first, then decodes, so the attention layer splits them at `num_prefill_tokens`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Context:
    slot_mapping: torch.Tensor            # [tokens] int64 flat cache slot of each new token
    num_prefill_tokens: int = 0
    cu_seqlens_q: torch.Tensor | None = None          # [prefills + 1] int32
    context_lens: torch.Tensor | None = None          # [prefills] int32 tokens cached before this step
    max_context_len: int | None = None                # the largest of them, known on the host
    max_query_len: int | None = None                  # the most new tokens of one prefill, on the host
    prefill_block_tables: torch.Tensor | None = None  # [prefills, max_blocks] int32
    decode_seq_lens: torch.Tensor | None = None       # [decodes] int32, current token included
    decode_block_tables: torch.Tensor | None = None   # [decodes, max_blocks] int32

    def tensors(self) -> dict[str, torch.Tensor]:
        """The fields that hold a tensor, by name (to move them to the device together)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}


_CONTEXT: Context | None = None


def set_context(context: Context | None) -> None:
    global _CONTEXT
    _CONTEXT = context


def get_context() -> Context:
    if _CONTEXT is None:
        raise RuntimeError("no attention Context is set: call the model through the ModelRunner")
    return _CONTEXT
