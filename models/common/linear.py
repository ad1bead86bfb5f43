"""Weight layers that initialize themselves, and the projection factory building blocks take.

Every module that owns parameters defines `init_parameter(name, full, generator)`: it fills the
full (unsharded) tensor of its parameter `name` (parallel/init.py calls it, layout-independently).
A block asks a `Projection` factory for each of its projections, so a family can put another
kind of layer (e.g. TokenFormer's Pattention) where a linear layer is, without subclassing.
"""
from collections.abc import Callable

import torch
from torch import nn

# (in_features, out_features, init_std) -> a module mapping [..., in_features] -> [..., out_features]
Projection = Callable[[int, int, float], nn.Module]


class Linear(nn.Linear):
    """A bias-free linear layer whose weight starts N(0, init_std)."""

    def __init__(self, in_features: int, out_features: int, init_std: float):
        super().__init__(in_features, out_features, bias=False)
        self.init_std = init_std

    def init_parameter(self, name: str, full: torch.Tensor, generator: torch.Generator) -> None:
        full.normal_(0.0, self.init_std, generator=generator)


class Embedding(nn.Embedding):
    """An embedding table that starts N(0, init_std)."""

    def __init__(self, num_embeddings: int, dim: int, init_std: float):
        super().__init__(num_embeddings, dim)
        self.init_std = init_std

    def init_parameter(self, name: str, full: torch.Tensor, generator: torch.Generator) -> None:
        full.normal_(0.0, self.init_std, generator=generator)
