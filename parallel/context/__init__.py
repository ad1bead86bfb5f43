"""Context parallelism: attention over a sequence spread across ranks (ring / Ulysses / hybrid),
and the state-passing hook for mixers without softmax. See docs/context-parallel.md.

Tensors are [B, T, H, D] throughout (as models/common/attention.py); log-sum-exps [B, H, T].
"""
from parallel.context.hybrid import HYBRID_MESH_DIMS, hybrid_attention, hybrid_groups
from parallel.context.kernel_choice import KERNEL_NAMES, get_kernel
from parallel.context.kernels import BlockKernel, CpuFlashKernel, MathKernel, accumulation_dtype
from parallel.context.layout import LAYOUT_KINDS, SequenceLayout, sequence_layout
from parallel.context.merge import merge_partials
from parallel.context.mixer import StatePassingMixer, context_parallel_mix, incoming_state
from parallel.context.module import MODES, ContextParallelAttention
from parallel.context.ring import ring_attention
from parallel.context.ulysses import ulysses_attention

__all__ = [
    "BlockKernel", "ContextParallelAttention", "CpuFlashKernel", "HYBRID_MESH_DIMS", "KERNEL_NAMES", "LAYOUT_KINDS",
    "MODES", "MathKernel", "SequenceLayout", "StatePassingMixer", "accumulation_dtype", "context_parallel_mix",
    "get_kernel", "hybrid_attention", "sequence_layout", "hybrid_groups", "incoming_state", "merge_partials", "ring_attention",
    "ulysses_attention",
]
