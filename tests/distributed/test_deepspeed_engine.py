"""parallel.engine=deepspeed: real ZeRO engines (DS_ACCELERATOR=cpu, gloo, dp=2, fp32) train the tiny config with the
torch engine's per-step losses (FSDP2 at dp=2, itself one process's: test_training.py) for ZeRO stages 1, 2 and 3,
with gradient accumulation and with optimizer / parameter offload; a run stopped and resumed from its DeepSpeed
checkpoint gives the uninterrupted run's losses; a torch run starts from that checkpoint (checkpoint.init_from) with
its weights. Needs deepspeed: `make test-extras` runs it, `make test` skips it."""
from pathlib import Path

import pytest

from tests.distributed.harness import run_world
from tests.distributed.runs import assert_losses_differ, assert_same_losses, perturbed_lr, train_check

pytest.importorskip("deepspeed")

MICRO = "train.micro_batch_size=4"  # no accumulation at dp=2 (global batch 8)
STOP = "run.stop_at_step=5"  # the schedule still spans 10 steps


def zero(stage: int, *more: str) -> list[str]:
    return ["parallel.engine=deepspeed", f"parallel.zero_stage={stage}", *more]


RUNS = {  # name -> (run directory, overrides, whole summary?)
    "fsdp2": ("fsdp2", [MICRO], False),
    "zero1": ("zero1", [MICRO, *zero(1)], False),
    "zero2": ("zero2", [MICRO, *zero(2)], False),
    "zero3": ("zero3", [MICRO, *zero(3)], True),
    "zero2_accum": ("zero2_accum", ["train.micro_batch_size=2", *zero(2)], False),
    "zero3_lr_perturbed": ("zero3_lr_perturbed", [MICRO, *zero(3), perturbed_lr()], False),
    "zero2_offload": ("zero2_offload", [MICRO, *zero(2, "parallel.offload_optimizer=true")], False),
    "zero3_offload": ("zero3_offload", [MICRO, *zero(3, "parallel.offload_optimizer=true",
                                                     "parallel.offload_params=true")], False),
    "zero3_stop_at_5": ("zero3_resume", [MICRO, *zero(3), STOP], False),
    "zero3_resume_to_10": ("zero3_resume", [MICRO, *zero(3)], False),
}


NAN_STEP = 3


def nan_gradients_run(run_dir: str, cache: str, overrides: list[str]) -> list[float]:
    """Check body: a run (train.nonfinite=skip) whose step NAN_STEP back-propagates NaN (its recorded loss stays
    finite): the engine must skip that update and go on; its losses (the skipped step left out)."""
    import torch

    from launcher.trainer import TrainStep
    from tests.distributed.runs import train_losses

    steps, forward_backward, loss_terms = [0], TrainStep.forward_backward, TrainStep.loss_terms

    def counting(self, micro_batches, backward=True):
        steps[0] += backward
        return forward_backward(self, micro_batches, backward)

    def poisoned(self, outputs, batch):
        loss = loss_terms(self, outputs, batch)
        return loss * float("nan") if steps[0] == NAN_STEP and torch.is_grad_enabled() else loss

    TrainStep.forward_backward, TrainStep.loss_terms = counting, poisoned
    try:
        return train_losses(run_dir, cache, [*overrides, "train.nonfinite=skip"])
    finally:
        TrainStep.forward_backward, TrainStep.loss_terms = forward_backward, loss_terms


def nan_check(run_dir: Path, cache: Path, *overrides: str) -> tuple[str, dict]:
    return ("tests.distributed.test_deepspeed_engine:nan_gradients_run",
            {"run_dir": str(run_dir), "cache": str(cache), "overrides": list(overrides)})


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache) -> dict:
    tmp = tmp_path_factory.mktemp("deepspeed-runs")
    checks = {name: train_check(tmp / run_dir, data_cache, *overrides, summary=summary)
              for name, (run_dir, overrides, summary) in RUNS.items()}
    # From zero3's final DeepSpeed checkpoint, a torch run with lr 0: its weights stay the imported ones, so its
    # final eval loss is zero3's.
    checks["imported"] = train_check(tmp / "imported", data_cache, MICRO, "train.steps=1", "train.lr=0.0",
                                     f"checkpoint.init_from={tmp / 'zero3' / 'checkpoints' / 'step-10' / 'deepspeed'}",
                                     summary=True)
    for name, overrides in (("fsdp2_nan", [MICRO]), ("zero2_nan", [MICRO, *zero(2)]), ("zero3_nan", [MICRO, *zero(3)])):
        checks[name] = nan_check(tmp / name, data_cache, *overrides)
    results = run_world(2, list(checks.values()), tmp / "world", timeout_s=900)
    return {"dir": tmp, **{name: result.value() for name, result in zip(checks, results)}}


