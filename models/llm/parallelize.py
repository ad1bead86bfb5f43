"""How to shard the LLM, applied from outside the model in a fixed order:

    TP -> CP -> activation checkpointing -> compile -> FSDP / HSDP / DDP

Checkpointing wraps a block before compile so the compiled graph includes the recompute, and
FSDP goes last so it shards the parameters of the already wrapped (and compiled) blocks.
TP and CP land with their issues (#3, #5); ParallelDims rejects them until then.
"""
import torch
from torch import nn

from models.llm.model import LLMConfig
from models.spec import ParallelizeOptions
from parallel.activation_checkpoint import checkpoint_block
from parallel.data_parallel import apply_data_parallel
from parallel.mesh import Meshes, ParallelDims


def parallelize_llm(model: nn.Module, dims: ParallelDims, meshes: Meshes, options: ParallelizeOptions) -> nn.Module:
    for name, block in list(model.layers.items()):
        if options.activation_checkpoint != "none":
            block = checkpoint_block(block, options.activation_checkpoint)
        if options.compile:
            block = torch.compile(block)
        model.layers[name] = block
    return apply_data_parallel(model, model.layers.values(), dims, meshes, options)


def check_layout(cfg: LLMConfig, dims: ParallelDims) -> list[str]:
    problems = []
    if cfg.dim % cfg.n_heads:
        problems.append(f"model.dim={cfg.dim} is not divisible by model.n_heads={cfg.n_heads}")
    elif cfg.head_dim % 2:
        problems.append(f"head dim {cfg.head_dim} (dim / n_heads) must be even for rotary embeddings")
    if cfg.n_heads % cfg.kv_heads:
        problems.append(f"model.n_heads={cfg.n_heads} is not divisible by model.n_kv_heads={cfg.kv_heads}")
    if cfg.n_layers < dims.pp:
        problems.append(f"model.n_layers={cfg.n_layers} is fewer than the {dims.pp} pipeline stages")
    return problems
