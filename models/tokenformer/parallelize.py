"""How to shard TokenFormer: tensor parallelism over parameter tokens, and the LLM's other pieces.

TP (exists in no reference implementation): a Pattention's n parameter tokens are split over the tp
ranks, keys and values alike (ParameterTokenParallel). Each rank scores its n/tp tokens; Theta's
normalization needs the global norm over all n, so the sum of squares ([..., 1]) is all-reduced
before the GELU (DTensor inserts it: the scores are a DTensor sharded on the token axis, see
models/tokenformer/model.py); a rank-local norm would be wrong. The value mix is then a partial sum,
reduced into the layout the next op wants:
- FFN: all-reduce to the residual stream, or reduce-scatter on the sequence under sequence
  parallelism (the input all-gathered on the way in), as an MLP's row-parallel end.
- Q/K/V (`qkv_tensor_parallel: tokens`, the default): reduce-scatter on the feature axis, which
  leaves each rank its own heads for the token-to-token attention.
  `heads` instead replicates the key tokens and splits the value tokens by output features (heads):
  no forward communication, but every rank computes all n scores. benchmarks/tokenformer_tp.py
  measures both.
- Output projection: the attention's local heads are all-gathered ([..., d]), then split by tokens
  like the FFN (the alternative, keys split by input features, would all-reduce [..., n] scores).
CP replaces the token-to-token core attention (Pattention works per token); the pipeline split and
FSDP are the LLM's.
"""
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import PrepareModuleInput
from torch.distributed.tensor.parallel.style import ParallelStyle
from torch.distributed.tensor.placement_types import Placement

from models.llm.parallelize import (apply_context_parallel_attention, decoder_layers, decoder_layout_problems,
                                    tensor_parallel, tp_problems)
from models.tokenformer.model import NORMALIZATIONS, QKV_TENSOR_PARALLEL, TokenFormerConfig
from parallel.mesh import ParallelDims
from parallel.options import ParallelizeOptions
from parallel.parallelize import ParallelPlan
from parallel.tensor_parallel import norm_plan, residual_layout


class _PattentionStyle(ParallelStyle):
    """Distributes a Pattention's key and value tokens with the given placements; its input (a local
    tensor in `input_layout`, or a DTensor) is replicated on the way in, and its output
    redistributed to `output_layout` and handed on as a local tensor."""

    key_placement: Placement
    value_placement: Placement

    def __init__(self, input_layout: Placement, output_layout: Placement):
        super().__init__()
        self.input_layout, self.output_layout = input_layout, output_layout

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        placements = {"key_param_tokens": self.key_placement, "value_param_tokens": self.value_placement}

        def partition(_name, mod, mesh):
            for name, placement in placements.items():
                mod.register_parameter(name, nn.Parameter(distribute_tensor(getattr(mod, name), mesh, [placement])))

        def replicate_input(_module, inputs, mesh):
            x = inputs[0]
            if not isinstance(x, DTensor):
                x = DTensor.from_local(x, mesh, [self.input_layout], run_check=False)
            # Not even a no-op redistribute when already replicated: its backward would all-reduce
            # this Pattention's partial input gradient on its own, where wq, wk and wv share one
            # input whose summed gradient the attention's PrepareModuleInput reduces once.
            return x if x.placements == (Replicate(),) else x.redistribute(mesh, [Replicate()])

        def local_output(_module, output, mesh):
            return output.redistribute(mesh, [self.output_layout]).to_local()

        return distribute_module(module, device_mesh, partition, replicate_input, local_output)


class ParameterTokenParallel(_PattentionStyle):
    """Parameter tokens split over tp (keys and values on the token axis); the output is a partial sum."""
    key_placement = value_placement = Shard(0)


class HeadShardedValues(_PattentionStyle):
    """Key tokens replicated, value tokens split by output features (heads): outputs come out
    sharded on the feature axis without communication; every rank computes all the scores."""
    key_placement, value_placement = Replicate(), Shard(1)


def block_plan(block: nn.Module, cfg: TokenFormerConfig, tp: int, sequence_parallel: bool) -> dict:
    stream = residual_layout(sequence_parallel)
    local_heads = Shard(-1)
    qkv_style = ParameterTokenParallel if cfg.qkv_tensor_parallel == "tokens" else HeadShardedValues
    return {
        **norm_plan(["attention_norm", "ffn_norm"], sequence_parallel),
        # The attention's input gathered once for wq, wk and wv; positions pass as they are.
        "attention": PrepareModuleInput(input_layouts=(stream, None), desired_input_layouts=(Replicate(), None)),
        **{f"attention.{name}": qkv_style(Replicate(), local_heads) for name in ("wq", "wk", "wv")},
        "attention.wo": ParameterTokenParallel(local_heads, stream),
        "feed_forward": ParameterTokenParallel(stream, stream),
    }


PLAN = ParallelPlan(blocks=decoder_layers, tensor_parallel=tensor_parallel(block_plan),
                    context_parallel=apply_context_parallel_attention)


def check_layout(cfg: TokenFormerConfig, dims: ParallelDims, options: ParallelizeOptions) -> list[str]:
    problems = []
    if cfg.normalization not in NORMALIZATIONS:
        problems.append(f"model.normalization={cfg.normalization!r} is not one of {', '.join(NORMALIZATIONS)}")
    if cfg.qkv_tensor_parallel not in QKV_TENSOR_PARALLEL:
        problems.append(f"model.qkv_tensor_parallel={cfg.qkv_tensor_parallel!r} is not one of "
                        f"{', '.join(QKV_TENSOR_PARALLEL)}")
    for kind in ("qkv", "proj", "ffn"):
        if getattr(cfg, f"{kind}_tau") < 0:
            problems.append(f"model.{kind}_tau={getattr(cfg, f'{kind}_tau')} must be >= 0 (0: the square root of "
                            f"model.{kind}_tokens)")
    if cfg.dim % cfg.n_heads:
        problems.append(f"model.dim={cfg.dim} is not divisible by model.n_heads={cfg.n_heads}")
    if not 0 <= cfg.rotary_fraction <= 1:
        problems.append(f"model.rotary_fraction={cfg.rotary_fraction} must be between 0 and 1 (the fraction of each "
                        f"head's dims RoPE rotates)")
    elif cfg.dim % cfg.n_heads == 0 and cfg.rotary_dim % 2:
        problems.append(f"model.rotary_fraction={cfg.rotary_fraction} rotates {cfg.rotary_dim} of the {cfg.head_dim} "
                        f"dims of a head; it must be an even number")
    if dims.tp > 1:
        problems += tp_problems(dims.tp, {"n_heads": cfg.n_heads, "dim": cfg.dim, "vocab_size": cfg.vocab_size,
                                          "qkv_tokens": cfg.qkv_tokens, "proj_tokens": cfg.proj_tokens,
                                          "ffn_tokens": cfg.ffn_tokens}, cfg.n_heads)
    return problems + decoder_layout_problems(cfg, dims, options)
