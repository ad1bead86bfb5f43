"""How to shard the LLM, applied from outside the model in a fixed order:

    TP (+ sequence parallel) -> CP -> activation checkpointing -> compile -> FSDP / HSDP / DDP

TP first, because it turns parameters into DTensors over the tp mesh that FSDP then shards
again over dp (2-D). Checkpointing wraps a block before compile so the compiled graph includes
the recompute, and FSDP goes last so it shards the parameters of the already wrapped (and
compiled) blocks. CP swaps each layer's core attention for ring / Ulysses / hybrid attention
and fills in the global positions of the rank's tokens (parallel/context/apply.py).
Pipeline parallelism cuts the model into stages first (parallel/pipeline.py, with split_stage
below); each stage is then parallelized by parallelize_llm like a whole model.
"""
from torch import nn
from torch.distributed.tensor.parallel import parallelize_module

from models.common.mlp import SwiGLU
from models.llm.model import LLMConfig
from models.spec import ParallelizeOptions
from parallel.blocks import checkpoint_compile_and_shard
from parallel.context.apply import apply_context_parallel
from parallel.mesh import Meshes, ParallelDims
from parallel.tensor_parallel import (ReplicatedKVProjection, column_row_pair, enable_async_tp, norm_plan,
                                      vocab_parallel_embedding, vocab_parallel_head)


def parallelize_llm(model: nn.Module, dims: ParallelDims, meshes: Meshes, options: ParallelizeOptions) -> nn.Module:
    if dims.tp > 1:
        apply_tensor_parallel(model, meshes, options)
        if options.async_tp:
            enable_async_tp(meshes.tp)
    if dims.cp > 1:
        apply_context_parallel((block.attention for block in model.layers.values()), meshes.cp, options.cp_mode,
                               options.cp_layout, options.cp_ulysses, options.cp_kernel)
    return checkpoint_compile_and_shard(model, dims, meshes, options)


def apply_tensor_parallel(model: nn.Module, meshes: Meshes, options: ParallelizeOptions) -> None:
    """Heads and FFN units split over tp; embedding and head split over the vocabulary."""
    sp = options.sequence_parallel
    cfg: LLMConfig = model.cfg
    kv_styles = {}
    if cfg.kv_heads < meshes.tp.size():  # fewer kv heads than ranks: replicate them
        kv_styles = {name: ReplicatedKVProjection(cfg.kv_heads, cfg.head_dim) for name in ("wk", "wv")}
    parallelize_module(model, meshes.tp, {
        "tok_embeddings": vocab_parallel_embedding(sp),
        **norm_plan(["norm"], sp),
        "output": vocab_parallel_head(sp, options.loss_parallel),
    })
    for block in model.layers.values():
        # Other feed-forward kinds (MoE layers) are planned by their family's parallelize.
        dense_ffn = isinstance(block.feed_forward, SwiGLU)
        parallelize_module(block, meshes.tp, {
            **norm_plan(["attention_norm", "ffn_norm"], sp),
            **column_row_pair("attention", ["wq", "wk", "wv"], ["wo"], sp, n_extra_inputs=1,  # + positions
                              column_styles=kv_styles),
            **(column_row_pair("feed_forward", ["w1", "w3"], ["w2"], sp) if dense_ffn else {}),
        })


def split_stage(model: nn.Module, layer_ids: list[int], is_first: bool, is_last: bool) -> None:
    """Keep one pipeline stage: its layers (names unchanged), the embedding on the first stage,
    the final norm and head on the last."""
    if not is_first:
        model.tok_embeddings = None
    if not is_last:
        model.norm, model.output = None, None
    for name in list(model.layers):
        if int(name) not in layer_ids:
            del model.layers[name]


def check_layout(cfg: LLMConfig, dims: ParallelDims, options: ParallelizeOptions) -> list[str]:
    problems = []
    if cfg.dim % cfg.n_heads:
        problems.append(f"model.dim={cfg.dim} is not divisible by model.n_heads={cfg.n_heads}")
    elif cfg.head_dim % 2:
        problems.append(f"head dim {cfg.head_dim} (dim / n_heads) must be even for rotary embeddings")
    if cfg.n_heads % cfg.kv_heads:
        problems.append(f"model.n_heads={cfg.n_heads} is not divisible by model.n_kv_heads={cfg.kv_heads}")
    if dims.ep > 1 and not hasattr(cfg, "n_experts"):
        problems.append(f"parallel.ep={dims.ep} splits experts, but this model has none; set parallel.ep=1 "
                        f"(or use model.family=moe)")
    if dims.pp > 1 and cfg.tie_embeddings:
        problems.append("model.tie_embeddings=true shares a weight between the first and last pipeline stage; "
                        "untie them to use parallel.pp > 1")
    if dims.tp > 1:
        def kv_fits(t: int) -> bool:  # kv heads are split over tp, or replicated when there are fewer
            return cfg.kv_heads % t == 0 if cfg.kv_heads >= t else t % cfg.kv_heads == 0

        valid = [t for t in range(2, cfg.n_heads + 1) if cfg.n_heads % t == 0 and kv_fits(t)
                 and cfg.ffn_hidden_dim % t == 0 and cfg.vocab_size % t == 0]
        misfits = [f"{name} {size}" for name, size in (("n_heads", cfg.n_heads), ("ffn hidden size", cfg.ffn_hidden_dim),
                                                        ("vocab_size", cfg.vocab_size)) if size % dims.tp]
        if not kv_fits(dims.tp):
            misfits.append(f"n_kv_heads {cfg.kv_heads} (one of tp and n_kv_heads must divide the other)")
        if misfits:
            problems.append(f"parallel.tp={dims.tp} does not divide model {', '.join(misfits)}; "
                            f"tp values that work for this model: {valid or 'none above 1'}")
    return problems
