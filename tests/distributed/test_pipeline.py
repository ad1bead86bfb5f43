"""Pipeline parallelism: every schedule at pp=2, composed with TP and FSDP (up to 8 processes),
eval under PP, and checkpoints moved between pipeline layouts — all against one process."""
from pathlib import Path

import pytest

from tests.distributed.harness import run_world
from tests.distributed.hf_export import checkpoint_as_hf, export_and_check
from tests.distributed.runs import (RTOL, SAMPLE, assert_losses_differ, assert_same_losses, perturbed_lr,
                                    train_check)

STOP = "run.stop_at_step=5"
MICRO2 = "train.micro_batch_size=2"  # 8 / 2 = 4 micro-batches per step at dp=1
SCHEDULES = {  # name -> stages per rank
    "gpipe": 1, "1f1b": 1, "interleaved-1f1b": 2, "zero-bubble": 2, "zbv": 2, "dualpipev": 2,
}


def pp(schedule: str) -> list[str]:
    return ["parallel.pp=2", f"parallel.pp_schedule={schedule}", f"parallel.pp_stages_per_rank={SCHEDULES[schedule]}"]


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pp-runs")


@pytest.fixture(scope="module")
def two(runs_dir, data_cache):
    # Schedules that hold stages differently sample through the pipeline too: one stage per rank, looped, a V.
    sampled = {"1f1b", "interleaved-1f1b", "zbv"}
    runs = {name: ("tests.distributed.runs:pipeline_summary",
                   {"run_dir": str(runs_dir / name), "cache": str(data_cache),
                    "overrides": [*pp(name), MICRO2, *(SAMPLE if name in sampled else ())]}) for name in SCHEDULES}
    runs["layout"] = train_check(runs_dir / "layout", data_cache, *pp("1f1b"), MICRO2, "parallel.pp_layout=E,L1|L3,H",
                                 summary=True)
    runs["1f1b_lr_perturbed"] = train_check(runs_dir / "1f1b_lr_perturbed", data_cache, *pp("1f1b"), MICRO2,
                                            perturbed_lr())
    runs["pp2_stop"] = train_check(runs_dir / "pp2_to_pp1", data_cache, *pp("1f1b"), MICRO2, STOP)
    runs["pp2_stop_v1"] = train_check(runs_dir / "v1_to_v2", data_cache, *pp("1f1b"), MICRO2, STOP)
    runs["resume_v2"] = train_check(runs_dir / "v1_to_v2", data_cache, *pp("interleaved-1f1b"), MICRO2)
    for keep in (False, True):
        runs[f"outputs_kept_{keep}"] = ("tests.distributed.runs:pipeline_outputs_kept", {
            "run_dir": str(runs_dir / f"outputs_kept_{keep}"), "cache": str(data_cache),
            "overrides": [*pp("1f1b"), MICRO2, "run.stop_at_step=2"], "keep": keep})
    results = run_world(2, list(runs.values()), runs_dir / "world2")
    # The outputs-kept checks report from rank 1, which holds 1F1B's last stage (and the logits).
    return {name: r.value(1 if name.startswith("outputs_kept") else 0) for name, r in zip(runs, results)}


@pytest.fixture(scope="module")
def four(runs_dir, data_cache, two):
    runs = {
        "pp2_tp2": train_check(runs_dir / "pp2_tp2", data_cache, *pp("1f1b"), "parallel.tp=2", MICRO2, *SAMPLE,
                               summary=True),
        "pp2_dp2": train_check(runs_dir / "pp2_dp2", data_cache, *pp("1f1b"), "parallel.dp_shard=2", MICRO2,
                               summary=True),
        "pp2_tp2_interleaved": train_check(runs_dir / "pp2_tp2_i", data_cache, *pp("interleaved-1f1b"),
                                           "parallel.tp=2", MICRO2, summary=True),
    }
    results = run_world(4, list(runs.values()), runs_dir / "world4")
    return dict(zip(runs, (r.value() for r in results)))


@pytest.fixture(scope="module")
def eight(runs_dir, data_cache, four):
    check = train_check(runs_dir / "pp2_dp2_tp2", data_cache, *pp("1f1b"), "parallel.tp=2", "parallel.dp_shard=2",
                        MICRO2)
    return run_world(8, [check], runs_dir / "world8")[0].value()


@pytest.fixture(scope="module")
def one(runs_dir, data_cache, two):
    return run_world(1, [train_check(runs_dir / "pp2_to_pp1", data_cache)], runs_dir / "world1")[0].value()


