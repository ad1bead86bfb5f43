"""Expert parallelism: the experts of each mixture-of-experts layer split over an `ep` group, tokens moved to
them and back by all-to-all with uneven splits, all applied from outside the model as
ParallelStyles (the model's expert module computes whatever experts and rows it is handed).

The ep group is carved out of dp_shard x cp (parallel/mesh.py: that flattened dim is unflattened
into (efsdp, ep), ep inner): ranks of one ep group hold different tokens and different experts.
Expert weights are DTensors sharded on the expert dim over ep; FSDP then shards them over what
remains (efsdp, parallel/data_parallel.py).

Expert tensor parallelism (tp > 1): each expert's hidden units are split over tp as well (the first
weights of an expert by output column, its last by input row, like a column -> row pair), so a
weight is sharded over the mesh (ep, tp) and a tp rank computes every routed row through its slice
of the hidden units: its output is a partial sum over tp, which the tensor-parallel plan around the
layer reduces (parallel/tensor_parallel.py, PartialSumRegion). The tp ranks of a tp group hold the
same tokens and send the same rows, each within its own ep group.

One expert module call, on each rank of an ep group of size P with E/P local experts
(`ExpertParallel`), for input rows sorted by global expert with counts[e] rows each:
  1. the per-expert counts go first (all_to_all_single of E integers), then the rows are cut into
     P chunks (experts of rank 0, of rank 1, ...) and sent with all_to_all_single_autograd (uneven
     splits); they come back grouped by source,
  2. they are re-sorted by local expert and run through the local experts (the module's forward),
  3. sorted back, and returned by the reverse all-to-all; the backward of each all-to-all is the
     reverse one.
"""
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel.style import ParallelStyle


def all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    """Autograd-aware uneven all-to-all of rows (the backward sends gradients the reverse way)."""
    out = all_to_all_single_autograd(x.contiguous(), output_splits, input_splits, group)
    return out.wait() if hasattr(out, "wait") else out


class ExpertParallel(ParallelStyle):
    """For a module forward(rows [M, d] sorted by expert, counts [E]) over stacked expert weights
    [E, ...], applied over a mesh of the dims "ep" and/or "tp" (Meshes.expert_split):
    - ep: weights sharded on the expert dim, rows dispatched to the rank of their expert before the
      forward and combined back after it;
    - tp: each weight sharded on its hidden dim, `hidden_dims[name]` (rows unchanged; the output
      becomes a partial sum over tp)."""

    def __init__(self, hidden_dims: dict[str, int] | None = None):
        super().__init__()
        self.hidden_dims = hidden_dims or {}

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        dims = device_mesh.mesh_dim_names
        if not set(dims) <= {"ep", "tp"} or ("tp" in dims and not self.hidden_dims):
            raise ValueError(f"experts split over mesh dims {dims}: expected ep and/or tp (tp needs hidden_dims)")

        def shard_weights(_name, mod, mesh):
            for name, param in list(mod.named_parameters(recurse=False)):
                placements = [Shard(0) if dim == "ep" else Shard(self.hidden_dims[name]) for dim in dims]
                local = distribute_tensor(param.data, mesh, placements, src_data_rank=None)  # no communication
                mod.register_parameter(name, nn.Parameter(local, requires_grad=param.requires_grad))

        if "ep" not in dims:
            return distribute_module(module, device_mesh, partition_fn=shard_weights)
        ep_mesh = device_mesh["ep"] if len(dims) > 1 else device_mesh
        group, ep = ep_mesh.get_group(), ep_mesh.size()
        routing = {}  # one call's splits and order, from dispatch to combine

        def dispatch(_mod, inputs, _mesh):
            rows, counts = inputs
            n_local = counts.numel() // ep
            recv_counts = torch.empty_like(counts)
            dist.all_to_all_single(recv_counts, counts.contiguous(), group=group)  # [source, local expert]
            recv = recv_counts.view(ep, n_local)
            routing["send"], routing["recv"] = counts.view(ep, n_local).sum(1).tolist(), recv.sum(1).tolist()
            received = all_to_all(rows, routing["recv"], routing["send"], group)
            # Rows arrive grouped by (source, local expert); the experts want them grouped by local expert.
            local_expert = torch.repeat_interleave(torch.arange(n_local, device=rows.device).repeat(ep), recv.flatten())
            routing["order"] = torch.argsort(local_expert, stable=True)
            return received[routing["order"]], recv.sum(0)

        def combine(_mod, y, _mesh):
            back = torch.empty_like(y).index_copy(0, routing["order"], y)  # inverse permutation (autograd-aware)
            return all_to_all(back, routing["send"], routing["recv"], group)

        return distribute_module(module, device_mesh, partition_fn=shard_weights, input_fn=dispatch,
                                 output_fn=combine)


class SumOverGroup(ParallelStyle):
    """A module whose output is a statistic of this rank's tokens (no gradient) becomes the sum of it
    over the mesh's ranks (e.g. expert routing loads over every rank holding other tokens of the step)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        group = device_mesh.get_group()

        def summed(_mod, output, _mesh):
            return funcol.all_reduce(output, "sum", group)

        return distribute_module(module, device_mesh, output_fn=summed)
