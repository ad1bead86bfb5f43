"""ModelSpec: everything a training run needs to know about a model family, typed.

The trainer only ever talks to a ModelSpec: how the family's batches look and travel (DataSpec),
what it is trained on (LossSpec), how it is sharded (ParallelPlan, pipeline split, layout
checks), its exact FLOPs, its hooks into the training step, its checkpoint adapters and its own
checkpoint commands. Adding a family adds a spec; launcher/ and parallel/ never name one.
"""
import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import nn

from data.prepare import FORMAT as TEXT_FORMAT
from parallel.mesh import ParallelDims
from parallel.options import ParallelizeOptions
from parallel.parallelize import ParallelPlan


@dataclass(frozen=True)
class BatchKey:
    """How one entry of a batch dict travels. Every entry has the rows of the micro-batch on dim 0."""
    # The dim that context parallelism cuts (the sequence), or None for an entry per row.
    sequence_dim: int | None
    # inputs: positional model inputs, in declaration order, needed by the first pipeline stage only;
    # every_stage: keyword model inputs that every pipeline stage takes (e.g. positions);
    # loss: read only by the loss, on the last stage.
    consumer: Literal["inputs", "every_stage", "loss"]


@dataclass(frozen=True)
class DataSpec:
    """The data a family eats."""
    keys: dict[str, BatchKey]
    # build_loaders(data_cfg, seq_len, global_batch_size, micro_batch_size, dp_rank, dp_size, seed, log)
    #   -> (data, train_loader, valid_loader): `data.tokenizer` encodes and decodes text; a loader serves
    #   `micro_batches(step) -> list[dict]` (keys as above), has a `step` counter and is Stateful; the valid
    #   loader's `distinct_samples(limit)` says how many of its first `limit` rows (steps 0, 1, ... in order) hold
    #   a sample no earlier row holds (the trainer evaluates on whole global batches of those). GlobalBatchLoader
    #   (data/loader.py) and LoaderWrapper have all of it.
    build_loaders: Callable[..., tuple]
    # The model inputs for greedy sampling from token ids [1, T] (keys of `keys` minus the loss's); the
    # model's output must then be logits [1, T, vocab]. None: the family does not sample.
    prompt_batch: Callable[[torch.Tensor], dict[str, torch.Tensor]] | None = None
    # The (query, key) pairs a micro-batch's causal attention computes per layer and head (whole rows,
    # before any cp split), for FLOPs; None: T (T + 1) / 2 per row.
    attention_pairs: Callable[[dict[str, torch.Tensor]], int] | None = None
    # final_evaluation(data, greedy_tokens) -> named metrics of the trained model, measured once at the end of a
    # run (logged to metrics.jsonl and shown in the summary; e.g. SOLO's caption accuracy). greedy_tokens(batch)
    # runs the model, on every rank, on a batch of whole rows (model inputs as in `keys`, rows of the training
    # length) and returns the argmax token ids [rows, T] of its logits, on every rank. None: none.
    final_evaluation: Callable[[Any, Callable[[dict[str, torch.Tensor]], torch.Tensor]], dict[str, float]] | None = None
    # The kind of `shardwright prepare` output data.prepared must name (its manifest's format): checked with the
    # config, before any process starts.
    prepared_format: str = TEXT_FORMAT


@dataclass(frozen=True)
class LossTerms:
    loss_sum: torch.Tensor  # the loss summed over the micro-batch's terms (not yet normalized)
    metrics: dict[str, torch.Tensor]  # further sums in the same units, one per LossSpec.metrics name


@dataclass(frozen=True)
class LossSpec:
    """What a family is trained on. The trainer divides every sum by the *global* count of terms of
    the step (over micro-batches, dp and cp ranks), so losses do not depend on the layout."""
    compute: Callable[[Any, dict[str, torch.Tensor]], LossTerms]  # (model outputs, batch) -> sums
    # The number of terms a batch's loss sums over, known before the forward: pipeline schedules run
    # the backward inside their step, so the normalization must be known before any forward.
    count: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    metrics: tuple[str, ...] = ()  # names of LossTerms.metrics, logged as train and eval metrics
    eval_metrics: tuple[str, ...] = ()  # further names of LossTerms.metrics that only evaluation reports


