"""Pipeline parallelism on torch.distributed.pipelining.

The model (still on the meta device) is copied once per pipeline stage this rank holds; each copy
keeps only its stage's layers (names unchanged, so checkpoints and initialization do not depend
on the split) and is then parallelized like a whole model (TP, checkpointing, FSDP). A schedule
from torch runs the micro-batches through the stages.
"""
import copy
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class

# name -> torch's schedule class name
SCHEDULES = {"gpipe": "GPipe", "1f1b": "1F1B", "interleaved-1f1b": "Interleaved1F1B",
             "zero-bubble": "InterleavedZeroBubble", "zbv": "ZBVZeroBubble", "dualpipev": "DualPipeV"}
V_SHAPED = {"zbv", "dualpipev"}  # two stages per rank: rank r holds stages r and 2*pp-1-r
SINGLE_STAGE = {"gpipe", "1f1b"}  # exactly one stage per rank


class PipelineError(ValueError):
    """A pipeline layout or schedule that cannot work (printed to the user as one line)."""


def stages_per_rank(schedule: str, requested: int) -> int:
    if schedule not in SCHEDULES:
        raise PipelineError(f"parallel.pp_schedule '{schedule}' does not exist; choose one of {', '.join(SCHEDULES)}")
    if schedule in SINGLE_STAGE:
        if requested != 1:
            raise PipelineError(f"parallel.pp_schedule={schedule} runs one stage per rank; set "
                                f"parallel.pp_stages_per_rank=1 or pick interleaved-1f1b / zero-bubble")
        return 1
    if schedule in V_SHAPED and requested != 2:
        raise PipelineError(f"parallel.pp_schedule={schedule} runs two stages per rank (a V); set "
                            f"parallel.pp_stages_per_rank=2")
    if requested < 2:
        raise PipelineError(f"parallel.pp_schedule={schedule} interleaves several stages per rank; set "
                            f"parallel.pp_stages_per_rank to 2 or more")
    return requested


def stage_ids(pp_rank: int, pp: int, schedule: str, per_rank: int) -> list[int]:
    if schedule in V_SHAPED:
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + i * pp for i in range(per_rank)]  # looped: rank r holds r, r+pp, ...


def split_layers(n_layers: int, n_stages: int, layout: str) -> list[list[int]]:
    """Layer indices per stage: balanced, or from a layout like "E,L4|L4,H" (E = embedding, which
    must open the first stage; H = head, which must close the last; L<n> = n layers)."""
    if not layout:
        if n_stages > n_layers:
            raise PipelineError(f"{n_stages} pipeline stages but only {n_layers} layers; use fewer stages")
        if n_layers % n_stages:
            raise PipelineError(f"{n_layers} layers do not split evenly into {n_stages} pipeline stages; change "
                                f"pp / pp_stages_per_rank or give parallel.pp_layout, e.g. 'E,L3|L2,H'")
        per = n_layers // n_stages
        return [list(range(s * per, (s + 1) * per)) for s in range(n_stages)]
    stages = layout.split("|")
    if len(stages) != n_stages:
        raise PipelineError(f"parallel.pp_layout '{layout}' has {len(stages)} stages but the layout needs {n_stages}")
    counts = []
    for s, stage in enumerate(stages):
        count = 0
        for token in (tok.strip() for tok in stage.split(",")):
            if token == "E" and s == 0 or token == "H" and s == n_stages - 1:
                continue
            if token.startswith("L") and token[1:].isdigit():
                count += int(token[1:])
            else:
                raise PipelineError(f"parallel.pp_layout '{layout}': '{token}' in stage {s} is not E (first stage), "
                                    f"H (last stage) or L<count>")
        counts.append(count)
    if sum(counts) != n_layers:
        raise PipelineError(f"parallel.pp_layout '{layout}' places {sum(counts)} layers but the model has {n_layers}")
    starts = [sum(counts[:s]) for s in range(n_stages)]
    return [list(range(start, start + count)) for start, count in zip(starts, counts)]


# dtypes a stage output may have when it is passed on outside a schedule (Pipeline.forward)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_MAX_DIMS = 6


