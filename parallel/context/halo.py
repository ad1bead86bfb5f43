"""The halo of a short causal convolution under context parallelism (contiguous layout).

A causal convolution of kernel K at the first tokens of rank r's chunk reads the last K-1 tokens
of rank r-1's chunk. `previous_halo(x, n, group)` returns them ([B, n, C]; zeros on rank 0):
one all-gather of every rank's last n tokens (n = K-1, tiny), symmetric so that no rank skips a
collective; the backward all-gathers the halo gradients and gives each rank the one its successor
computed for its tail.
"""
import torch
import torch.distributed as dist
from torch import Tensor


class _PreviousHalo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tail, group):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        gathered = tail.new_empty((world, *tail.shape))
        dist.all_gather_into_tensor(gathered.flatten(0, 1), tail.contiguous(), group)
        ctx.group = group
        return gathered[rank - 1].clone() if rank > 0 else torch.zeros_like(tail)

    @staticmethod
    def backward(ctx, grad):
        group = ctx.group
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        gathered = grad.new_empty((world, *grad.shape))
        dist.all_gather_into_tensor(gathered.flatten(0, 1), grad.contiguous(), group)
        own = gathered[rank + 1].clone() if rank + 1 < world else torch.zeros_like(grad)
        return own, None


def previous_halo(x: Tensor, n: int, group: dist.ProcessGroup) -> Tensor:
    """The last n tokens (dim 1) of the previous rank's chunk of x; zeros on the first rank."""
    if x.shape[1] < n:
        raise ValueError(f"a context-parallel halo of {n} tokens needs at least {n} tokens per cp rank, "
                         f"got {x.shape[1]}; use a longer sequence or a smaller cp")
    return _PreviousHalo.apply(x[:, x.shape[1] - n:], group)