@dataclass(frozen=True)
class StepContext:
    """What a family's setup hook may know about the step it takes part in."""
    gradient_average: int  # ranks whose gradients the data-parallel reduction averages (dp x cp)
    micro_batches: int  # forwards per optimizer step on one rank


@dataclass(frozen=True)
class RunContext:
    """What a run computes with, for ModelSpec.check_run. A worker knows it all once its device is chosen; a preflight
    (the launcher of a local world, `shardwright submit` on a login node, `plan`) knows only the config: it shares
    neither the nodes' devices nor their packages."""
    document_mask: bool  # data.document_mask: batches carry document ids
    device: torch.device | None = None  # None: not known yet (a preflight)
    compute_dtype: torch.dtype | None = None  # bf16 or fp32 (train.mixed_precision); None: not known yet


@dataclass(frozen=True)
class TrainingHooks:
    """A family's own parts of a step; each runs on every model part (pipeline stage) of a rank.
    Metrics are named sums over the parts of all pipeline stages."""
    setup: Callable[[nn.Module, StepContext], None] | None = None  # once, after the weights are initialized
    after_backward: Callable[[nn.Module], dict[str, float]] | None = None  # before clipping
    after_optimizer_step: Callable[[nn.Module], dict[str, float]] | None = None
    # Forget what forwards recorded in the part since its last step (statistics a step's hooks read): a pipeline
    # stage's metadata-inference forward on the first step belongs to no step (parallel/pipeline.py).
    discard_records: Callable[[nn.Module], None] | None = None


class StateDictAdapter(Protocol):
    """Maps the checkpoint of another format (e.g. Hugging Face, keyed "hf") to and from the family's canonical
    parameter names and layouts (the names ModelState saves), and the family's model config to that format's.
    A ValueError names what the other format cannot express (a tensor, a config field). An import maps one layer's
    tensors at a time (launcher/hf_import.py), first as meta tensors (names and shapes only): to_native must map
    any such part of a state dict and check values only on tensors that hold data. An import-only mapping (SOLO's start
    from a Llama) sets `exports = False`, and its from_native / export_config raise the ValueError saying why."""

    def to_native(self, state_dict: dict[str, torch.Tensor], model_cfg: Any) -> dict[str, torch.Tensor]: ...

    def from_native(self, state_dict: dict[str, torch.Tensor], model_cfg: Any) -> dict[str, torch.Tensor]: ...

    # Why a model of the format's config (for "hf": config.json) cannot load into a model of model_cfg: one
    # line per mismatch, naming the run's config key to change. Empty: it can.
    def config_problems(self, config: dict[str, Any], model_cfg: Any) -> list[str]: ...

    # The format's model config (for "hf": the fields of config.json, with model_type and architectures) for
    # a model trained on sequences of max_position_embeddings tokens.
    def export_config(self, model_cfg: Any, max_position_embeddings: int) -> dict[str, Any]: ...


@dataclass
class CheckpointContents:
    """A checkpoint's model and optimizer whole in one process, keyed as the trainer saves them: parameters by
    canonical name; the optimizer flattened, `state.<parameter>.<slot>` (AdamW: step, exp_avg, exp_avg_sq)
    and `param_group_options.<group name>.<option>` (lr, betas, ...; once per named group)."""
    model_config: Any
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]


