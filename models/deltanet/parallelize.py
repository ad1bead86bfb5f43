"""How to shard DeltaNet: the pieces of its ParallelPlan (applied in the one order of
parallel/parallelize.py), built from the LLM's.

TP by heads: q/k/v/beta/gate projections column-parallel, the short convs' channels sharded the
same way (a head's channels stay on its rank), the per-head output norm local (its one gain is
replicated, its gradient summed over tp), o_proj row-parallel. Softmax-attention layers of a hybrid
and everything outside the mixers take the LLM's plan.

CP by state passing (parallel/context/mixer.py): each DeltaNet layer's mixer rule (the delta rule,
or linear attention) becomes `StatePassingMixerRule` — the rank's chunk as the affine map
S -> M S + S_ext (fp32, fp64 for fp64; M = I for linear attention), all-gathered and folded in rank
order into the rank's initial state — and each short conv takes its (kernel - 1)-token halo from
the previous cp rank (parallel/context/halo.py). With document ids (each rank gets its chunk of
them, like the tokens) the maps are cut at document starts and the halo never reaches into another
document (parallel/context/mixer.py, ShortConvolution). That needs the
chunks in sequence order: the contiguous layout. A hybrid's attention layers then run ring
attention on the same contiguous layout (or Ulysses, whose ring of one is in order for any kind).
Pipeline parallelism reuses the LLM's split_stage.
"""
from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import SequenceParallel
from torch.distributed.tensor.parallel.style import ParallelStyle

from models.deltanet.model import DeltaNetConfig, DeltaNetLayer, MixerRule
from models.deltanet.ops import BACKENDS, LINEAR_BACKENDS, RULES, fla_problem, mixer_rule_state_map
from models.llm.parallelize import attention_plan, decoder_layers, swiglu_plan, tensor_parallel
from models.llm.parallelize import check_layout as llm_check_layout
from models.spec import RunContext
from parallel.context.apply import apply_context_parallel
from parallel.context.halo import previous_halo
from parallel.context.mixer import StatePassingMixer, context_parallel_mix
from parallel.mesh import Meshes, ParallelDims
from parallel.options import ParallelizeOptions
from parallel.parallelize import ParallelPlan
from parallel.tensor_parallel import column_row_pair, norm_plan

DELTA_COLUMNS = ["q_proj", "k_proj", "v_proj", "b_proj", "g_proj"]


class ChannelShardedConv(ParallelStyle):
    """A ShortConvolution after a column-parallel projection: its weight [C, K] sharded on the
    channels like the projection's output, so each rank convolves exactly its heads' channels."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def shard(_name, mod, mesh):
            for name, param in list(mod.named_parameters(recurse=False)):
                mod.register_parameter(name, nn.Parameter(distribute_tensor(param, mesh, [Shard(0)])))

        return distribute_module(module, device_mesh, partition_fn=shard)


def mixer_plan(layer: DeltaNetLayer, sequence_parallel: bool) -> dict:
    """The TP plan (relative to a block) of one DeltaNet layer."""
    columns = [name for name in DELTA_COLUMNS if getattr(layer, name) is not None]
    plan = column_row_pair("attention", columns, ["o_proj"], sequence_parallel, n_extra_inputs=1)
    plan.update({f"attention.{conv}": ChannelShardedConv() for conv in ("q_conv", "k_conv", "v_conv")
                 if getattr(layer, conv) is not None})
    # [B, T, H_local, D]: heads on dim 2, the gain replicated (its gradient summed over tp).
    plan["attention.o_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
    return plan


def block_plan(block: nn.Module, cfg: DeltaNetConfig, tp: int, sequence_parallel: bool) -> dict:
    """The LLM's block plan with a DeltaNet mixer in place of softmax attention (a hybrid's attention
    layers keep the LLM's)."""
    mixer = mixer_plan(block.attention, sequence_parallel) if isinstance(block.attention, DeltaNetLayer) \
        else attention_plan(cfg, tp, sequence_parallel)
    return {**norm_plan(["attention_norm", "ffn_norm"], sequence_parallel), **mixer, **swiglu_plan(sequence_parallel)}


apply_tensor_parallel = tensor_parallel(block_plan)


class StatePassingMixerRule(MixerRule, StatePassingMixer):
    """The mixer rule over a sequence spread contiguously over a cp group: this rank's chunk as
    (M, S_ext), the earlier ranks' maps folded into its initial state (context_parallel_mix)."""

    def __init__(self, group: dist.ProcessGroup, rule: str = "delta", backend: str = "auto", chunk_size: int = 64):
        super().__init__(rule, backend, chunk_size)
        self.group = group

    def chunk_map(self, q, k, v, beta, document_ids=None):
        return mixer_rule_state_map(self.rule, k, v, beta, chunk_size=self.chunk_size, document_ids=document_ids)

    def mix(self, initial_state, q, k, v, beta, document_ids=None):
        return super().forward(q, k, v, beta, initial_state, document_ids)

    def forward(self, q, k, v, beta, initial_state=None, document_ids=None):
        return context_parallel_mix(self, self.group, q, k, v, beta, document_ids=document_ids)


