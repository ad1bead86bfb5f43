"""How to shard SOLO: the LLM's plan plus the patch projection.

TP: the patch projection is column-parallel (its output features split over tp, weight Shard(0)) on the
replicated patches, its output gathered (Replicate) or, under sequence parallelism, scattered onto the
sequence (Shard(1)): the layout the vocab-parallel token embedding returns, so the two add shard by shard.
Reference: Megatron's ColumnParallelLinear(gather_output=True) then scatter_to_sequence_parallel_region.
PP: the projection lives with the embedding on the first stage, and `patches` (a BatchKey consumed as an
input) only goes there. CP: `patches` is cut on the sequence like the tokens, so each rank projects only
its own tokens' patches. FSDP shards the projection with the other parameters outside the blocks.
"""
from dataclasses import replace

from torch import nn
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

from models.llm.parallelize import PLAN as LLM_PLAN, apply_tensor_parallel as llm_tensor_parallel
from models.llm.parallelize import check_layout, n_layers, split_stage as llm_split_stage
from parallel.mesh import Meshes
from parallel.options import ParallelizeOptions
from parallel.tensor_parallel import residual_layout

__all__ = ["PLAN", "check_layout", "n_layers", "split_stage"]


def patch_projection_plan(sequence_parallel: bool) -> ColwiseParallel:
    return ColwiseParallel(input_layouts=Replicate(), output_layouts=residual_layout(sequence_parallel))


def apply_tensor_parallel(model: nn.Module, meshes: Meshes, options: ParallelizeOptions) -> None:
    llm_tensor_parallel(model, meshes, options)
    if model.patch_embeddings is not None:  # the first pipeline stage
        parallelize_module(model.patch_embeddings, meshes.tp, patch_projection_plan(options.sequence_parallel))


PLAN = replace(LLM_PLAN, tensor_parallel=apply_tensor_parallel)


def split_stage(model: nn.Module, layer_ids: list[int], is_first: bool, is_last: bool) -> None:
    """The LLM's split; the patch projection stays with the embedding on the first stage."""
    llm_split_stage(model, layer_ids, is_first, is_last)
    if not is_first:
        model.patch_embeddings = None
