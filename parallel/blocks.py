"""The last steps of every family's parallelize, in the fixed order: activation checkpointing
-> compile -> FSDP / HSDP / DDP (after TP and CP, which each family applies its own way)."""
import torch
from torch import nn

from models.spec import ParallelizeOptions
from parallel.activation_checkpoint import checkpoint_block
from parallel.data_parallel import apply_data_parallel
from parallel.mesh import Meshes, ParallelDims


def checkpoint_compile_and_shard(model: nn.Module, dims: ParallelDims, meshes: Meshes,
                                 options: ParallelizeOptions) -> nn.Module:
    """Wrap each of `model.layers` for checkpointing before compile (so the compiled graph holds the
    recompute), then shard, so FSDP sees the wrapped and compiled blocks."""
    for name, block in list(model.layers.items()):
        if options.activation_checkpoint != "none":
            block = checkpoint_block(block, options.activation_checkpoint)
        if options.compile:
            block = torch.compile(block)
        model.layers[name] = block
    return apply_data_parallel(model, model.layers.values(), dims, meshes, options)
