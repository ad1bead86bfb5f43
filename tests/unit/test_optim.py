"""launcher/optim.py: learning-rate schedules, the LambdaLR built from them, AdamW parameter groups."""
import math

import pytest
import torch
from torch import nn

from launcher.config import TrainSection
from launcher.optim import build_optimizer, build_scheduler, lr_factor


def train(**changes) -> TrainSection:
    base = dict(steps=100, warmup_steps=10, min_lr_ratio=0.1, lr=2e-3, decay_fraction=0.2)
    return TrainSection(**{**base, **changes})


def factors(t: TrainSection, upto: int | None = None) -> list[float]:
    return [lr_factor(step, t) for step in range(t.steps + 1 if upto is None else upto)]


# ------------------------------------------------------------------------------------------ warmup


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
@pytest.mark.parametrize("warmup", [1, 4, 10])
def test_warmup_is_linear_from_lr_over_warmup_to_lr(schedule, warmup):
    t = train(lr_schedule=schedule, warmup_steps=warmup)
    ramp = factors(t, warmup)
    assert ramp[0] == pytest.approx(1 / warmup)
    assert ramp[-1] == pytest.approx(1.0)
    for step, value in enumerate(ramp):
        assert value == pytest.approx((step + 1) / warmup)
    # Equal increments: the ramp is a straight line.
    for a, b in zip(ramp, ramp[1:]):
        assert b - a == pytest.approx(1 / warmup)
    # The first step after warmup starts the schedule at its peak.
    assert lr_factor(warmup, t) == pytest.approx(1.0)


def test_no_warmup_starts_at_the_peak():
    for schedule in ("cosine", "wsd", "constant"):
        assert lr_factor(0, train(lr_schedule=schedule, warmup_steps=0)) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------ schedules


@pytest.mark.parametrize("steps, warmup, floor", [(100, 10, 0.1), (37, 5, 0.0), (50, 0, 0.3)])
def test_cosine_decays_monotonically_to_the_floor(steps, warmup, floor):
    t = train(lr_schedule="cosine", steps=steps, warmup_steps=warmup, min_lr_ratio=floor)
    after = factors(t)[warmup:]
    assert after[0] == pytest.approx(1.0)
    assert all(b <= a + 1e-15 for a, b in zip(after, after[1:]))
    assert all(floor - 1e-12 <= f <= 1.0 + 1e-12 for f in after)
    # The final update (index steps - 1) runs at min_lr_ratio ("final lr = lr * min_lr_ratio") ...
    assert lr_factor(steps - 1, t) == pytest.approx(floor, abs=1e-12)
    assert lr_factor(steps - 2, t) > floor
    # ... and stays there if training runs past the schedule.
    assert lr_factor(steps + 25, t) == pytest.approx(floor, abs=1e-12)
    # Half way through the decay it is half way between the peak and the floor (cosine symmetry).
    if (steps - 1 - warmup) % 2 == 0:
        assert lr_factor(warmup + (steps - 1 - warmup) // 2, t) == pytest.approx((1 + floor) / 2)


def test_cosine_shape_matches_the_formula():
    t = train(lr_schedule="cosine")
    span = t.steps - 1 - t.warmup_steps  # from the first update after warmup to the last update
    for step in range(t.warmup_steps, t.steps):
        expected = t.min_lr_ratio + (1 - t.min_lr_ratio) * (1 + math.cos(math.pi * (step - t.warmup_steps) / span)) / 2
        assert lr_factor(step, t) == pytest.approx(expected)


@pytest.mark.parametrize("steps, warmup, decay_fraction, floor", [(100, 10, 0.2, 0.1), (60, 5, 0.5, 0.0),
                                                                  (40, 0, 0.25, 0.2)])
def test_wsd_is_flat_then_linear_to_the_floor(steps, warmup, decay_fraction, floor):
    t = train(lr_schedule="wsd", steps=steps, warmup_steps=warmup, decay_fraction=decay_fraction, min_lr_ratio=floor)
    decay_steps = round(decay_fraction * steps)
    decay_start = steps - decay_steps
    values = factors(t)
    assert all(v == 1.0 for v in values[warmup:decay_start])  # stable at the peak
    decay = values[decay_start - 1:steps]  # the last stable update, then the decay window
    assert len(decay) == decay_steps + 1
    assert decay[-1] == pytest.approx(floor, abs=1e-12)  # the final update (index steps - 1)
    # Linear: every decay step lowers the factor by the same amount, (1 - floor) / decay_steps.
    for a, b in zip(decay, decay[1:]):
        assert a - b == pytest.approx((1 - floor) / decay_steps)
    assert lr_factor(steps + 10, t) == pytest.approx(floor, abs=1e-12)


def test_constant_stays_at_one():
    t = train(lr_schedule="constant", steps=50, warmup_steps=5)
    assert all(f == 1.0 for f in factors(t)[5:])
    assert lr_factor(1000, t) == 1.0


def test_schedules_differ_after_warmup():
    """The schedule choice matters: same settings, three different curves."""
    curves = {s: factors(train(lr_schedule=s)) for s in ("cosine", "wsd", "constant")}
    assert curves["cosine"][:10] == curves["wsd"][:10] == curves["constant"][:10]
    assert curves["cosine"][50] < curves["wsd"][50] == curves["constant"][50] == 1.0


# ------------------------------------------------------------------------------------------ scheduler


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 3)  # 2-D weight, 1-D bias
        self.norm_weight = nn.Parameter(torch.ones(3))
        self.table = nn.Parameter(torch.zeros(2, 3, 4))
        self.frozen = nn.Parameter(torch.zeros(5, 5), requires_grad=False)


