"""The OPT decoder as torch modules, equivalent to Hugging Face's `OPTForCausalLM`.

Parameter names follow the HF checkpoint (`decoder.layers.N.fc1.weight`, ...) except that q, k
and v live in one `qkv_proj` so LayerNorm + QKV is one op; the loader packs them. Every layer
calls the op table (`opt_fast.kernels.KernelOps`), so the torch reference and the Triton
kernels are interchangeable.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import OPTConfig
from ..context import get_context
from ..kernels import KernelOps


class OPTAttention(nn.Module):
    def __init__(self, config: OPTConfig, ops: KernelOps):
        super().__init__()
        self.ops = ops
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.scale = self.head_dim ** -0.5
        hidden = config.hidden_size
        self.qkv_proj = nn.Linear(hidden, 3 * hidden)
        self.out_proj = nn.Linear(hidden, hidden)
        # [num_blocks, block_size, heads, head_dim] each; assigned by the model runner.
        self.key_cache: torch.Tensor | None = None
        self.value_cache: torch.Tensor | None = None

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """qkv: `[tokens, 3*hidden]` -> attention output `[tokens, hidden]`."""
        ctx, ops = get_context(), self.ops
        q, k, v = qkv.view(-1, 3, self.num_heads, self.head_dim).unbind(1)
        split, tokens, slots = ctx.num_prefill_tokens, q.shape[0], ctx.slot_mapping
        parts = []
        # Each attention op also stores its tokens' k and v in the cache (the KV-cache write
        # fused into the attention launch: one kernel per layer fewer).
        if split:
            parts.append(ops.prefill_attention(q[:split], k[:split], v[:split], self.key_cache,
                                               self.value_cache, ctx.cu_seqlens_q, ctx.context_lens,
                                               ctx.prefill_block_tables, self.scale,
                                               max_context_len=ctx.max_context_len, slot_mapping=slots[:split],
                                               max_query_len=ctx.max_query_len))
        if split < tokens:
            parts.append(ops.paged_decode_attention(q[split:], self.key_cache, self.value_cache,
                                                    ctx.decode_block_tables, ctx.decode_seq_lens, self.scale,
                                                    new_kv=(k[split:], v[split:], slots[split:])))
        # Only a step that mixes prefill and decode tokens pays for joining the two outputs.
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out.reshape(tokens, -1)


class OPTDecoderLayer(nn.Module):
    def __init__(self, config: OPTConfig, ops: KernelOps):
        super().__init__()
        self.ops, self.eps = ops, config.layer_norm_eps
        self.pre_ln = config.do_layer_norm_before
        hidden = config.hidden_size
        self.self_attn = OPTAttention(config, ops)
        self.self_attn_layer_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.fc1 = nn.Linear(hidden, config.ffn_dim)
        self.fc2 = nn.Linear(config.ffn_dim, hidden)
        self.final_layer_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops, attn, eps = self.ops, self.self_attn, self.eps
        ln1, ln2 = self.self_attn_layer_norm, self.final_layer_norm
        if self.pre_ln:   # x + attn(LN1(x)); x + fc2(relu(fc1(LN2(x))))
            qkv = ops.layernorm_linear(x, ln1.weight, ln1.bias, attn.qkv_proj.weight, attn.qkv_proj.bias, eps)
            x = ops.linear_residual(attn.attend(qkv), attn.out_proj.weight, attn.out_proj.bias, x)
            h = ops.layernorm_linear(x, ln2.weight, ln2.bias, self.fc1.weight, self.fc1.bias, eps, relu=True)
            return ops.linear_residual(h, self.fc2.weight, self.fc2.bias, x)
        # post-LN (OPT-350m): LN1(x + attn(x)); LN2(x + fc2(relu(fc1(x))))
        qkv = ops.layernorm_linear(x, None, None, attn.qkv_proj.weight, attn.qkv_proj.bias, eps)
        x = ops.linear_residual_layernorm(attn.attend(qkv), attn.out_proj.weight, attn.out_proj.bias,
                                          x, ln1.weight, ln1.bias, eps)
        h = ops.layernorm_linear(x, None, None, self.fc1.weight, self.fc1.bias, eps, relu=True)
        return ops.linear_residual_layernorm(h, self.fc2.weight, self.fc2.bias, x, ln2.weight, ln2.bias, eps)


class OPTDecoder(nn.Module):
    # Learned positions are looked up at position + 2 (fairseq reserved the first two rows).
    POSITION_OFFSET = 2

    def __init__(self, config: OPTConfig, ops: KernelOps):
        super().__init__()
        self.config, self.ops = config, ops
        self.embed_tokens = nn.Embedding(config.vocab_size, config.word_embed_proj_dim)
        self.embed_positions = nn.Embedding(config.max_position_embeddings + self.POSITION_OFFSET,
                                            config.hidden_size)
        if config.has_projections:
            self.project_in = nn.Linear(config.word_embed_proj_dim, config.hidden_size, bias=False)
            self.project_out = nn.Linear(config.hidden_size, config.word_embed_proj_dim, bias=False)
        self.layers = nn.ModuleList(OPTDecoderLayer(config, ops) for _ in range(config.num_hidden_layers))
        if config.has_final_layer_norm:
            self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if self.config.has_projections:
            x = self.project_in(x)
        x = x + self.embed_positions(positions + self.POSITION_OFFSET)
        for layer in self.layers:
            x = layer(x)
        if self.config.has_final_layer_norm:
            ln = self.final_layer_norm
            x = self.ops.layer_norm(x, ln.weight, ln.bias, self.config.layer_norm_eps)
        if self.config.has_projections:
            x = self.project_out(x)
        return x


class OPTForCausalLM(nn.Module):
    """OPT with the LM head tied to the token embedding (never loaded from a checkpoint)."""

    def __init__(self, config: OPTConfig, ops: KernelOps):
        super().__init__()
        self.config = config
        self.decoder = OPTDecoder(config, ops)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: `[tokens]` int64 of many sequences, packed (prefills first, then
        decodes), with the Context set. Returns hidden states `[tokens, word_embed_proj_dim]`."""
        return self.decoder(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """`[rows, word_embed_proj_dim]` -> float32 logits `[rows, vocab_size]`, written into `out`
        when given (the same one cast kernel as without it)."""
        logits = torch.nn.functional.linear(hidden, self.decoder.embed_tokens.weight)
        return logits.float() if out is None else out.copy_(logits)