@pytest.mark.parametrize("schedule", list(SCHEDULES) + ["layout"])
def test_every_schedule_matches_one_process(two, reference, schedule):
    assert_same_losses(two[schedule]["losses"], reference["losses"])


# The torch schedule class each parallel.pp_schedule must run (torch.distributed.pipelining.schedules).
SCHEDULE_CLASSES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B", "interleaved-1f1b": "ScheduleInterleaved1F1B",
                    "zero-bubble": "ScheduleInterleavedZeroBubble", "zbv": "ScheduleZBVZeroBubble",
                    "dualpipev": "ScheduleDualPipeV"}


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_each_schedule_runs_as_its_own_torch_schedule(two, schedule):
    """The parity above cannot tell schedules apart (any schedule gives the same losses): each run's steps went
    through the torch schedule its name stands for."""
    assert two[schedule]["schedules"] == [SCHEDULE_CLASSES[schedule]]


def test_the_last_stage_keeps_no_micro_batch_outputs(two, reference_losses):
    """The schedule is told not to return its outputs, so the last stage drops each micro-batch's logits after
    its loss instead of holding all of them until the step ends; told to return them (torch's default), the
    same measure finds all 4 micro-batches' outputs held, with the same losses."""
    kept, control = two["outputs_kept_False"], two["outputs_kept_True"]
    assert kept["most_kept"] == 0 and control["most_kept"] == 4
    assert_same_losses(kept["losses"], reference_losses[:2])
    assert_same_losses(control["losses"], reference_losses[:2])


def test_perturbed_run_fails_the_comparison(two, reference_losses):
    """Negative control: 1F1B with the learning rate off by LR_PERTURBATION does not match."""
    assert_losses_differ(two["1f1b_lr_perturbed"], reference_losses)


@pytest.mark.parametrize("schedule", ["1f1b", "interleaved-1f1b", "zbv"])
def test_greedy_sample_through_the_pipeline_matches_one_process(two, reference, schedule):
    sample = two[schedule]["sample"]
    assert sample and sample.startswith("The with statement") and sample == reference["sample"]


def test_greedy_sample_through_pipeline_and_tp_matches_one_process(four, reference):
    assert four["pp2_tp2"]["sample"] == reference["sample"]


@pytest.mark.parametrize("schedule", ["1f1b", "zero-bubble", "zbv", "dualpipev"])
def test_eval_under_pipeline_matches_one_process(two, reference, schedule):
    assert abs(two[schedule]["eval_loss"] - reference["eval_loss"]) <= RTOL * reference["eval_loss"]


@pytest.mark.parametrize("run", ["pp2_tp2", "pp2_dp2", "pp2_tp2_interleaved"])
def test_pipeline_with_tp_and_fsdp_matches_one_process(four, reference_losses, run):
    assert_same_losses(four[run]["losses"], reference_losses)


def test_pp_dp_tp_on_eight_processes_matches_one_process(eight, reference_losses):
    assert_same_losses(eight, reference_losses)


def test_pp2_checkpoint_resumes_on_one_process(two, one, reference_losses):
    assert_same_losses(two["pp2_stop"], reference_losses[:5])
    assert_same_losses(one, reference_losses[5:])


def test_checkpoint_resumes_with_a_different_virtual_stage_count(two, reference_losses):
    assert_same_losses(two["pp2_stop_v1"], reference_losses[:5])
    assert_same_losses(two["resume_v2"], reference_losses[5:])


def test_hf_export_of_the_pp2_tp2_checkpoint_computes_its_logits(four, runs_dir, tmp_path):
    """`convert to-hf` of the pp2 x tp2 run's checkpoint (10 steps) loads it whole into one process (DCP reshards
    the stage- and tp-sharded tensors) and writes exactly the checkpoint's tensors (read straight from DCP and
    mapped by the same adapter: bit-identical, fp32); transformers' LlamaForCausalLM loaded from it computes our
    logits. Control: the pp2 x dp2 run's tensors (the same training under another layout, equal to rounding)
    fail the bitwise comparison."""
    import torch

    exported = export_and_check(runs_dir / "pp2_tp2", tmp_path / "hf")
    other_layout = checkpoint_as_hf(runs_dir / "pp2_dp2")
    assert not all(torch.equal(exported[name], tensor) for name, tensor in other_layout.items())
