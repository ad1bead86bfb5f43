"""parallel.engine=deepspeed: DeepSpeed's ZeRO engine (stages 1-3, optimizer and parameter offload) in place of
FSDP2, behind the interface of launcher.optim.Optimizers, so the trainer's step, loss normalization, metrics,
signals and checkpoints stay its own.

    the family's plain model, materialized and initialized as every run's
    -> deepspeed.initialize(model, torch.optim.AdamW with the run's parameter groups, the generated config)
    -> per micro-batch: engine forward, engine.backward(the trainer's scaled loss, not divided again)
    -> per step: engine.step() (reduce, clip, AdamW; DeepSpeed skips the update when a gradient is not finite),
       then the run's own lr schedule

The client optimizer is torch's AdamW, not DeepSpeedCPUAdam (a C++ op compiled on first use, ~19 min on this
machine's CPU): the same update as the torch engine. With offload, ZeRO keeps the fp32 master weights and AdamW
states in CPU memory and torch's AdamW steps them there (docs/deepspeed.md).

Checkpoints: the trainer's DCP files hold the schedule, the loader and each rank's RNG; DeepSpeed's own files
(save_checkpoint) go into the same staging directory under `deepspeed/`, so the Checkpointer's checksums and
atomic publish cover them, and `checkpoint.init_from=<step-N>/deepspeed` reads them into any torch layout
(launcher/deepspeed_import.py). Resuming reads them with load_checkpoint under the weights-only unpickler.
"""
import copy
import importlib
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from launcher.config import Config, TrainSection, _suggest
from launcher.deepspeed_import import weights_only_torch_load
from launcher.errors import UserError
from launcher.optim import build_optimizer, build_scheduler
from parallel.mesh import ParallelDims

SUBDIR = "deepspeed"  # DeepSpeed's files inside a checkpoints/step-<N>/
# Keys the generated config sets from the run's own sections: a pass-through copy could only contradict them.
OWNED = {"train_batch_size": "train.global_batch_size", "train_micro_batch_size_per_gpu": "train.micro_batch_size",
         "gradient_accumulation_steps": "train.global_batch_size / (micro_batch_size x dp)",
         "gradient_clipping": "train.grad_clip", "optimizer": "train (lr, betas, weight_decay)",
         "scheduler": "train (lr_schedule, warmup_steps)", "bf16": "train.mixed_precision",
         "fp16": "train.mixed_precision", "zero_allow_untested_optimizer": "the engine (torch AdamW)",
         "zero_force_ds_cpu_optimizer": "the engine (torch AdamW)"}
OWNED_ZERO = {"stage": "parallel.zero_stage", "offload_optimizer": "parallel.offload_optimizer",
              "offload_param": "parallel.offload_params"}


def _import_deepspeed():
    """deepspeed, on the CPU accelerator when there is no GPU; UserError when it is not installed."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed assumes CUDA
    try:
        return importlib.import_module("deepspeed")
    except ImportError:
        raise UserError("parallel.engine=deepspeed needs DeepSpeed, which is not installed: pip install "
                        "'shardwright[deepspeed]' (or set parallel.engine=torch)") from None


def deepspeed_config(cfg: Config, dims: ParallelDims, bf16: bool) -> dict:
    """DeepSpeed's config for this run: batch, clipping, precision and ZeRO from the run's sections, with
    parallel.deepspeed merged in (its ZeRO keys into zero_optimization)."""
    p, t = cfg.parallel, cfg.train
    zero: dict = {"stage": p.zero_stage}
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if p.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    extra = copy.deepcopy(p.deepspeed)
    zero.update(extra.pop("zero_optimization", {}))
    return {**extra,
            # train_batch_size is left to DeepSpeed: micro x accumulation x its world (the same, validated)
            "train_micro_batch_size_per_gpu": t.micro_batch_size,
            "gradient_accumulation_steps": t.global_batch_size // (t.micro_batch_size * dims.dp),
            "gradient_clipping": t.grad_clip,
            "bf16": {"enabled": bf16},
            "zero_optimization": zero,
            # torch's AdamW as the client optimizer, also with offload (see the module docstring)
            "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": extra.get("steps_per_print", 2**31 - 1)}  # the run logs its own metrics


class _RecordedReads(dict):
    """A config dict that records the keys DeepSpeed's config parser reads (copies share the record)."""

    def __init__(self, values: dict):
        super().__init__(values)
        self.reads: set[str] = set()

    def get(self, key, default=None):
        self.reads.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.reads.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.reads.add(key)
        return super().__contains__(key)


