"""How to shard the MoE decoder: the LLM's plan pieces plus experts.

- TP: attention and the dense layers' SwiGLU as in the LLM. MoE layers are not split over tp
  ("experts whole"): their input is gathered to the full replicated stream (with sequence
  parallelism: an all-gather over the sequence), every tp rank routes and computes the same
  tokens with plain (tp-replicated) router / expert weights, and the output goes back to the
  stream layout (a local slice under sequence parallelism). Gradients of MoE weights are then
  identical on all tp ranks and need no tp reduction; the price is tp-fold redundant expert work.
- EP (ParallelPlan.experts): each layer's routing statistics are summed over the batch group (dp x
  cp: the ranks holding other tokens of the step); with ep > 1 the stacked expert weights become
  DTensors sharded on the expert dim over the ep mesh and rows move to them by all-to-all
  (parallel/expert.py), and the experts become FSDP units of their own over expert_fsdp.
- PP: nothing here; each stage is a MoE model of its own layers, and every MoE layer attaches its
  aux losses to its output (models/moe/model.py), so no loss travels between stages.
"""
from torch import nn
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import PrepareModuleInputOutput, parallelize_module

from models.llm.parallelize import apply_context_parallel_attention, attention_plan, decoder_layers, swiglu_plan
from models.llm.parallelize import check_layout as llm_check_layout
from models.llm.parallelize import tensor_parallel
from models.moe.model import MoE, MoEConfig
from parallel.expert import ExpertParallel, SumOverGroup
from parallel.mesh import Meshes, ParallelDims
from parallel.options import ParallelizeOptions
from parallel.parallelize import ParallelPlan
from parallel.tensor_parallel import norm_plan, residual_layout


def block_plan(block: nn.Module, cfg: MoEConfig, tp: int, sequence_parallel: bool) -> dict:
    """The LLM's block plan, with an MoE feed-forward whole (see above): the stream gathered to
    Replicate in, back to its layout out."""
    stream = residual_layout(sequence_parallel)
    if isinstance(block.feed_forward, MoE):
        feed_forward = {"feed_forward": PrepareModuleInputOutput(
            input_layouts=(stream,), desired_input_layouts=(Replicate(),), use_local_input=True,
            output_layouts=(Replicate(),), desired_output_layouts=(stream,), use_local_output=True)}
    else:
        feed_forward = swiglu_plan(sequence_parallel)
    return {**norm_plan(["attention_norm", "ffn_norm"], sequence_parallel),
            **attention_plan(cfg, tp, sequence_parallel), **feed_forward}


def apply_experts(model: nn.Module, dims: ParallelDims, meshes: Meshes) -> list[nn.Module]:
    """Routing statistics over the batch group; with ep > 1 experts over ep. Returns the expert modules
    that need FSDP units of their own (ep > 1; with ep = 1 they are sharded with their block)."""
    moe_layers = [m for m in model.modules() if isinstance(m, MoE)]
    if meshes.batch.size() > 1:
        for moe in moe_layers:
            parallelize_module(moe.routing_statistics, meshes.batch, SumOverGroup())
    if dims.ep == 1:
        return []
    for moe in moe_layers:
        parallelize_module(moe.experts, meshes.ep, ExpertParallel())
    return [moe.experts for moe in moe_layers]


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
    if dims.ep > 1 and cfg.n_experts % dims.ep:
        problems.append(f"model.n_experts={cfg.n_experts} is not divisible by parallel.ep={dims.ep}; choose an ep "
                        f"that divides the number of experts")
    if not 0 <= cfg.n_dense_layers <= cfg.n_layers:
        problems.append(f"model.n_dense_layers={cfg.n_dense_layers} must be between 0 and n_layers={cfg.n_layers}")
    if cfg.capacity_factor < 0:
        problems.append(f"model.capacity_factor={cfg.capacity_factor} must be >= 0 (0: dropless)")
    return problems
