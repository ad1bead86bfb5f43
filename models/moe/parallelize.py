"""How to shard the MoE decoder: the LLM's plan pieces plus experts.

- TP: attention and the dense layers' SwiGLU as in the LLM. MoE layers use expert tensor
  parallelism (ETP): every routed expert's hidden units are split over tp (w1, w3 [E, d, h] on h,
  w2 [E, h, d] on h) and the shared experts are split like a dense SwiGLU, so each tp rank holds
  1/tp of the layer's expert weights and computes 1/tp of its expert work. The layer is one
  PartialSumRegion (parallel/tensor_parallel.py): its input is gathered to the full tokens (an
  all-gather under sequence parallelism), every tp rank routes all of them with the replicated
  router and runs them through its slice of each chosen expert, and the partial outputs are summed
  back into the stream (a reduce-scatter under SP; the backward is the same pair reversed). The
  router is replicated (ReplicatedInRegion): identical routing and router gradients on every tp
  rank; only its route weights' gradient (k numbers per token) is summed over tp, because they
  scale the partial expert outputs. The aux / z losses are attached identically on every tp rank
  and flow only into the router, so they count once.
- EP (ParallelPlan.experts): each layer's routing statistics are summed over the batch group (dp x
  cp: the ranks holding other tokens of the step); with ep > 1 the stacked expert weights become
  DTensors sharded on the expert dim over the ep mesh (and on the hidden dim over tp: a (ep, tp)
  mesh) and rows move to them by all-to-all (parallel/expert.py), and the experts become FSDP units
  of their own over expert_fsdp.
- PP: nothing here; each stage is a MoE model of its own layers, and every MoE layer attaches its
  aux losses to its output (models/moe/model.py), so no loss travels between stages.
"""
from torch import nn
from torch.distributed.tensor.parallel import parallelize_module

from models.llm.parallelize import apply_context_parallel_attention, attention_plan, decoder_layers, swiglu_plan
from models.llm.parallelize import check_layout as llm_check_layout
from models.llm.parallelize import tensor_parallel
from models.moe.model import MoE, MoEConfig
from parallel.data_parallel import uses_fsdp
from parallel.expert import ExpertParallel, SumOverGroup
from parallel.mesh import Meshes, ParallelDims
from parallel.options import ParallelizeOptions
from parallel.parallelize import ParallelPlan
from parallel.tensor_parallel import (PartialSumRegion, ReplicatedInRegion, column_row_pair_in_region, norm_plan,
                                      residual_layout)

# The dim of each stacked routed-expert weight that holds the expert's hidden units (split over tp).
EXPERT_HIDDEN_DIMS = {"w1": 2, "w3": 2, "w2": 1}
ROUTE_WEIGHTS = 0  # Router.forward's output of the weights that scale the expert outputs


def moe_plan(moe: MoE, sequence_parallel: bool) -> dict:
    """TP plan of one MoE layer, relative to it: one partial-sum region with a replicated router and
    the shared experts split like a dense SwiGLU (see above); apply_experts splits the routed experts."""
    plan = {"": PartialSumRegion(residual_layout(sequence_parallel)),
            "router": ReplicatedInRegion(partial_grad_outputs=(ROUTE_WEIGHTS,))}
    if moe.shared is not None:
        plan.update(column_row_pair_in_region("shared", ["w1", "w3"], ["w2"]))
    return plan


def block_plan(block: nn.Module, cfg: MoEConfig, tp: int, sequence_parallel: bool) -> dict:
    """The LLM's block plan, with an MoE feed-forward planned by moe_plan."""
    if isinstance(block.feed_forward, MoE):
        feed_forward = {f"feed_forward.{name}" if name else "feed_forward": style
                        for name, style in moe_plan(block.feed_forward, sequence_parallel).items()}
    else:
        feed_forward = swiglu_plan(sequence_parallel)
    return {**norm_plan(["attention_norm", "ffn_norm"], sequence_parallel),
            **attention_plan(cfg, tp, sequence_parallel), **feed_forward}


