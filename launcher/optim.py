"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedules."""
import math
from collections.abc import Iterable
from functools import partial

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from launcher.config import TrainSection
from launcher.distributed import all_reduce
from parallel.tensor_parallel import full_tensor


def build_optimizer(model: nn.Module, t: TrainSection) -> torch.optim.Optimizer:
    """AdamW over matrices (decayed) and vectors (norm gains: not decayed). DTensors and plain
    tensors go into separate groups: its multi-tensor kernels run per group and refuse a mix of the two
    (e.g. a router weight replicated over tp beside tensor-parallel weights when no FSDP makes all DTensors).
    Each group is named by its options alone ("decayed" / "not_decayed"), whatever the layout: checkpoints
    store the options once per name (launcher/checkpoint.py: OptimizerState).

    torch's fused kernel (one pass over each parameter's state) rather than its foreach ops: on CPU an update
    takes a seventh of the time (benchmarks/optimizer_step.py: 0.52 against 3.50 ms for the tiny config's
    model), and it is torchtitan's default on GPUs."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = []
    for decayed in (True, False):
        for distributed in (True, False):
            members = [p for p in params if (p.ndim >= 2) == decayed and isinstance(p, DTensor) == distributed]
            if members:
                groups.append({"params": members, "weight_decay": t.weight_decay if decayed else 0.0,
                               "name": "decayed" if decayed else "not_decayed"})
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8, fused=True)


def lr_factor(step: int, t: TrainSection) -> float:
    """Multiplier on train.lr for optimizer update `step` (0-based).

    Linear warmup reaches the peak on the last warmup update; the first update after warmup
    is at the peak and the final update (step = train.steps - 1) at lr * min_lr_ratio.
    """
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.lr_schedule == "constant":
        return 1.0
    floor = t.min_lr_ratio
    last = t.steps - 1
    if t.lr_schedule == "cosine":
        progress = min(1.0, (step - t.warmup_steps) / max(1, last - t.warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    # wsd: warmup, stable at the peak, then a linear decay over the last decay_fraction of updates
    decay_steps = max(1, round(t.decay_fraction * t.steps))
    decay_start = t.steps - decay_steps
    if step < decay_start:
        return 1.0
    return 1.0 - (1 - floor) * min(1.0, (step - decay_start + 1) / decay_steps)


def schedule_note(t: TrainSection) -> str | None:
    """The line a run logs when its warmup covers the whole run (a short test run of a config made for longer
    ones): the learning rate then rises throughout, reaching train.lr at most on the last update, and never decays.
    Allowed, but said."""
    if t.warmup_steps < t.steps:
        return None
    return (f"train.warmup_steps={t.warmup_steps} >= train.steps={t.steps}: the learning rate rises for the whole run, "
            f"its last update at {lr_factor(t.steps - 1, t):.3g} x train.lr={t.lr:g}, and never decays")


def build_scheduler(optimizer: torch.optim.Optimizer, t: TrainSection) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, t=t))


class Optimizers:
    """One AdamW and schedule per model part (each pipeline stage has its own), stepped together.

    `schedule_state` is the Stateful that checkpoints the schedule: all parts share one step count.
    """

    def __init__(self, parts: list[nn.Module], t: TrainSection):
        self.optimizers = [build_optimizer(part, t) for part in parts]
        self.schedulers = [build_scheduler(opt, t) for opt in self.optimizers]
        self.schedule_state = _ScheduleState(self.schedulers)

    @property
    def lr(self) -> float:
        return self.schedulers[0].get_last_lr()[0]

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()
        for scheduler in self.schedulers:
            scheduler.step()
        self.skip()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self, params: Iterable[nn.Parameter], max_norm: float, pp_group) -> float:
        return clip_grad_norm(params, max_norm, pp_group)

    def skip(self) -> None:
        """Drop this step's gradients without an update; the schedule counts only the steps taken."""
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float, pp_group) -> float:
    """Global L2 norm of the gradients of `params` (this rank's, in module order) over every shard, mesh dim and
    pipeline stage, clipped to max_norm when > 0.

    Gradients live on different meshes (FSDP x TP, TP only, or plain tensors), so the norm is
    taken per mesh and made whole there; the squares are summed, then over the pipeline stages.
    """
    by_mesh: dict = {}
    for p in params:
        if p.grad is not None:
            by_mesh.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p.grad)
    squares = sum(full_tensor(torch.nn.utils.get_total_norm(grads)) ** 2 for grads in by_mesh.values())
    squares = torch.as_tensor(squares, dtype=torch.float32)
    all_reduce(squares, group=pp_group)
    norm = squares.sqrt().item()
    if max_norm > 0 and norm > max_norm:
        for grads in by_mesh.values():  # a Python scalar multiplies DTensors and plain tensors alike
            torch._foreach_mul_(grads, max_norm / (norm + 1e-6))
    return norm


class _ScheduleState:
    """The schedule's place: the step count every part's scheduler shares, all that is saved. A scheduler's
    per-group values stay its own: pipeline stages may hold different groups (a stage whose norms have no
    parameters has no not_decayed group), so one stage's values loaded into another's scheduler broke its next step.
    Checkpoints holding a whole scheduler's state (earlier versions) load the same way."""

    def __init__(self, schedulers):
        self.schedulers = schedulers

    def state_dict(self) -> dict:
        return {"last_epoch": self.schedulers[0].last_epoch, "_step_count": self.schedulers[0]._step_count}

    def load_state_dict(self, state: dict) -> None:
        for scheduler in self.schedulers:
            scheduler.last_epoch, scheduler._step_count = state["last_epoch"], state["_step_count"]
            scheduler._last_lr = [base * factor(scheduler.last_epoch)
                                  for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
            # Loaded after the optimizer (training_state's order), whose groups hold the saved run's lr: the next
            # update takes this run's schedule (a changed train.lr, steps or warmup), as the step record says.
            for group, lr in zip(scheduler.optimizer.param_groups, scheduler._last_lr):
                group["lr"] = lr
