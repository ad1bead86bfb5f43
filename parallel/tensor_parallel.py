"""Megatron-style tensor and sequence parallelism on DTensor, as reusable plan pieces.

Column-parallel linears split their output features over the tp ranks, row-parallel linears
their input features; a column -> row pair needs one collective at its end. With sequence
parallelism the activations between those pairs (norms, residual stream) are sharded on the
sequence dim instead of replicated: the row-parallel all-reduce becomes a reduce-scatter and an
all-gather moves to the entry of the next column-parallel pair. Same bytes, 1/tp of the
activation memory outside the pairs.
"""
import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel, SequenceParallel


def residual_layout(sequence_parallel: bool):
    """How the residual stream between blocks is laid out over the tp ranks."""
    return Shard(1) if sequence_parallel else Replicate()


def column_row_pair(entry: str, columns: list[str], rows: list[str], sequence_parallel: bool,
                    n_extra_inputs: int = 0) -> dict:
    """Plan for a sub-module `entry` whose `columns` are column-parallel and `rows` row-parallel.

    The entry's first input is the residual stream (gathered here under sequence parallelism);
    its other `n_extra_inputs` inputs (e.g. RoPE tables) are left as they are.
    """
    stream = residual_layout(sequence_parallel)
    extra = (None,) * n_extra_inputs
    plan = {entry: PrepareModuleInput(input_layouts=(stream, *extra), desired_input_layouts=(Replicate(), *extra))}
    plan.update({f"{entry}.{name}": ColwiseParallel() for name in columns})
    plan.update({f"{entry}.{name}": RowwiseParallel(output_layouts=stream) for name in rows})
    return plan


def norm_plan(names: list[str], sequence_parallel: bool) -> dict:
    """Norms run on sequence shards under sequence parallelism; otherwise on the replicated stream."""
    return {name: SequenceParallel() for name in names} if sequence_parallel else {}


def vocab_parallel_embedding(sequence_parallel: bool) -> RowwiseParallel:
    """Embedding rows (vocab) split over tp; the partial lookups are summed (or reduce-scattered)."""
    return RowwiseParallel(input_layouts=Replicate(), output_layouts=residual_layout(sequence_parallel))


def vocab_parallel_head(sequence_parallel: bool, loss_parallel: bool) -> ColwiseParallel:
    """Output head split over vocab. With loss parallelism the logits stay vocab-sharded DTensors
    and cross entropy runs under `torch.distributed.tensor.parallel.loss_parallel` without ever
    gathering the full logits; otherwise they are gathered."""
    return ColwiseParallel(input_layouts=residual_layout(sequence_parallel),
                           output_layouts=Shard(-1) if loss_parallel else Replicate(),
                           use_local_output=not loss_parallel)


def enable_async_tp(tp_mesh: DeviceMesh) -> None:
    """Let inductor split TP matmuls and overlap them with their collectives (symmetric memory).
    CUDA and torch.compile only; the trainer refuses it elsewhere."""
    from torch.distributed._symmetric_memory import enable_symm_mem_for_group

    torch._inductor.config._micro_pipeline_tp = True
    enable_symm_mem_for_group(tp_mesh.get_group().group_name)