@dataclass
class Pipeline:
    """This rank's stages of the model and the schedule that drives them."""
    parts: list[nn.Module]
    stages: list[PipelineStage]  # one per part, in the same order
    stage_ids: list[int]  # one per part, in the same order
    stage_ranks: list[int]  # the pp rank holding each stage of the whole pipeline
    schedule: object
    group: dist.ProcessGroup
    device: torch.device
    # torch's eval() fails on V-shaped schedules ("can't steal_bwd_input if this stage doesn't have
    # backward", torch 2.13); there an eval batch runs a training step whose gradients are dropped.
    eval_by_training_step: bool = False

    @property
    def has_first(self) -> bool:
        return 0 in self.stage_ids

    @property
    def has_last(self) -> bool:
        return len(self.stage_ranks) - 1 in self.stage_ids

    def run(self, inputs: tuple, every_stage: dict, target: torch.Tensor, backward: bool) -> None:
        """Run one batch (micro-batches stacked on dim 0) through the schedule: `inputs` go to the
        first stage, `every_stage` keyword inputs to every stage, `target` to the loss function on the
        last stage (which sees each micro-batch's part of it)."""
        args = inputs if self.has_first else ()
        target = target if self.has_last else None
        # return_outputs=False: the last stage keeps a micro-batch's output (its logits) only until that
        # micro-batch's backward; by default a schedule holds all of them until the step ends, to return them merged.
        if backward or self.eval_by_training_step:
            with torch.enable_grad():
                self.schedule.step(*args, target=target, return_outputs=False, **every_stage)
            if not backward:
                for part in self.parts:
                    part.zero_grad(set_to_none=True)
        else:
            self.schedule.eval(*args, target=target, return_outputs=False, **every_stage)

    @torch.no_grad()
    def forward(self, inputs: tuple, every_stage: dict) -> torch.Tensor | None:
        """One batch through every stage in order, outside the schedule (e.g. to sample): the last
        stage's output on the rank that holds it, None elsewhere. Each stage's output goes to the next
        stage's rank with its shape and dtype sent first."""
        pp_rank = dist.get_rank(self.group)
        parts = dict(zip(self.stage_ids, self.parts))
        carry = None
        for stage_id, owner in enumerate(self.stage_ranks):
            if stage_id > 0 and self.stage_ranks[stage_id - 1] != owner:  # hand over between ranks
                sender = self.stage_ranks[stage_id - 1]
                if pp_rank == sender:
                    _send(carry, owner, self.group)
                elif pp_rank == owner:
                    carry = _receive(sender, self.group, self.device)
            if pp_rank == owner:
                carry = parts[stage_id](*(inputs if stage_id == 0 else (carry,)), **every_stage)
        return carry if self.has_last else None


def _send(tensor: torch.Tensor, dst: int, group) -> None:
    header = torch.zeros(2 + _MAX_DIMS, dtype=torch.int64, device=tensor.device)
    header[0], header[1] = _DTYPES.index(tensor.dtype), tensor.ndim
    header[2:2 + tensor.ndim] = torch.tensor(tensor.shape)
    dist.send(header, group=group, group_dst=dst)
    dist.send(tensor.contiguous(), group=group, group_dst=dst)


def _receive(src: int, group, device: torch.device) -> torch.Tensor:
    header = torch.empty(2 + _MAX_DIMS, dtype=torch.int64, device=device)
    dist.recv(header, group=group, group_src=src)
    ndim = int(header[1])
    tensor = torch.empty(header[2:2 + ndim].tolist(), dtype=_DTYPES[int(header[0])], device=device)
    dist.recv(tensor, group=group, group_src=src)
    return tensor


def _discarding(stage: PipelineStage, discard: Callable[[], None]) -> None:
    """torch 2.13 infers a stage's activation shapes on the schedule's first step with a forward of the stage's
    module, in training mode with gradients on (real inputs on the first stage, placeholders on the others), before
    the micro-batches' own forwards: what that forward recorded in the module (routing statistics, say, NaN from
    placeholders) belongs to no step, so `discard` runs right after it."""
    infer = stage._forward_metadata_inference

    def inferred(*args, **kwargs):
        meta = infer(*args, **kwargs)
        discard()
        return meta

    stage._forward_metadata_inference = inferred


def build_pipeline(model: nn.Module, split: Callable[[nn.Module, list[int], bool, bool], None],
                   parallelize: Callable[[nn.Module], nn.Module], n_layers: int, pp_mesh, schedule: str,
                   per_rank: int, layout: str, n_microbatches: int, loss_fn, device: torch.device,
                   discard_records: Callable[[nn.Module], None] | None = None) -> Pipeline:
    """Cut `model` into this rank's stages with `split(part, layer_ids, is_first, is_last)`, apply
    `parallelize` to each part, and build the named schedule over them. `discard_records(part)` (a family's
    TrainingHooks.discard_records) runs after each stage's metadata-inference forward: see _discarding."""
    pp, pp_rank = pp_mesh.size(), pp_mesh.get_local_rank()
    n_stages = pp * per_rank
    layers = split_layers(n_layers, n_stages, layout)
    ids = stage_ids(pp_rank, pp, schedule, per_rank)
    parts, stages = [], []
    for stage_id in ids:
        part = copy.deepcopy(model)
        split(part, layers[stage_id], stage_id == 0, stage_id == n_stages - 1)
        part = parallelize(part)
        parts.append(part)
        stage = PipelineStage(part, stage_id, n_stages, device, group=pp_mesh.get_group())
        if discard_records is not None:
            _discarding(stage, partial(discard_records, part))
        stages.append(stage)
    schedule_cls = get_schedule_class(SCHEDULES[schedule])
    try:
        # The loss is already normalized by the global count of its terms: no division by micro-batches.
        if issubclass(schedule_cls, PipelineScheduleSingle):
            runner = schedule_cls(stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=False)
        else:
            runner = schedule_cls(stages, n_microbatches, loss_fn=loss_fn, scale_grads=False)
    except ValueError as e:
        raise PipelineError(f"pipeline schedule {schedule} with {n_microbatches} micro-batches over {n_stages} "
                            f"stages: {e}; raise train.global_batch_size or lower train.micro_batch_size so that "
                            f"global_batch_size / (micro_batch_size x dp) is at least {n_stages}") from None
    owners = {stage: rank for rank in range(pp) for stage in stage_ids(rank, pp, schedule, per_rank)}
    return Pipeline(parts, stages, ids, [owners[stage] for stage in range(n_stages)], runner,
                    group=pp_mesh.get_group(), device=device, eval_by_training_step=schedule in V_SHAPED)
