"""LayerNorm fused with the linear layers around it: the torch reference ops.

The decoder layer calls exactly these signatures; the Triton kernels (next issue) implement the
same ones. x is `[tokens, in_features]`, weight is `[out_features, in_features]` (nn.Linear layout).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim with statistics in float32.

    fp16 sums overflow on the outlier channels of OPT-6.7B and larger, so the row is upcast.
    """
    out = F.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps)
    return out.to(x.dtype)


def layernorm_linear_ref(x: torch.Tensor, ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None,
                         weight: torch.Tensor, bias: torch.Tensor, eps: float,
                         relu: bool = False) -> torch.Tensor:
    """`[relu](LN(x) @ weight.T + bias)`; with ln_weight None the LayerNorm is skipped (post-LN).

    Serves the fused QKV projection (`weight` is `[3*hidden, hidden]`) and fc1 + ReLU.
    """
    h = x if ln_weight is None else layer_norm_ref(x, ln_weight, ln_bias, eps)
    out = F.linear(h, weight, bias)
    return torch.relu_(out) if relu else out


def linear_residual_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        residual: torch.Tensor) -> torch.Tensor:
    """`x @ weight.T + bias + residual`: out_proj and fc2 with the residual add in the epilogue."""
    return F.linear(x, weight, bias) + residual


def linear_residual_layernorm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                  residual: torch.Tensor, ln_weight: torch.Tensor,
                                  ln_bias: torch.Tensor, eps: float) -> torch.Tensor:
    """`LN(x @ weight.T + bias + residual)`: the post-LN (OPT-350m) layout after out_proj and fc2."""
    return layer_norm_ref(linear_residual_ref(x, weight, bias, residual), ln_weight, ln_bias, eps)
