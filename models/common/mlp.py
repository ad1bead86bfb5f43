import torch
import torch.nn.functional as F
from torch import nn

from models.common.linear import Linear, Projection


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x): the Llama feed-forward. w1 and w3 start N(0, init_std), w2 N(0, out_std)."""

    def __init__(self, dim: int, hidden_dim: int, init_std: float, out_std: float, projection: Projection = Linear):
        super().__init__()
        self.w1 = projection(dim, hidden_dim, init_std)
        self.w3 = projection(dim, hidden_dim, init_std)
        self.w2 = projection(hidden_dim, dim, out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def swiglu_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Llama's rule: 2/3 of 4*dim (times an optional multiplier), rounded up to multiple_of."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)
