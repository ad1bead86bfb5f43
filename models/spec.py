"""ModelSpec: everything the Trainer needs to know about a model family, and nothing more."""
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from parallel.mesh import Meshes, ParallelDims


@dataclass(frozen=True)
class ParallelizeOptions:
    """Training choices a parallelize function applies besides the mesh layout."""
    sequence_parallel: bool = True  # with tp: shard norms and the residual stream on the sequence
    loss_parallel: bool = True  # with tp: cross entropy on vocab-sharded logits (run it under loss_parallel())
    cp_mode: str = "ring"  # with cp > 1: ring | ulysses | hybrid (see parallel/context)
    cp_layout: str = "zigzag"
    cp_ulysses: int = 0  # hybrid: ranks per Ulysses group
    cp_kernel: str = "auto"
    activation_checkpoint: str = "none"  # none | full | selective
    compile: bool = False
    async_tp: bool = False  # CUDA + compile only: micro-pipelined TP collectives
    param_dtype: torch.dtype = torch.float32  # compute dtype of parameters under FSDP
    reduce_dtype: torch.dtype = torch.float32  # gradient reduction dtype


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config_cls: type
    model_cls: type[nn.Module]
    # parallelize(model, dims, meshes, options) shards the meta-device model in place and returns it.
    parallelize: Callable[[nn.Module, ParallelDims, Meshes, ParallelizeOptions], nn.Module]
    # flops_per_token(config, seq_len): exact training FLOPs per token, for MFU.
    flops_per_token: Callable[[Any, int], float]
    # check_layout(config, dims, options): problems (one line each) that make the layout and options
    # impossible for this model; run before any process group starts.
    check_layout: Callable[[Any, ParallelDims, ParallelizeOptions], list[str]]
    # split_stage(model, layer_ids, is_first, is_last): keep one pipeline stage's part, in place.
    split_stage: Callable[[nn.Module, list[int], bool, bool], None] | None = None
    state_dict_adapters: dict[str, Any] = field(default_factory=dict)
    data_kind: str = "text"