@dataclass(frozen=True)
class CheckpointCommand:
    """`shardwright convert <name> SOURCE OUT`: a new run directory OUT whose checkpoint, at SOURCE's step,
    is converted from a checkpoint of the family (launcher/convert.py loads it in one process, builds the
    new run freshly initialized, calls `convert`, checks the outputs on a batch and publishes OUT)."""
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]  # the command's own options
    # (args, the checkpoint's model config) -> the model config fields that change (with target_family: the
    # new family's whole model config); a ValueError says what is wrong with the arguments (shown as one line).
    model_changes: Callable[[argparse.Namespace, Any], dict[str, Any]]
    # (args, source, target, log): fill target (the new run as freshly initialized) from source.
    convert: Callable[[argparse.Namespace, CheckpointContents, CheckpointContents, Callable[[str], None]], None]
    # (args) -> whether the new model computes the same function: then its outputs must match the old one's.
    preserves_function: Callable[[argparse.Namespace], bool]
    # The family of the new run; None: the source's.
    target_family: str | None = None
    # (args, the checkpoint's model config, rows) -> keyword inputs the old model takes besides the batch's in the
    # self-check, for a new model that computes part of it (MatFormer: the submodel's ffn_widths). None: none.
    source_inputs: Callable[[argparse.Namespace, Any, int], dict[str, torch.Tensor]] | None = None


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config_cls: type
    model_cls: type[nn.Module]  # model_cls(config): plain single-device PyTorch, built on the meta device
    data: DataSpec
    loss: LossSpec
    plan: ParallelPlan
    # flops_per_token(config, seq_len): exact training FLOPs per token, for MFU.
    flops_per_token: Callable[[Any, int], float]
    # check_layout(config, dims, options): problems (one line each) that make the layout and options
    # impossible for this model; run before any process group starts.
    check_layout: Callable[[Any, ParallelDims, ParallelizeOptions], list[str]]
    # check_run(config, RunContext): problems (one line each, naming the config key to change) of the config with what
    # the run computes on: its device, compute dtype and packages, and packed documents. Called by the preflight with
    # the device unknown (RunContext.device None) and by every worker once its device is chosen, before the run
    # directory is touched; all ranks refuse together (launcher/trainer.py). None: nothing to check.
    check_run: Callable[[Any, RunContext], list[str]] | None = None
    # Pipeline parallelism: the number of layers that stages split, and
    # split_stage(model, layer_ids, is_first, is_last), which keeps one stage's part in place. None: no pp.
    n_layers: Callable[[Any], int] | None = None
    split_stage: Callable[[nn.Module, list[int], bool, bool], None] | None = None
    # flops_per_attention_pair(config): training FLOPs of one attended (query, key) pair over all layers,
    # which corrects flops_per_token's causal count for batches that attend fewer pairs (packed documents).
    flops_per_attention_pair: Callable[[Any], float] | None = None
    hooks: TrainingHooks = TrainingHooks()
    state_dict_adapters: dict[str, StateDictAdapter] = field(default_factory=dict)
    checkpoint_commands: dict[str, CheckpointCommand] = field(default_factory=dict)  # by `convert` sub-command name
    # Families whose native checkpoints start a run of this one (checkpoint.init_from), by name: map(that family's
    # canonical tensors, one layer's at a time and first as meta tensors; the run's model config) -> this family's
    # (tensors it adds too). The checkpoint's architecture fields must equal the run's. A ValueError says why not.
    starts_from: dict[str, Callable[[dict[str, torch.Tensor], Any], dict[str, torch.Tensor]]] = \
        field(default_factory=dict)
    # A family whose data or loss depend on its model config (MatFormer: which submodels a batch runs) gives
    # the spec to train that config with; None: one spec for every config. See models.configured_spec.
    configure: Callable[[Any], "ModelSpec"] | None = None


def execution_field(default: Any = dataclasses.MISSING, default_factory: Any = dataclasses.MISSING) -> Any:
    """A model config field that says how to compute or train, not what function the model computes (a
    kernel backend, a chunk length, a training mode): a checkpoint resumes across a change of it."""
    return field(default=default, default_factory=default_factory, metadata={"execution": True})


def architecture(model_cfg: Any) -> dict:
    """The fields of a model config that define the function it computes (what a resume compares)."""
    return {f.name: getattr(model_cfg, f.name) for f in dataclasses.fields(model_cfg)
            if not f.metadata.get("execution")}
