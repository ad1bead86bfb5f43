"""The attention front-end every softmax-attention layer calls.

Layers hand it q, k, v in [B, T, H, D] layout; it returns [B, T, H, D]. Parallel plans replace
the `CoreAttention` module of a layer (context-parallel ring/ulysses, flash-attn) without the
model code knowing.
"""
import torch
import torch.nn.functional as F
from torch import nn


class CoreAttention(nn.Module):
    """Causal scaled-dot-product attention with grouped-query heads (n_kv_heads divides n_heads)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # SDPA wants [B, H, T, D]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
        return out.transpose(1, 2)