@pytest.mark.parametrize("run", ["zero1", "zero2", "zero3", "zero2_accum", "zero2_offload", "zero3_offload"])
def test_zero_matches_the_torch_engine(runs, run):
    losses = runs[run]["losses"] if isinstance(runs[run], dict) else runs[run]
    assert_same_losses(losses, runs["fsdp2"])


def test_perturbed_run_fails_the_comparison(runs):
    """Negative control: ZeRO-3 with the learning rate off by LR_PERTURBATION does not match."""
    assert_losses_differ(runs["zero3_lr_perturbed"], runs["fsdp2"])


def test_stop_and_resume_matches_uninterrupted(runs):
    assert_same_losses(runs["zero3_stop_at_5"], runs["fsdp2"][:5])
    assert_same_losses(runs["zero3_resume_to_10"], runs["fsdp2"][5:])


def test_checkpoints_hold_deepspeeds_files_under_the_checksums(runs):
    import json

    step = Path(runs["dir"]) / "zero3_resume" / "checkpoints" / "step-10"
    recorded = json.loads((step / "meta.json").read_text())
    assert recorded["engine"] == "deepspeed-zero3"
    deepspeed_files = {name for name in recorded["files_sha256"] if name.startswith("deepspeed/")}
    assert {"deepspeed/latest", "deepspeed/zero/zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "deepspeed/zero/zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= deepspeed_files


def test_a_torch_run_starts_from_the_deepspeed_checkpoint(runs):
    assert runs["imported"]["eval_loss"] == pytest.approx(runs["zero3"]["eval_loss"], rel=1e-6)
    assert runs["imported"]["eval_loss"] < runs["fsdp2"][0] - 0.5  # trained weights, not the initialization's


def test_convert_refuses_a_deepspeed_checkpoint_with_one_line(runs, tmp_path, capsys):
    from launcher.cli import USER_ERROR_EXIT, main

    source = Path(runs["dir"]) / "zero3"
    assert main(["convert", "to-hf", str(source), str(tmp_path / "hf")]) == USER_ERROR_EXIT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was saved by engine deepspeed-zero3" in err
    assert f"checkpoint.init_from={source / 'checkpoints' / 'step-10' / 'deepspeed'}" in err


def test_resuming_with_another_engine_is_one_line(runs, data_cache):
    from launcher.config import load_config
    from launcher.errors import UserError
    from launcher.trainer import preflight
    from tests.conftest import TINY, tiny_overrides

    run_dir = Path(runs["dir"]) / "zero3"
    for world, overrides, message in (
            (2, [MICRO, "parallel.engine=torch"], "was saved by engine deepspeed-zero3, this run is torch"),
            (2, [MICRO, *zero(2)], "was saved by engine deepspeed-zero3, this run is deepspeed-zero2"),
            (4, ["train.micro_batch_size=2", *zero(3)], "holds DeepSpeed's per-rank files of 2 ranks")):
        with pytest.raises(UserError, match=message):
            preflight(load_config(TINY, tiny_overrides(run_dir, data_cache, *overrides)), world_size=world)


@pytest.mark.parametrize("run", ["zero2_nan", "zero3_nan"])
def test_a_nonfinite_step_is_skipped_as_by_the_torch_engine(runs, run):
    """DeepSpeed drops the update of a step with NaN gradients itself; the run records it as skipped and the
    schedule does not count it, as under FSDP2: the same losses, the skipped step left out."""
    assert len(runs["fsdp2_nan"]) == 9 and runs["fsdp2_nan"][:NAN_STEP - 1] == runs["fsdp2"][:NAN_STEP - 1]
    assert_losses_differ(runs["fsdp2_nan"], runs["fsdp2"][:NAN_STEP - 1] + runs["fsdp2"][NAN_STEP:])  # it did skip
    assert_same_losses(runs[run], runs["fsdp2_nan"])
