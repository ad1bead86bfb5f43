"""The layer a parallelize function swaps in for a model's `core_attention` under context parallelism."""
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from parallel.context.hybrid import HYBRID_MESH_DIMS, hybrid_attention, hybrid_groups
from parallel.context.kernel_choice import KERNEL_NAMES
from parallel.context.layout import SequenceLayout
from parallel.context.ring import ring_attention
from parallel.context.ulysses import ulysses_attention

MODES = ("ring", "ulysses", "hybrid")


class ContextParallelAttention(nn.Module):
    """Drop-in for models.common.attention.CoreAttention: forward(q, k, v, document_ids=None) with q [B, T_local, Hq, D]
    and k, v [B, T_local, Hkv, D] returns [B, T_local, Hq, D], where T_local is this rank's share of
    the sequence in `self.layout` (shard the batch and the RoPE positions with it).

    mode "ring" or "ulysses" takes the cp ProcessGroup; "hybrid" a 2-D DeviceMesh with dims
    ("cp_ring", "cp_ulysses"). kernel: "auto" (cpu_flash on CPU, flash_attn on CUDA), "math",
    "cpu_flash" or "flash_attn".
    """

    def __init__(self, mode: str, group: dist.ProcessGroup | DeviceMesh, *, layout: str = "zigzag",
                 kernel: str = "auto", causal: bool = True, scale: float | None = None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown context-parallel mode {mode!r}; valid modes: {', '.join(MODES)}")
        if kernel not in KERNEL_NAMES:
            raise ValueError(f"unknown attention kernel {kernel!r}; valid kernels: {', '.join(KERNEL_NAMES)}")
        if (mode == "hybrid") != isinstance(group, DeviceMesh):
            want = f"a 2-D DeviceMesh with dims {HYBRID_MESH_DIMS}" if mode == "hybrid" else "a ProcessGroup"
            raise ValueError(f"context-parallel mode {mode!r} takes {want}, got {type(group).__name__}")
        if mode == "hybrid":
            ring_size, ulysses_size = (dist.get_world_size(g) for g in hybrid_groups(group))
        elif mode == "ring":
            ring_size, ulysses_size = dist.get_world_size(group), 1
        else:
            ring_size, ulysses_size = 1, dist.get_world_size(group)
        self.mode, self.group, self.kernel, self.causal, self.scale = mode, group, kernel, causal, scale
        self.layout = SequenceLayout(layout, ring_size, ulysses_size)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, document_ids: Tensor | None = None) -> Tensor:
        """document_ids [B, T_local]: this rank's share (in the layout) of the batch's document ids."""
        attention = {"ring": ring_attention, "ulysses": ulysses_attention, "hybrid": hybrid_attention}[self.mode]
        out, _ = attention(q, k, v, self.group, causal=self.causal, layout=self.layout.kind, kernel=self.kernel,
                           scale=self.scale, document_ids=document_ids)
        return out

    def extra_repr(self) -> str:
        return (f"mode={self.mode}, layout={self.layout.kind}, ring={self.layout.ring_size}, "
                f"ulysses={self.layout.ulysses_size}, kernel={self.kernel}, causal={self.causal}")
