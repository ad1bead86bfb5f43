"""Data parallelism: FSDP2 over dp_shard, HSDP over dp_replicate x dp_shard, DDP over dp_replicate."""
from typing import Iterable

from torch import nn
from torch.distributed._composable.replicate import replicate
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from parallel.mesh import Meshes, ParallelDims
from parallel.options import ParallelizeOptions


def uses_fsdp(dims: ParallelDims) -> bool:
    """FSDP shards over dp_shard x cp (context-parallel ranks hold the same weights). DDP only for
    plain replication: with TP, replication goes through FSDP2's HSDP (a shard dim of size 1),
    which handles DTensor parameters."""
    return dims.dp_shard * dims.cp > 1 or (dims.dp_replicate > 1 and dims.tp > 1)


def apply_data_parallel(model: nn.Module, blocks: Iterable[nn.Module], dims: ParallelDims, meshes: Meshes,
                        options: ParallelizeOptions, expert_units: Iterable[nn.Module] = ()) -> nn.Module:
    """Shard each block as its own FSDP unit (so one block's weights are gathered at a time), then
    the rest; or replicate with DDP (see uses_fsdp).

    Expert units (weights already sharded over ep) get FSDP units of their own over what is left of
    dp_shard x cp (meshes.expert_fsdp), before their blocks, which then skip them. Each rank's expert
    gradient already sums the contributions of all ep ranks' tokens, so the gradient divisor is the
    whole dp x cp degree, not the size of the expert FSDP mesh."""
    if uses_fsdp(dims):
        mp_policy = MixedPrecisionPolicy(param_dtype=options.param_dtype, reduce_dtype=options.reduce_dtype)
        for unit in expert_units:
            fully_shard(unit, mesh=meshes.expert_fsdp, mp_policy=mp_policy)
            unit.set_gradient_divide_factor(float(dims.dp * dims.cp))
        for block in blocks:
            fully_shard(block, mesh=meshes.fsdp, mp_policy=mp_policy)
        # The root keeps embedding, final norm and head; they are used last, so no reshard after forward.
        fully_shard(model, mesh=meshes.fsdp, mp_policy=mp_policy, reshard_after_forward=False)
    elif dims.dp_replicate > 1:
        replicate(model, device_mesh=meshes.world["dp_replicate"], bucket_cap_mb=100)
    return model