def _step(optimizer, scheduler):
    optimizer.step()
    scheduler.step()


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_scheduler_gives_lr_times_factor(schedule):
    t = train(lr_schedule=schedule, steps=30, warmup_steps=4, decay_fraction=0.3)
    optimizer = build_optimizer(Tiny(), t)
    scheduler = build_scheduler(optimizer, t)
    for step in range(t.steps + 3):
        expected = t.lr * lr_factor(step, t)
        assert scheduler.get_last_lr() == pytest.approx([expected] * len(optimizer.param_groups))
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(expected)
        _step(optimizer, scheduler)


def test_scheduler_state_round_trips():
    t = train(lr_schedule="wsd", steps=40, warmup_steps=5, decay_fraction=0.5)
    optimizer = build_optimizer(Tiny(), t)
    scheduler = build_scheduler(optimizer, t)
    for _ in range(17):
        _step(optimizer, scheduler)
    state = scheduler.state_dict()
    assert state["last_epoch"] == 17

    resumed_optimizer = build_optimizer(Tiny(), t)
    resumed = build_scheduler(resumed_optimizer, t)
    assert resumed.get_last_lr() != scheduler.get_last_lr()  # a fresh one starts in warmup
    resumed.load_state_dict(state)
    # load_state_dict restores the step counter; the optimizer's lr follows on the next step.
    for _ in range(30):
        _step(optimizer, scheduler)
        _step(resumed_optimizer, resumed)
        assert resumed.get_last_lr() == scheduler.get_last_lr()
        assert [g["lr"] for g in resumed_optimizer.param_groups] == [g["lr"] for g in optimizer.param_groups]
        assert resumed.last_epoch == scheduler.last_epoch
        assert scheduler.get_last_lr()[0] == pytest.approx(t.lr * lr_factor(scheduler.last_epoch, t))


# ------------------------------------------------------------------------------------------ optimizer


def test_weight_decay_only_on_matrices():
    model = Tiny()
    t = train(weight_decay=0.05, beta1=0.8, beta2=0.9)
    optimizer = build_optimizer(model, t)
    assert isinstance(optimizer, torch.optim.AdamW)
    decay_of = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert id(p) not in decay_of, "a parameter is in two groups"
            decay_of[id(p)] = group["weight_decay"]
        assert group["betas"] == (0.8, 0.9) and group["lr"] == t.lr
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(decay_of) == len(trainable)
    assert id(model.frozen) not in decay_of
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert decay_of[id(p)] == (0.05 if p.ndim >= 2 else 0.0), name


def test_weight_decay_effect_on_a_step():
    """With zero gradients AdamW's update is pure decoupled decay: p <- p * (1 - lr * wd) on matrices only."""
    model = Tiny()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(2.0)
    t = train(weight_decay=0.5, lr=0.1)
    optimizer = build_optimizer(model, t)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    assert torch.allclose(model.proj.weight, torch.full_like(model.proj.weight, 2.0 * (1 - 0.1 * 0.5)))
    assert torch.allclose(model.table, torch.full_like(model.table, 2.0 * (1 - 0.1 * 0.5)))
    assert torch.equal(model.proj.bias, torch.full_like(model.proj.bias, 2.0))
    assert torch.equal(model.norm_weight, torch.full_like(model.norm_weight, 2.0))


def test_llm_norms_are_not_decayed():
    from models.llm.model import LLMConfig, Transformer

    model = Transformer(LLMConfig(dim=16, n_layers=1, n_heads=2, vocab_size=32, multiple_of=16))
    optimizer = build_optimizer(model, train())
    no_decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in no_decay) == name.endswith("norm.weight"), name
