"""Expert parallelism: the experts of each MoE layer split over an `ep` group, tokens moved to
them and back by all-to-all with uneven splits.

The ep group is carved out of dp_shard x cp (parallel/mesh.py: that flattened dim is unflattened
into (efsdp, ep), ep inner): ranks of one ep group hold different tokens and different experts.
Expert weights are DTensors sharded on the expert dim over ep; FSDP then shards them over what
remains (efsdp), with its gradient divisor set to the whole data-parallel degree because each
rank's expert gradient already sums the contributions of all ep ranks' tokens.

One MoE layer, on each rank of an ep group of size P with E/P local experts:
  1. the rank's routed rows, sorted by global expert, are cut into P chunks (experts of rank 0,
     of rank 1, ...); the per-expert counts go first (all_to_all_single of E integers),
  2. rows go out with all_to_all_single_autograd (uneven splits) and come back grouped by source,
  3. they are re-sorted by local expert, run through the grouped experts, sorted back,
  4. and returned by the reverse all-to-all; the backward of each all-to-all is the reverse one.
"""
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor


def all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    """Autograd-aware uneven all-to-all of rows (the backward sends gradients the reverse way)."""
    out = all_to_all_single_autograd(x.contiguous(), output_splits, input_splits, group)
    return out.wait() if hasattr(out, "wait") else out


def dispatch_combine(routed: torch.Tensor, counts: torch.Tensor, experts: nn.Module, group) -> torch.Tensor:
    """routed [M, d] sorted by global expert with counts[e] rows each -> expert outputs in the same order."""
    ep = dist.get_world_size(group)
    n_local = counts.numel() // ep
    recv_counts = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts, counts.contiguous(), group=group)  # [source, local expert]
    send_splits = counts.view(ep, n_local).sum(1).tolist()
    recv = recv_counts.view(ep, n_local)
    recv_splits = recv.sum(1).tolist()
    received = all_to_all(routed, recv_splits, send_splits, group)
    # Rows arrive grouped by (source, local expert); the experts want them grouped by local expert.
    local_expert = torch.repeat_interleave(torch.arange(n_local, device=routed.device).repeat(ep), recv.flatten())
    order = torch.argsort(local_expert, stable=True)
    y = experts(received[order], recv.sum(0).tolist())
    back = torch.empty_like(y).index_copy(0, order, y)  # inverse permutation (autograd-aware)
    return all_to_all(back, send_splits, recv_splits, group)


def shard_experts(experts: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Turn the stacked expert weights into DTensors sharded on the expert dim over ep."""
    for name, param in list(experts.named_parameters(recurse=False)):
        local = distribute_tensor(param.data, ep_mesh, [Shard(0)], src_data_rank=None)  # no communication
        sharded = nn.Parameter(local, requires_grad=param.requires_grad)
        experts.register_parameter(name, sharded)