def check_deepspeed_config(cfg: Config, dims: ParallelDims) -> None:
    """Before any process group: DeepSpeed is installed, parallel.deepspeed sets no key the run owns, and DeepSpeed's
    own parser accepts the generated config and reads every top-level key of it (it ignores unknown top-level keys
    silently; its sections' models refuse unknown keys themselves)."""
    for key in cfg.parallel.deepspeed:
        if key in OWNED:
            raise UserError(f"parallel.deepspeed.{key} is set from {OWNED[key]}; set that instead")
    zero = cfg.parallel.deepspeed.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise UserError(f"parallel.deepspeed.zero_optimization = {zero!r} should be a mapping of DeepSpeed's ZeRO "
                        f"keys, e.g. {{reduce_bucket_size: 5e8}}")
    for key in zero:
        if key in OWNED_ZERO:
            raise UserError(f"parallel.deepspeed.zero_optimization.{key} is set from {OWNED_ZERO[key]}; set that "
                            f"instead")
    _import_deepspeed()
    from deepspeed.runtime.config import DeepSpeedConfig

    values = _RecordedReads(deepspeed_config(cfg, dims, bf16=False))  # precision does not change which keys exist
    try:
        DeepSpeedConfig(values)
    except Exception as e:  # pydantic's ValidationError, DeepSpeed's asserts and ValueErrors: all say what is wrong
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise UserError(f"parallel.deepspeed: DeepSpeed refuses the config: {' '.join(lines[:3])}") from None
    unknown = sorted(set(values) - values.reads)
    if unknown:
        raise UserError(f"parallel.deepspeed.{unknown[0]} is not a key DeepSpeed reads"
                        f"{_suggest(unknown[0], values.reads)}; see https://www.deepspeed.ai/docs/config-json/")


class ZeroOptimizers:
    """The ZeRO engine around the plain `model`, with the interface of launcher.optim.Optimizers: the trainer's
    backward, clip + step and schedule go through it. `engine` replaces the model as the run's one part.
    `training_state(loader)` is what the trainer's DCP files hold; `save(dir)` / `load(dir)` DeepSpeed's own."""

    def __init__(self, model: nn.Module, t: TrainSection, config: dict):
        deepspeed = _import_deepspeed()
        # DeepSpeed's CPU accelerator builds a shared-memory all-reduce (a C++ op, ~3 min to compile here) when its
        # communication backend starts; gloo's all-reduce does the same work without it.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        # DeepSpeed 0.19 calls two torch collectives deprecated in torch 2.13, each call warning again.
        warnings.filterwarnings("ignore", message=".*(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
                                category=FutureWarning)
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())  # joins the existing group
        optimizer = build_optimizer(model, t)
        # The schedule sets lr in the optimizer's parameter groups, which ZeRO keeps (with its own flat tensors).
        self.scheduler = build_scheduler(optimizer, t)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        self.accumulation = config["gradient_accumulation_steps"]
        self.backwards = 0  # of the current step: the last one is the accumulation boundary

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    @property
    def schedule_state(self):
        return self.scheduler

    def backward(self, loss: torch.Tensor) -> None:
        """The trainer's loss is already the step's share (sum / global count x dp): not divided by the number of
        micro-batches again. ZeRO reduces gradients during the boundary's backward."""
        self.backwards += 1
        self.engine.set_gradient_accumulation_boundary(self.backwards % self.accumulation == 0)
        self.engine.backward(loss, scale_wrt_gas=False)

    def clip_grad_norm(self, params, max_norm: float, pp_group) -> float:
        """DeepSpeed's step: reduce, clip to gradient_clipping (= max_norm) and update, or skip the update and
        drop the gradients when one is not finite; the norm before clipping (inf when skipped)."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def step(self) -> None:
        """The update happened in clip_grad_norm; the schedule counts it."""
        self.scheduler.step()

    def skip(self) -> None:
        """The trainer skips a step whose loss or gradient norm is not finite; DeepSpeed already skipped the update
        when a gradient was not finite (a NaN loss gives NaN gradients): the schedule does not count it."""

    def training_state(self, loader) -> dict:
        return {"scheduler": self.schedule_state, "data": loader}

    def save(self, checkpoint_dir: Path) -> None:
        """Every rank: DeepSpeed's checkpoint (model, ZeRO partitions, AdamW states) into checkpoint_dir/deepspeed."""
        self.engine.save_checkpoint(str(checkpoint_dir / SUBDIR), tag="zero", client_state={})

    def load(self, checkpoint_dir: Path) -> None:
        """Every rank: back from checkpoint_dir/deepspeed, saved by this run (the same layout and stage, checked in
        preflight). DeepSpeed's torch.load calls go through the weights-only unpickler."""
        with weights_only_torch_load():
            path, _ = self.engine.load_checkpoint(str(checkpoint_dir / SUBDIR), tag="zero",
                                                  load_lr_scheduler_states=False)
        if path is None:
            raise UserError(f"{checkpoint_dir / SUBDIR}: DeepSpeed found no checkpoint to load")
