"""The context-parallel hook for sequence mixers without softmax (linear attention, DeltaNet).

Such a mixer carries a state S [..., dk, dv] along the sequence, and over one rank's chunk its
recurrence is affine in the state the chunk starts from:

    S_out = M S_in + S_ext,    M [..., dk, dk]: the chunk's transitions multiplied (later on the left),
                               S_ext [..., dk, dv]: the chunk's final state when S_in = 0.

So instead of rotating keys and values, each rank computes its map (M, S_ext), the maps are
all-gathered once, and rank r folds those of ranks 0..r-1 in rank order, S <- M_j S + S_ext_j from
S = 0, to get the state its chunk starts from. The maps do not commute (DeltaNet's
M = prod(I - beta k k^T)), so they are folded in order, never summed. The all-gather is
autograd-aware: the backward (dS flowing from later ranks to earlier ones through M_j^T) is
autograd's, with a reduce-scatter summing each map's gradient over the ranks that used it.

Chunks must be in sequence order over the cp ranks: the contiguous layout, not zigzag.
"""
from abc import ABC, abstractmethod

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor


class StatePassingMixer(ABC):
    """What a non-softmax mixer provides for context parallelism; `context_parallel_mix` does the rest."""

    @abstractmethod
    def chunk_map(self, *inputs: Tensor) -> tuple[Tensor, Tensor]:
        """(M, S_ext) of this rank's chunk, in fp32 or wider (long products of M drift in bf16)."""

    @abstractmethod
    def mix(self, initial_state: Tensor, *inputs: Tensor) -> Tensor:
        """The mixer's output over this rank's chunk, its recurrence starting from initial_state."""


def incoming_state(transition: Tensor, state: Tensor, group: dist.ProcessGroup) -> Tensor:
    """The state this rank's chunk starts from: the maps (transition M, state S_ext) of the ranks
    before it in `group`, folded in rank order from zero. Differentiable in both."""
    maps = funcol.all_gather_tensor_autograd(torch.cat([transition, state], dim=-1).unsqueeze(0), 0, group)
    key_dim = transition.shape[-1]
    folded = torch.zeros_like(state)
    for earlier in maps[:dist.get_rank(group)]:
        folded = earlier[..., :key_dim] @ folded + earlier[..., key_dim:]
    return folded


def context_parallel_mix(mixer: StatePassingMixer, group: dist.ProcessGroup, *inputs: Tensor) -> Tensor:
    """The mixer's output over this rank's chunk of a sequence spread contiguously over `group`."""
    transition, state = mixer.chunk_map(*inputs)
    return mixer.mix(incoming_state(transition, state, group), *inputs)
