"""Turn a model's softmax attention layers context-parallel, from outside the model."""
from collections.abc import Iterable
from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from parallel.context.hybrid import HYBRID_MESH_DIMS
from parallel.context.layout import SequenceLayout
from parallel.context.module import ContextParallelAttention


def apply_context_parallel(attentions: Iterable[nn.Module], cp_mesh: DeviceMesh, mode: str, layout: str,
                           ulysses: int, kernel: str) -> SequenceLayout:
    """Swap each attention layer's `core_attention` for the context-parallel one and give the
    layer the global positions of this rank's tokens when the caller passes none.

    Each layer must have a `core_attention` module and take (x, positions) with x [B, T_local, ...]
    (positions are looked up from the layout here, so pipeline stages after the first, which
    receive only hidden states, still rotate by the right positions). Returns the layout the
    batch must be sharded with.
    """
    group = cp_mesh._unflatten(0, (cp_mesh.size() // ulysses, ulysses), HYBRID_MESH_DIMS) if mode == "hybrid" \
        else cp_mesh.get_group()
    core = ContextParallelAttention(mode, group, layout=layout, kernel=kernel)  # stateless: one for all layers
    for attention in attentions:
        attention.core_attention = core
        attention.register_forward_pre_hook(partial(_fill_positions, core.layout, cp_mesh.get_local_rank()))
    return core.layout


def _fill_positions(layout: SequenceLayout, cp_rank: int, _module, args):
    x, positions = args
    if positions is None:
        positions = layout.global_positions(x.shape[1] * layout.cp_size, cp_rank).to(x.device).unsqueeze(0)
    return x, positions


def gather_sequence(local: torch.Tensor, layout: SequenceLayout, group: dist.ProcessGroup) -> torch.Tensor:
    """The whole sequence [B, T, ...] of an output whose cp rank holds its part `local` [B, T_local, ...]
    (e.g. logits to sample from): the parts are gathered and put back in sequence order."""
    parts = [torch.empty_like(local) for _ in range(layout.cp_size)]
    dist.all_gather(parts, local.contiguous(), group=group)
    return layout.unshard(parts)