def apply_experts(model: nn.Module, dims: ParallelDims, meshes: Meshes) -> list[nn.Module]:
    """Routing statistics over the batch group; routed experts split over ep and tp (meshes.expert_split).
    Returns the expert modules that need FSDP units of their own (ep > 1; otherwise they are sharded
    with their block)."""
    moe_layers = [m for m in model.modules() if isinstance(m, MoE)]
    if meshes.batch.size() > 1:
        for moe in moe_layers:
            parallelize_module(moe.routing_statistics, meshes.batch, SumOverGroup())
    if meshes.expert_split is not None:
        for moe in moe_layers:
            parallelize_module(moe.experts, meshes.expert_split, ExpertParallel(EXPERT_HIDDEN_DIMS))
    return [moe.experts for moe in moe_layers] if dims.ep > 1 else []


PLAN = ParallelPlan(blocks=decoder_layers, tensor_parallel=tensor_parallel(block_plan),
                    context_parallel=apply_context_parallel_attention, experts=apply_experts)


def check_layout(cfg: MoEConfig, dims: ParallelDims, options: ParallelizeOptions) -> list[str]:
    problems = llm_check_layout(cfg, dims, options)
    if cfg.router not in ("softmax", "sigmoid"):
        problems.append(f"model.router='{cfg.router}' is not one of softmax, sigmoid")
    if cfg.n_experts < 1:
        problems.append(f"model.n_experts={cfg.n_experts} must be >= 1")
    elif cfg.top_k < 1 or cfg.top_k > cfg.n_experts:
        problems.append(f"model.top_k={cfg.top_k} must be between 1 and model.n_experts={cfg.n_experts}")
    elif cfg.n_groups > 1:
        if cfg.n_experts % cfg.n_groups:
            problems.append(f"model.n_experts={cfg.n_experts} is not divisible by model.n_groups={cfg.n_groups}")
        elif not 1 <= cfg.topk_groups <= cfg.n_groups or cfg.top_k > cfg.topk_groups * cfg.n_experts // cfg.n_groups:
            problems.append(f"model.topk_groups={cfg.topk_groups} must be in 1..n_groups={cfg.n_groups} and leave at "
                            f"least top_k={cfg.top_k} eligible experts")
        elif cfg.router == "sigmoid" and cfg.n_experts // cfg.n_groups < 2:
            problems.append("model.n_groups: sigmoid group scores sum the top-2 experts of a group; use >= 2 per group")
    if dims.ep > 1 and options.activation_checkpoint == "selective" and uses_fsdp(dims):
        # The experts' FSDP units sit inside the checkpointed blocks, and FSDP's hooks run a different number of
        # profiler record_function ops in the recompute, which torch 2.13's selective checkpointing replays by count
        # (pytorch/torchtitan#3427): the first backward fails.
        problems.append(f"parallel.ep={dims.ep} with train.activation_checkpoint=selective fails under FSDP in torch "
                        f"2.13 (selective checkpointing replays the FSDP hooks of the experts' own units by count: "
                        f"pytorch/torchtitan#3427); use activation_checkpoint=full or none")
    if dims.tp > 1 and cfg.expert_hidden_dim % dims.tp:
        problems.append(f"parallel.tp={dims.tp} does not divide the expert hidden size {cfg.expert_hidden_dim} "
                        f"(model.moe_hidden_dim, or the ffn hidden size when 0), which expert tensor parallelism "
                        f"splits over tp; choose a tp that divides it")
    if dims.ep > 1 and cfg.n_experts % dims.ep:
        problems.append(f"model.n_experts={cfg.n_experts} is not divisible by parallel.ep={dims.ep}; choose an ep "
                        f"that divides the number of experts")
    if not 0 <= cfg.n_dense_layers <= cfg.n_layers:
        problems.append(f"model.n_dense_layers={cfg.n_dense_layers} must be between 0 and n_layers={cfg.n_layers}")
    if cfg.capacity_factor < 0:
        problems.append(f"model.capacity_factor={cfg.capacity_factor} must be >= 0 (0: dropless)")
    return problems
