"""How to shard the LLM: the pieces of its ParallelPlan (parallel/parallelize.py applies them in
the one fixed order) and its pipeline split.

TP: heads and FFN units split over tp, embedding and head over the vocabulary, norms and the
residual stream on the sequence under sequence parallelism. CP swaps each layer's core attention
for ring / Ulysses / hybrid attention (parallel/context/apply.py). Other families whose blocks
are shaped like the LLM's reuse these pieces with their own block plans.
"""
import math
from collections.abc import Callable

from torch import nn
from torch.distributed.tensor.parallel import parallelize_module

from models.llm.model import LLMConfig
from parallel.context import sequence_layout
from parallel.context.apply import apply_context_parallel
from parallel.mesh import Meshes, ParallelDims
from parallel.options import ParallelizeOptions
from parallel.parallelize import Apply, ParallelPlan
from parallel.tensor_parallel import (ReplicatedKVProjection, column_row_pair, norm_plan, vocab_parallel_embedding,
                                      vocab_parallel_head)

# block_plan(block, model config, tp size, sequence_parallel) -> the TP plan of one block, relative to it
BlockPlan = Callable[[nn.Module, LLMConfig, int, bool], dict]


def attention_plan(cfg: LLMConfig, tp: int, sequence_parallel: bool) -> dict:
    """Softmax attention: q/k/v column-parallel by heads (kv heads replicated when fewer than tp), wo
    row-parallel."""
    kv_styles = {}
    if cfg.kv_heads < tp:  # fewer kv heads than ranks: replicate them
        kv_styles = {name: ReplicatedKVProjection(cfg.kv_heads, cfg.head_dim) for name in ("wk", "wv")}
    return column_row_pair("attention", ["wq", "wk", "wv"], ["wo"], sequence_parallel, n_extra_inputs=1,  # + positions
                           column_styles=kv_styles)


def swiglu_plan(sequence_parallel: bool) -> dict:
    return column_row_pair("feed_forward", ["w1", "w3"], ["w2"], sequence_parallel)


def block_plan(block: nn.Module, cfg: LLMConfig, tp: int, sequence_parallel: bool) -> dict:
    return {**norm_plan(["attention_norm", "ffn_norm"], sequence_parallel),
            **attention_plan(cfg, tp, sequence_parallel), **swiglu_plan(sequence_parallel)}


def tensor_parallel(plan_block: BlockPlan) -> Apply:
    """TP for a decoder shaped like the LLM (embedding, blocks, final norm, head) with `plan_block` per block."""
    def apply(model: nn.Module, meshes: Meshes, options: ParallelizeOptions) -> None:
        sp = options.sequence_parallel
        parallelize_module(model, meshes.tp, {
            "tok_embeddings": vocab_parallel_embedding(sp),
            **norm_plan(["norm"], sp),
            "output": vocab_parallel_head(sp, options.loss_parallel),
        })
        if model.cfg.tie_embeddings:  # both became DTensors sharded on the vocabulary (Shard(0)): share one again
            model.output.weight = model.tok_embeddings.weight
        for block in model.layers.values():
            parallelize_module(block, meshes.tp, plan_block(block, model.cfg, meshes.tp.size(), sp))
    return apply


apply_tensor_parallel = tensor_parallel(block_plan)


def apply_context_parallel_attention(model: nn.Module, meshes: Meshes, options: ParallelizeOptions) -> None:
    apply_context_parallel((block.attention for block in model.layers.values()), meshes.cp, options.cp_mode,
                           options.cp_layout, options.cp_ulysses, options.cp_kernel)


def decoder_layers(model: nn.Module) -> nn.ModuleDict:
    return model.layers


PLAN = ParallelPlan(blocks=decoder_layers, tensor_parallel=apply_tensor_parallel,
                    context_parallel=apply_context_parallel_attention)


def n_layers(cfg: LLMConfig) -> int:
    return cfg.n_layers


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


def decoder_layout_problems(cfg: LLMConfig, dims: ParallelDims, options: ParallelizeOptions) -> list[str]:
    """What every decoder with this embedding/head and softmax attention needs of a layout."""
    problems = []
    if dims.pp > 1 and cfg.tie_embeddings:
        problems.append("model.tie_embeddings=true shares a weight between the first and last pipeline stage; "
                        "untie them to use parallel.pp > 1")
    if dims.cp > 1 and options.cp_mode != "ring":
        ulysses = sequence_layout(options.cp_mode, options.cp_layout, dims.cp, options.cp_ulysses).ulysses_size
        heads = cfg.n_heads // dims.tp
        if heads % ulysses:
            problems.append(f"parallel.cp_mode={options.cp_mode} splits the {heads} attention heads of a tp rank "
                            f"over {ulysses} Ulysses ranks, which does not divide them; change cp, cp_ulysses or tp")
    return problems


def check_layout(cfg: LLMConfig, dims: ParallelDims, options: ParallelizeOptions) -> list[str]:
    problems = []
    if cfg.dim % cfg.n_heads:
        problems.append(f"model.dim={cfg.dim} is not divisible by model.n_heads={cfg.n_heads}")
    elif cfg.head_dim % 2:
        problems.append(f"head dim {cfg.head_dim} (dim / n_heads) must be even for rotary embeddings")
    if cfg.n_heads % cfg.kv_heads:
        problems.append(f"model.n_heads={cfg.n_heads} is not divisible by model.n_kv_heads={cfg.kv_heads}")
    problems += decoder_layout_problems(cfg, dims, options)
    if dims.tp > 1:
        def kv_misfit(t: int) -> str | None:  # kv heads are split over tp, or replicated when there are fewer
            fits = cfg.kv_heads % t == 0 if cfg.kv_heads >= t else t % cfg.kv_heads == 0
            return None if fits else f"n_kv_heads {cfg.kv_heads} (one of tp and n_kv_heads must divide the other)"

        problems += tp_problems(dims.tp, {"n_heads": cfg.n_heads, "ffn hidden size": math.gcd(*cfg.layer_ffn_dims()),
                                          "vocabulary": cfg.model_vocab_size}, cfg.n_heads, kv_misfit)
    return problems


def tp_problems(tp: int, sizes: dict[str, int], max_tp: int,
                other_misfit: Callable[[int], str | None] = lambda t: None) -> list[str]:
    """One line if `tp` does not divide every size (name -> size) or `other_misfit(tp)` names a misfit,
    with the tp values from 2 to max_tp that would fit."""
    def misfits(t: int) -> list[str]:
        found = [f"{name} {size}" for name, size in sizes.items() if size % t]
        return found + [other] if (other := other_misfit(t)) else found

    if not (found := misfits(tp)):
        return []
    valid = [t for t in range(2, max_tp + 1) if not misfits(t)]
    return [f"parallel.tp={tp} does not divide model {', '.join(found)}; "
            f"tp values that work for this model: {valid or 'none above 1'}"]
