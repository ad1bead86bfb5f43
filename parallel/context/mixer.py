"""The context-parallel hook for sequence mixers without softmax (linear attention, the delta rule).

Such a mixer carries a state S [..., dk, dv] along the sequence, and over one rank's chunk its
recurrence is affine in the state the chunk starts from:

    S_out = M S_in + S_ext,    M [..., dk, dk]: the chunk's transitions multiplied (later on the left),
                               S_ext [..., dk, dv]: the chunk's final state when S_in = 0.

So instead of rotating keys and values, each rank computes its map (M, S_ext), the maps are
all-gathered once, and rank r folds those of ranks 0..r-1 in rank order, S <- M_j S + S_ext_j from
S = 0, to get the state its chunk starts from. The maps do not commute (the delta rule's
M = prod(I - beta k k^T)), so they are folded in order, never summed. In the backward each rank
sends its state gradient back through M_j^T over the earlier maps, and one reduce-scatter sums
every map's gradient over the ranks that used it.

Packed documents (document_ids [B, T], this rank's chunk of the row's global ids): the mixer's map
already resets at the boundaries inside the chunk (M = 0 past the first one, S_ext from the last
document). A boundary at the chunk's first token is seen here: the previous rank's last id comes
over (one tiny all-gather, parallel/context/halo.py), and where it differs the chunk takes no state
from the ranks before it and passes none of it on, i.e. both its incoming state and its M are zeroed.

Chunks must be in sequence order over the cp ranks: the contiguous layout, not zigzag.
"""
from abc import ABC, abstractmethod

import torch
import torch.distributed as dist
from torch import Tensor

from parallel.context.halo import previous_halo


class StatePassingMixer(ABC):
    """What a non-softmax mixer provides for context parallelism; `context_parallel_mix` does the rest."""

    @abstractmethod
    def chunk_map(self, *inputs: Tensor, **document_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(M, S_ext) of this rank's chunk, in fp32 or wider (long products of M drift in bf16),
        batch first. A mixer that packs documents also takes document_ids= [B, T] (only passed when
        there are some) and resets at the documents that start inside the chunk."""

    @abstractmethod
    def mix(self, initial_state: Tensor, *inputs: Tensor, **document_ids: Tensor) -> Tensor:
        """The mixer's output over this rank's chunk, its recurrence starting from initial_state (and,
        given document_ids=, restarting at the documents that start inside the chunk)."""


def _fold(maps: Tensor, key_dim: int, start: Tensor) -> list[Tensor]:
    """The states before and after each map (M | S_ext packed on the last dim), in order, from start."""
    states = [start]
    for packed in maps:
        states.append(packed[..., :key_dim] @ states[-1] + packed[..., key_dim:])
    return states


class _IncomingState(torch.autograd.Function):
    """All-gather the packed maps, fold the earlier ranks'. Hand-written backward rather than
    autograd through the gather: rank 0's state depends on no map, so autograd would skip the
    collective there while the other ranks wait for it."""

    @staticmethod
    def forward(ctx, packed, key_dim, group):
        gathered = packed.new_empty((dist.get_world_size(group), *packed.shape))
        dist.all_gather_into_tensor(gathered.flatten(0, 1), packed.contiguous(), group)  # gloo wants ranks on dim 0
        ctx.save_for_backward(gathered)
        ctx.key_dim, ctx.group = key_dim, group
        rank = dist.get_rank(group)
        return _fold(gathered[:rank], key_dim, torch.zeros_like(packed[..., key_dim:]))[-1]

    @staticmethod
    def backward(ctx, grad):
        (gathered,) = ctx.saved_tensors
        rank, key_dim = dist.get_rank(ctx.group), ctx.key_dim
        states = _fold(gathered[:rank], key_dim, torch.zeros_like(grad))
        contributions = torch.zeros_like(gathered)  # this rank's gradient for every rank's map
        for j in reversed(range(rank)):  # the state's gradient flows back through M_j^T
            contributions[j, ..., key_dim:] = grad
            contributions[j, ..., :key_dim] = grad @ states[j].transpose(-1, -2)
            grad = gathered[j, ..., :key_dim].transpose(-1, -2) @ grad
        own = torch.empty_like(gathered[0])
        dist.reduce_scatter_tensor(own, contributions.flatten(0, 1), group=ctx.group)  # sum over the ranks after it
        return own, None, None


def incoming_state(transition: Tensor, state: Tensor, group: dist.ProcessGroup) -> Tensor:
    """The state this rank's chunk starts from: the maps (transition M, state S_ext) of the ranks
    before it in `group`, folded in rank order from zero. Differentiable in both."""
    return _IncomingState.apply(torch.cat([transition, state], dim=-1), transition.shape[-1], group)


def context_parallel_mix(mixer: StatePassingMixer, group: dist.ProcessGroup, *inputs: Tensor,
                         document_ids: Tensor | None = None) -> Tensor:
    """The mixer's output over this rank's chunk of a sequence spread contiguously over `group`
    (document_ids [B, T]: this rank's chunk of the rows' document ids, None: one document a row)."""
    if document_ids is None:
        transition, state = mixer.chunk_map(*inputs)
        return mixer.mix(incoming_state(transition, state, group), *inputs)
    transition, state = mixer.chunk_map(*inputs, document_ids=document_ids)
    previous_id = previous_halo(document_ids.unsqueeze(-1), 1, group)[:, 0, 0]  # rank 0: its state is 0 anyway
    continues = (document_ids[:, 0] == previous_id).to(transition.dtype)
    continues = continues.reshape(-1, *[1] * (transition.dim() - 1))
    start = continues * incoming_state(continues * transition, state, group)
    return mixer.mix(start, *inputs, document_ids=document_ids)
