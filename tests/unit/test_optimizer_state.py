"""launcher/checkpoint.py OptimizerState: param-group options saved once per named group, loaded back onto every
parameter; checkpoints with torch's per-parameter options still load."""
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

from launcher.checkpoint import Checkpointer, OptimizerState
from launcher.config import TrainSection
from launcher.convert import one_process_world
from launcher.optim import build_optimizer, build_scheduler


class Stage(nn.Module):
    """A linear layer and a norm, under names of their own (as pipeline stages' parameters are)."""

    def __init__(self, name: str, d_in: int, d_out: int):
        super().__init__()
        self.layers = nn.ModuleDict({name: nn.Sequential(nn.Linear(d_in, d_out), nn.LayerNorm(d_out))})

    def forward(self, x):
        return next(iter(self.layers.values()))(x)


def run(lr: float = 1e-2, steps: int = 3, **train):
    """Two parts (as two pipeline stages) with their AdamWs after `steps` scheduled steps (0: untrained)."""
    torch.manual_seed(0)
    parts = [Stage("first", 8, 16), Stage("second", 16, 4)]
    t = TrainSection(**{"steps": 10, "warmup_steps": 2, "lr": lr, "weight_decay": 0.1, **train})
    optimizers = [build_optimizer(part, t) for part in parts]
    schedulers = [build_scheduler(opt, t) for opt in optimizers]
    for _ in range(steps):
        parts[1](parts[0](torch.randn(5, 8))).pow(2).sum().backward()
        for opt, scheduler in zip(optimizers, schedulers):
            opt.step()
            opt.zero_grad()
            scheduler.step()
    return parts, optimizers


def torch_flattened(parts, optimizers) -> dict:
    """torch's own flattened form: every option once per parameter."""
    options = StateDictOptions(flatten_optimizer_state_dict=True)
    return {k: v for part, opt in zip(parts, optimizers)
            for k, v in get_optimizer_state_dict(part, opt, options=options).items()}


def assert_same_optimizers(got, want):
    for a, b in zip(got, want, strict=True):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa["param_groups"] == sb["param_groups"]
        for index, slots in sb["state"].items():
            for slot, value in slots.items():
                assert torch.equal(sa["state"][index][slot], value), (index, slot)


def test_options_are_saved_once_per_group_name_and_load_onto_every_parameter():
    parts, optimizers = run()
    saved = OptimizerState(parts, optimizers).state_dict()
    options = {k: v for k, v in saved.items() if not isinstance(v, torch.Tensor)}
    per_parameter = {k: v for k, v in torch_flattened(parts, optimizers).items() if not isinstance(v, torch.Tensor)}
    names = {k.split(".")[1] for k in options}
    assert names == {"decayed", "not_decayed"} and all(k.startswith("param_group_options.") for k in options)
    n_options = len(optimizers[0].param_groups[0]) - 1  # all but "params"
    assert len(options) == 2 * n_options and len(per_parameter) == 8 * n_options  # 8 parameters, 2 group names
    assert saved["param_group_options.decayed.weight_decay"] == 0.1
    assert saved["param_group_options.not_decayed.weight_decay"] == 0.0

    new_parts, new_optimizers = run(lr=5e-2, steps=0)  # other lr: the loaded options must replace it
    OptimizerState(new_parts, new_optimizers).load_state_dict(saved)
    assert_same_optimizers(new_optimizers, optimizers)
    # Negative control: a saved option changed is what the loaded groups hold, so the comparison sees it.
    saved["param_group_options.decayed.lr"] *= 2
    OptimizerState(new_parts, new_optimizers).load_state_dict(saved)
    decayed = [g for g in new_optimizers[0].param_groups if g["weight_decay"] == 0.1]
    assert decayed and all(g["lr"] == saved["param_group_options.decayed.lr"] for g in decayed)
    with pytest.raises(AssertionError):
        assert_same_optimizers(new_optimizers, optimizers)


def test_a_resume_applies_the_configs_weight_decay_and_betas_and_keeps_the_rest():
    """train.weight_decay / beta1 / beta2 changed for a resume are applied (config.yaml records them); options the
    config does not set come from the checkpoint (control: a changed saved eps is what the groups get)."""
    saved = OptimizerState(*run()).state_dict()
    saved["param_group_options.decayed.eps"] = 1e-6
    new_parts, new_optimizers = run(steps=0, weight_decay=0.5, beta1=0.5, beta2=0.6)
    OptimizerState(new_parts, new_optimizers).load_state_dict(saved)
    groups = [g for opt in new_optimizers for g in opt.param_groups]
    assert {(g["name"], g["weight_decay"], g["betas"]) for g in groups} == {("decayed", 0.5, (0.5, 0.6)),
                                                                             ("not_decayed", 0.0, (0.5, 0.6))}
    assert {g["name"]: g["eps"] for g in groups} == {"decayed": 1e-6, "not_decayed": 1e-8}


def test_a_resumed_schedule_applies_the_lr_it_reports():
    """The schedule loads after the optimizer, whose groups hold the saved run's lr: with a changed schedule (here
    train.steps) the next update uses the new schedule's lr, the one the step record logs."""
    from launcher.optim import Optimizers

    parts, _ = run(steps=0)
    old = Optimizers(parts, TrainSection(steps=10, warmup_steps=2, lr=1e-2))
    for _ in range(3):
        old.step()
    state = OptimizerState(parts, old.optimizers).state_dict()
    new = Optimizers(parts, TrainSection(steps=100, warmup_steps=2, lr=1e-2))
    OptimizerState(parts, new.optimizers).load_state_dict(state)
    new.schedule_state.load_state_dict(old.schedule_state.state_dict())
    applied = {g["lr"] for opt in new.optimizers for g in opt.param_groups}
    assert applied == {new.lr} and new.lr != old.lr


def test_state_saved_with_per_parameter_options_still_loads():
    parts, optimizers = run()
    legacy = {k: v for k, v in torch_flattened(parts, optimizers).items() if not k.endswith(".name")}  # before names
    new_parts, new_optimizers = run(lr=5e-2, steps=0)
    state = OptimizerState(new_parts, new_optimizers)
    state.per_parameter_options = True
    assert state.state_dict().keys() == legacy.keys()  # the template DCP reads such a checkpoint into
    state.load_state_dict(legacy)
    assert_same_optimizers(new_optimizers, optimizers)


def test_a_group_whose_parameters_disagree_is_an_error():
    parts, optimizers = run()
    optimizers[1].param_groups[0]["eps"] = 1e-6  # the second part's "decayed" group differs from the first's
    with pytest.raises(RuntimeError, match="param group 'decayed' has eps="):
        OptimizerState(parts, optimizers).state_dict()


def test_checkpointer_loads_a_checkpoint_of_either_form(tmp_path):
    """Through DCP files and Checkpointer.load, which tells the two forms apart by the checkpoint's keys."""
    parts, optimizers = run()
    with one_process_world(60):
        dcp.save({"optimizer": OptimizerState(parts, optimizers)}, checkpoint_id=tmp_path / "grouped")
        legacy = {k: v for k, v in torch_flattened(parts, optimizers).items() if not k.endswith(".name")}
        dcp.save({"optimizer": legacy}, checkpoint_id=tmp_path / "per-parameter")
        for form in ("grouped", "per-parameter"):
            new_parts, new_optimizers = run(lr=5e-2, steps=0)
            Checkpointer(tmp_path, keep_last=0, rank=0).load(tmp_path / form,
                                                              {"optimizer": OptimizerState(new_parts, new_optimizers)})
            assert_same_optimizers(new_optimizers, optimizers)
