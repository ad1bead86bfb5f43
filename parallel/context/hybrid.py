"""Hybrid context parallelism on a 2-D cp mesh ("cp_ring", "cp_ulysses"): Ulysses inside each row
of the mesh (put it on fast links: contiguous ranks, one node), ring attention across the rows."""
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh

from parallel.context.ulysses import ulysses_attention

HYBRID_MESH_DIMS = ("cp_ring", "cp_ulysses")


def hybrid_groups(mesh: DeviceMesh) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """(ring group, ulysses group) of this rank in a 2-D mesh with dims ("cp_ring", "cp_ulysses")."""
    if mesh.ndim != 2 or tuple(mesh.mesh_dim_names or ()) != HYBRID_MESH_DIMS:
        raise ValueError(f"hybrid context parallelism needs a 2-D DeviceMesh with dims {HYBRID_MESH_DIMS}, got "
                         f"dims {mesh.mesh_dim_names} of shape {tuple(mesh.shape)}; build it with init_device_mesh("
                         f"device, (ring, ulysses), mesh_dim_names={HYBRID_MESH_DIMS})")
    return mesh.get_group("cp_ring"), mesh.get_group("cp_ulysses")


def hybrid_attention(q: Tensor, k: Tensor, v: Tensor, mesh: DeviceMesh, *, causal: bool = True,
                     layout: str = "zigzag", kernel: str = "auto", scale: float | None = None,
                     document_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Same contract as ring_attention, over the cp mesh; the sequence follows
    SequenceLayout(layout, ring_size=mesh["cp_ring"].size(), ulysses_size=mesh["cp_ulysses"].size())."""
    ring_group, ulysses_group = hybrid_groups(mesh)
    return ulysses_attention(q, k, v, ulysses_group, ring_group=ring_group, causal=causal, layout=layout,
                             kernel=kernel, scale=scale, document_ids=document_ids)
