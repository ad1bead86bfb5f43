"""One order for sharding every model family, from the pieces a family declares (`ParallelPlan`):

    TP (+ sequence parallel, async TP) -> CP -> EP -> activation checkpointing -> compile -> FSDP

TP first: it turns parameters into DTensors over the tp mesh that FSDP then shards again over dp
(2-D). CP and EP swap in their attention / token-dispatch pieces next. Checkpointing wraps a
block before compile so the compiled graph holds the recompute, and FSDP goes last so it shards
the parameters of the already wrapped (and compiled) blocks. Pipeline parallelism cuts the model
into stages before any of this (parallel/pipeline.py); each stage is then parallelized like a
whole model.
"""
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from parallel.activation_checkpoint import checkpoint_block
from parallel.data_parallel import apply_data_parallel
from parallel.mesh import Meshes, ParallelDims
from parallel.options import ParallelizeOptions
from parallel.tensor_parallel import enable_async_tp

Apply = Callable[[nn.Module, Meshes, ParallelizeOptions], None]


@dataclass(frozen=True)
class ParallelPlan:
    """What only the family knows about sharding its model; `parallelize` applies it in one order.
    A piece left None means the family does not support that dimension (the config check says so)."""
    # The repeated blocks, by name: the units of activation checkpointing, compile and FSDP.
    blocks: Callable[[nn.Module], nn.ModuleDict]
    tensor_parallel: Apply | None = None  # plan TP/SP over meshes.tp
    context_parallel: Apply | None = None  # swap sequence mixers for their cp versions over meshes.cp
    # Expert parallelism and batch-wide statistics; returns the modules (e.g. stacked expert weights)
    # that FSDP shards as units of their own over meshes.expert_fsdp, averaging gradients over dp x cp.
    experts: Callable[[nn.Module, ParallelDims, Meshes], list[nn.Module]] | None = None


def parallelize(model: nn.Module, plan: ParallelPlan, dims: ParallelDims, meshes: Meshes,
                options: ParallelizeOptions) -> nn.Module:
    """Shard the meta-device `model` in place (and return it, possibly wrapped)."""
    if dims.tp > 1:
        plan.tensor_parallel(model, meshes, options)
        if options.async_tp:
            enable_async_tp(meshes.tp)
    if dims.cp > 1:
        plan.context_parallel(model, meshes, options)
    expert_units = plan.experts(model, dims, meshes) if plan.experts is not None else []
    blocks = plan.blocks(model)
    for name, block in list(blocks.items()):
        if options.activation_checkpoint != "none":
            block = checkpoint_block(block, options.activation_checkpoint)
        if options.compile:
            block = torch.compile(block)
        blocks[name] = block
    return apply_data_parallel(model, blocks.values(), dims, meshes, options, expert_units)


def missing_pieces(plan: ParallelPlan, dims: ParallelDims) -> list[str]:
    """Layout problems of a family whose plan lacks a dimension the layout uses (one line each)."""
    problems = []
    for dim, piece in (("tp", plan.tensor_parallel), ("cp", plan.context_parallel)):
        if getattr(dims, dim) > 1 and piece is None:
            problems.append(f"parallel.{dim}={getattr(dims, dim)}: this model family has no {dim} plan; set "
                            f"parallel.{dim}=1")
    if dims.ep > 1 and plan.experts is None:
        problems.append(f"parallel.ep={dims.ep} splits experts, but this model has none; set parallel.ep=1")
    return problems