def contiguous_problem(options: ParallelizeOptions, cp: int) -> str | None:
    """Why DeltaNet's state passing cannot run on the configured cp layout, or None."""
    ring = cp // (cp if options.cp_mode == "ulysses" else options.cp_ulysses if options.cp_mode == "hybrid" else 1)
    if options.cp_layout == "zigzag" and ring > 1:
        return ("DeltaNet passes its recurrent state from cp rank to cp rank in sequence order, which needs "
                "parallel.cp_layout=contiguous (zigzag puts two distant chunks on one rank); set "
                "parallel.cp_layout=contiguous (attention layers of a hybrid run their ring on it too)")
    return None


def apply_context_parallel_deltanet(model: nn.Module, meshes: Meshes, options: ParallelizeOptions) -> None:
    cp_mesh = meshes.cp
    if problem := contiguous_problem(options, cp_mesh.size()):  # check_layout refuses it before a run
        raise ValueError(problem)
    attentions, group = [], cp_mesh.get_group()
    for block in model.layers.values():
        layer = block.attention
        if not isinstance(layer, DeltaNetLayer):
            attentions.append(layer)
            continue
        core = layer.core_mixer
        layer.core_mixer = StatePassingMixerRule(group, core.rule, core.backend, core.chunk_size)
        for conv in (layer.q_conv, layer.k_conv, layer.v_conv):
            if conv is not None:
                conv.halo = partial(previous_halo, n=conv.kernel_size - 1, group=group)
    if attentions:
        apply_context_parallel(attentions, cp_mesh, options.cp_mode, options.cp_layout, options.cp_ulysses,
                               options.cp_kernel)


PLAN = ParallelPlan(blocks=decoder_layers, tensor_parallel=apply_tensor_parallel,
                    context_parallel=apply_context_parallel_deltanet)


def check_layout(cfg: DeltaNetConfig, dims: ParallelDims, options: ParallelizeOptions) -> list[str]:
    problems = llm_check_layout(cfg, dims, options)
    if dims.cp > 1 and (problem := contiguous_problem(options, dims.cp)):
        problems.append(problem)
    bad = [i for i in cfg.attention_layers if not 0 <= i < cfg.n_layers]
    if bad:
        problems.append(f"model.attention_layers {bad} are not layer indices 0..{cfg.n_layers - 1}")
    if cfg.mixer_rule not in RULES:
        problems.append(f"model.mixer_rule='{cfg.mixer_rule}' is not one of {', '.join(RULES)}")
    backends = LINEAR_BACKENDS if cfg.mixer_rule == "linear" else BACKENDS
    if cfg.backend not in backends:
        problems.append(f"model.backend='{cfg.backend}' is not one of {', '.join(backends)}"
                        + (" (mixer_rule=linear)" if cfg.mixer_rule == "linear" else ""))
    if cfg.mixer_rule == "linear" and cfg.allow_neg_eigval:
        problems.append("model.allow_neg_eigval scales beta, which mixer_rule=linear does not have; "
                        "set it to false or use mixer_rule=delta")
    if cfg.chunk_size < 1:
        problems.append(f"model.chunk_size={cfg.chunk_size} must be >= 1")
    return problems


def check_run(cfg: DeltaNetConfig, run: RunContext) -> list[str]:
    """model.backend=fla where fla's kernels cannot run: with packed documents (its varlen path is not wired), off
    CUDA, without the `fla` package on the node, in fp32. Otherwise the first forward would fail, mid-run."""
    if cfg.backend != "fla" or cfg.mixer_rule != "delta":  # check_layout refuses fla with the linear rule
        return []
    instead = "set model.backend=chunked (or auto: fla where it runs, else chunked)"
    if run.document_mask:
        return [f"model.backend=fla takes no document ids (fla's varlen path is not wired) and data.document_mask=true "
                f"packs documents; {instead}, or data.document_mask=false"]
    if run.device is None:  # a preflight: the workers' nodes decide the rest
        return []
    problem = fla_problem(run.device, run.compute_dtype)
    if problem is None:
        return []
    if fla_problem(run.device, torch.bfloat16) is None:  # the dtype alone: train.mixed_precision=fp32 on CUDA
        instead = "set train.mixed_precision=bf16 (or auto), or model.backend=chunked"
    return [f"model.backend=fla: {problem}; {instead}"]
