"""How to shard the MoE decoder: the LLM's recipe plus experts.

    TP (attention, dense FFNs) -> EP (expert weights over ep) -> CP -> AC -> compile -> FSDP

- TP: attention and the dense layers' SwiGLU as in the LLM. MoE layers are not split over tp
  ("experts whole"): their input is gathered to the full replicated stream (with sequence
  parallelism: an all-gather over the sequence), every tp rank routes and computes the same
  tokens with plain (tp-replicated) router / expert weights, and the output goes back to the
  stream layout (a local slice under sequence parallelism). Gradients of MoE weights are then
  identical on all tp ranks and need no tp reduction; the price is tp-fold redundant expert work.
- EP: expert weights become DTensors sharded on the expert dim over the ep mesh; tokens move by
  all-to-all (parallel/expert.py). Each MoE layer learns its ep group and its batch group (dp x cp:
  where the routing statistics are all-reduced).
- PP: nothing here; each stage is a MoE model of its own layers, and every MoE layer attaches its
  aux losses to its output (models/moe/model.py), so no loss travels between stages.
- FSDP: expert weights get their own FSDP unit over expert_fsdp (dp_shard x cp / ep), with the
  gradient divisor set to the whole dp x cp degree (see parallel/expert.py); the rest as the LLM.
"""
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import PrepareModuleInput, PrepareModuleOutput, parallelize_module

from models.llm.parallelize import apply_tensor_parallel as llm_tensor_parallel
from models.llm.parallelize import check_layout as llm_check_layout
from models.moe.model import MoE, MoEConfig
from models.spec import ParallelizeOptions
from parallel.blocks import checkpoint_compile_and_shard
from parallel.context.apply import apply_context_parallel
from parallel.expert import shard_experts
from parallel.mesh import Meshes, ParallelDims
from parallel.tensor_parallel import residual_layout


def parallelize_moe(model: nn.Module, dims: ParallelDims, meshes: Meshes, options: ParallelizeOptions) -> nn.Module:
    moe_layers = [m for m in model.modules() if isinstance(m, MoE)]
    for moe in moe_layers:
        moe.batch_group = meshes.batch.get_group() if meshes.batch.size() > 1 else None
        if dims.ep > 1:
            moe.ep_group = meshes.ep.get_group()
            shard_experts(moe.experts, meshes.ep)
    if dims.tp > 1:
        apply_tensor_parallel(model, meshes, options)
    if dims.ep > 1:  # with ep = 1 the experts are sharded with their block like any weight
        mp_policy = MixedPrecisionPolicy(param_dtype=options.param_dtype, reduce_dtype=options.reduce_dtype)
        for moe in moe_layers:  # their own FSDP unit, before the block's (which then skips them)
            fully_shard(moe.experts, mesh=meshes.expert_fsdp, mp_policy=mp_policy)
            moe.experts.set_gradient_divide_factor(float(dims.dp * dims.cp))
    # The LLM's remaining steps, in its order.
    if dims.cp > 1:
        apply_context_parallel((block.attention for block in model.layers.values()), meshes.cp, options.cp_mode,
                               options.cp_layout, options.cp_ulysses, options.cp_kernel)
    return checkpoint_compile_and_shard(model, dims, meshes, options)


def apply_tensor_parallel(model: nn.Module, meshes: Meshes, options: ParallelizeOptions) -> None:
    """The LLM's TP plan for embedding, head, attention and dense FFNs (it leaves MoE layers alone);
    MoE layers whole (see above): the stream gathered to Replicate in, back to its layout out."""
    llm_tensor_parallel(model, meshes, options)
    stream = residual_layout(options.sequence_parallel)
    for block in model.layers.values():
        if isinstance(block.feed_forward, MoE):
            parallelize_module(block, meshes.tp, {
                "feed_forward": PrepareModuleInput(input_layouts=(stream,), desired_input_layouts=(Replicate(),),
                                                   use_local_output=True),
            })
            parallelize_module(block, meshes.tp, {
                "feed_forward": PrepareModuleOutput(output_layouts=(Replicate(),), desired_output_layouts=(stream,),
                                                    use_local_output=True),
            })


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
