"""Training choices a parallel plan applies besides the mesh layout."""
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ParallelizeOptions:
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

