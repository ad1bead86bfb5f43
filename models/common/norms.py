import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, computed in at least fp32 (for stability under bf16)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight

    def init_parameter(self, name: str, full: torch.Tensor, generator: torch.Generator) -> None:
        full.fill_(1.0)


class LayerNorm(nn.Module):
    """LayerNorm over the last dim, with (affine) or without a learned weight and bias; normalized in
    at least fp32 like RMSNorm."""

    def __init__(self, dim: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        normed = F.layer_norm(xf, (self.dim,), eps=self.eps).type_as(x)
        return normed if self.weight is None else normed * self.weight + self.bias

    def init_parameter(self, name: str, full: torch.Tensor, generator: torch.Generator) -> None:
        full.fill_(1.0 if name == "weight" else 0.0)
