"""Ulysses: an all-to-all turns sequence-sharded q, k, v into head-sharded ones over the whole
sequence (of this ring rank), attention runs on whole heads, a second all-to-all turns the output
back. The all-to-alls are autograd-aware functional collectives (the backward of one is the
inverse all-to-all), so only the attention in between needs a hand-written backward.

With a ring group as well this is the hybrid: the attention in between is ring attention over
the ring ranks, each of which holds (after the gather) its part of the layout in order.

Grouped-query kv heads (Hkv) that the Ulysses size U does not divide are repeated up to
lcm(Hkv, U) heads before the exchange, so every rank gets the kv heads its query heads read;
the repeat's backward sums the replicas' gradients.
"""
import math

import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor

from parallel.context.documents import check_document_ids
from parallel.context.ring import check_qkv_shapes, ring_attention


def _sequence_to_heads(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """[B, T/U, H, D] (rank u holds sequence part u) -> [B, T, H/U, D] (rank u holds head group u)."""
    size = dist.get_world_size(group)
    b, t, h, d = x.shape
    send = x.reshape(b, t, size, h // size, d).permute(2, 0, 1, 3, 4).contiguous()  # [to rank, B, t, h/U, D]
    received = funcol.all_to_all_single_autograd(send, None, None, group)  # [from rank, B, t, h/U, D]
    return received.permute(1, 0, 2, 3, 4).reshape(b, size * t, h // size, d)


def _heads_to_sequence(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """The inverse of _sequence_to_heads: [B, T, H/U, D] -> [B, T/U, H, D]."""
    size = dist.get_world_size(group)
    b, t, h, d = x.shape
    send = x.reshape(b, size, t // size, h, d).permute(1, 0, 2, 3, 4).contiguous()  # [to rank, B, T/U, h, D]
    received = funcol.all_to_all_single_autograd(send, None, None, group)  # [from rank, B, T/U, h, D]
    return received.permute(1, 2, 0, 3, 4).reshape(b, t // size, size * h, d)


def check_ulysses_heads(q_heads: int, ulysses_size: int) -> None:
    if q_heads % ulysses_size:
        raise ValueError(f"ulysses needs the query heads on this rank ({q_heads}) divisible by the ulysses size "
                         f"({ulysses_size}); use a ulysses size that divides {q_heads}, or the ring mode")


def _gather_sequence(document_ids: Tensor, group: dist.ProcessGroup) -> Tensor:
    """[B, T/U] ids of each Ulysses rank's tokens -> [B, T] of the whole part, in sequence order
    (rank u holds part u): what every rank sees after the all-to-all."""
    size = dist.get_world_size(group)
    gathered = document_ids.new_empty((size, *document_ids.shape))
    dist.all_gather_into_tensor(gathered.flatten(0, 1), document_ids.contiguous(), group=group)
    return gathered.permute(1, 0, 2).flatten(1)


def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup, *,
                      ring_group: dist.ProcessGroup | None = None, causal: bool = True, layout: str = "zigzag",
                      kernel: str = "auto", scale: float | None = None,
                      document_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Ulysses attention over `group` (and, with ring_group, ring attention across such groups).

    Same contract as ring_attention: q [B, T_local, Hq, D], k, v [B, T_local, Hkv, D] ->
    (out [B, T_local, Hq, D], lse [B, Hq, T_local]); `layout` is the ring's (see layout.py) and
    does not matter without a ring. document_ids [B, T_local] are all-gathered over the group (ints,
    1/(H D) of q's exchange) to match the gathered sequence.
    """
    check_qkv_shapes(q, k, v)
    size = dist.get_world_size(group)
    check_ulysses_heads(q.shape[2], size)
    replicas = math.lcm(k.shape[2], size) // k.shape[2]
    if replicas > 1:
        k, v = k.repeat_interleave(replicas, dim=2), v.repeat_interleave(replicas, dim=2)
    if document_ids is not None:
        check_document_ids(document_ids, q)
        document_ids = _gather_sequence(document_ids, group)
    q, k, v = (_sequence_to_heads(t, group) for t in (q, k, v))
    out, lse = ring_attention(q, k, v, ring_group, causal=causal, layout=layout, kernel=kernel, scale=scale,
                              document_ids=document_ids)
    # The lse goes back too (its exchange costs 1/D of the output's): callers merge or test with it.
    lse = _heads_to_sequence(lse.transpose(1, 2).unsqueeze(-1), group).squeeze(-1).transpose(1, 2)
    return _heads_to_sequence(out, group), lse
