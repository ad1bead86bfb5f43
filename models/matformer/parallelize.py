"""How to shard a MatFormer: the LLM's plan, with its FFN units split round-robin over tp.

A contiguous (Megatron) split of the nested FFN would put the small granularities' prefixes all on the
first ranks, and the local-prefix slicing of nested_swiglu would compute wrong prefixes. Instead nested
unit j lives on tp rank j mod tp at local position j // tp: every rank's local prefix of length m/tp is
exactly its share of granularity m's units (reference notes, model-families.md section 4), so every
granularity runs on all ranks with no extra communication. The weights are stored in that order (w1/w3
rows, w2 columns) and recorded as permuted (parallel/init.py: record_order), so initialization, starting
weights and checkpoints stay in the canonical order of one device.
"""
from dataclasses import replace

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.experimental import local_map
from torch.distributed.tensor.parallel import PrepareModuleInput, PrepareModuleOutput
from torch.distributed.tensor.parallel.style import ParallelStyle

from models.llm.parallelize import PLAN as LLM_PLAN, attention_plan, check_layout as llm_check_layout, tensor_parallel
from models.matformer.model import MatFormerConfig, nested_swiglu
from parallel.init import record_order, to_stored
from parallel.mesh import ParallelDims
from parallel.options import ParallelizeOptions
from parallel.tensor_parallel import norm_plan, residual_layout

__all__ = ["PLAN", "check_layout"]


def round_robin(units: int, tp: int) -> torch.Tensor:
    """Stored position -> canonical unit: rank r's i-th unit (stored position r * units/tp + i) is unit r + tp*i."""
    return torch.arange(units).view(units // tp, tp).t().reshape(-1)


class RoundRobinNestedSwiGLU(ParallelStyle):
    """A NestedSwiGLU's hidden units split round-robin over tp: w1/w3 rows and w2 columns stored permuted
    and sharded Shard(0)/Shard(0)/Shard(1). Its input (the residual stream, gathered under sequence
    parallelism) is replicated, and its gradient a partial sum over the ranks' units; `compute` runs
    nested_swiglu on the local shards, whose output is a partial sum reduced into the residual stream's
    layout (all-reduce, or reduce-scatter on the sequence)."""

    def __init__(self, sequence_parallel: bool):
        super().__init__()
        self.stream = residual_layout(sequence_parallel)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        order = round_robin(module.hidden_dim, device_mesh.size())
        for linear, dim in ((module.w1, 0), (module.w3, 0), (module.w2, 1)):
            stored = distribute_tensor(to_stored(linear.weight.detach(), (dim, order)), device_mesh, [Shard(dim)])
            linear.register_parameter("weight", nn.Parameter(stored))
            record_order(linear, "weight", dim, order)
        weights = (Shard(0), Shard(0), Shard(1))
        module.compute = local_map(nested_swiglu, out_placements=[Partial()],
                                   in_placements=([Replicate()], *([w] for w in weights)),
                                   in_grad_placements=([Partial()], *([w] for w in weights)), device_mesh=device_mesh)
        # DTensors in and out of compute (its local map needs them); `runs` passes as a keyword, untouched.
        PrepareModuleInput(input_layouts=(self.stream,), desired_input_layouts=(Replicate(),),
                           use_local_output=False)._apply(module, device_mesh)
        return PrepareModuleOutput(output_layouts=(Partial(),), desired_output_layouts=(self.stream,)
                                   )._apply(module, device_mesh)


def block_plan(block: nn.Module, cfg: MatFormerConfig, tp: int, sequence_parallel: bool) -> dict:
    """The LLM's block plan with the round-robin FFN in place of its column -> row SwiGLU pair."""
    return {**norm_plan(["attention_norm", "ffn_norm"], sequence_parallel),
            **attention_plan(cfg, tp, sequence_parallel), "feed_forward": RoundRobinNestedSwiGLU(sequence_parallel)}


PLAN = replace(LLM_PLAN, tensor_parallel=tensor_parallel(block_plan))


def check_layout(cfg: MatFormerConfig, dims: ParallelDims, options: ParallelizeOptions) -> list[str]:
    problems = llm_check_layout(cfg, dims, options)
    hidden = cfg.ffn_hidden_dim
    for f in cfg.granularities:
        units = f * hidden
        if abs(units - round(units)) > 1e-9 or round(units) % dims.tp:
            problems.append(f"model.granularities: {f:g} of the FFN hidden size {hidden} is {units:g} units, which "
                            f"is not a whole multiple of parallel.tp={dims.tp} (each tp rank holds the same share of "
                            f"every granularity); pick fractions whose units tp divides, or change multiple_of")
    return problems
