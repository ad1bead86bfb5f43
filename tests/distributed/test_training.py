"""Run-level parity: the same tiny config under every data-parallel layout, with and without
gradient accumulation, and across a stop/resume (also onto a different dp size), gives the same
per-step losses as one process (fp32, relative difference <= 1e-5); with activation checkpointing
(full, selective) or compiled blocks, FSDP2 gives the plain FSDP2 run's losses. bf16 on CPU (autocast on
one process, FSDP2's parameter dtype on two) computes its matmuls in bf16 and stays close to fp32."""
from pathlib import Path

import pytest

from tests.distributed.harness import run_world
from tests.distributed.runs import assert_losses_differ, assert_same_losses, perturbed_lr, train_check, train_losses


def _world(nproc: int, tmp: Path, cache: Path, runs: dict[str, tuple[str, list[str]]]) -> dict[str, list[float]]:
    """Train each run (name -> (run directory name, overrides)) in one world of nproc ranks, in order; a run whose
    name ends in "_dtypes" also records the dtypes its linear layers computed in (train_dtypes)."""
    checks = [(dtypes_check if name.endswith("_dtypes") else train_check)(tmp / run_dir, cache, *overrides)
              for name, (run_dir, overrides) in runs.items()]
    results = run_world(nproc, checks, tmp / f"world{nproc}")
    return dict(zip(runs, (r.value() for r in results)))


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


STOP = "run.stop_at_step=5"  # the schedule still spans 10 steps


THIS = __name__
BF16 = "train.mixed_precision=bf16"
# bf16 against fp32, per-step losses of the 10-step tiny run: measured 1.2e-7 to 1.7e-5 relative on one process
# (autocast), up to 1.2e-4 at 20 steps on two (FSDP2); the bar leaves room for other CPUs' bf16 kernels.
BF16_RTOL = 2e-3


def train_dtypes(run_dir: str, cache: str, overrides: list[str]) -> dict:
    """Check body: train_losses, and the dtypes of what F.linear (every nn.Linear) computed during the run."""
    import torch.nn.functional as F

    real_linear, dtypes = F.linear, set()

    def linear(*args, **kwargs):
        out = real_linear(*args, **kwargs)
        dtypes.add(str(out.dtype))
        return out

    F.linear = linear
    try:
        losses = train_losses(run_dir, cache, overrides)
    finally:
        F.linear = real_linear
    return {"losses": losses, "linear_dtypes": sorted(dtypes)}


def dtypes_check(run_dir: Path, cache: Path, *overrides: str) -> tuple[str, dict]:
    return f"{THIS}:train_dtypes", {"run_dir": str(run_dir), "cache": str(cache), "overrides": list(overrides)}


def one_process_checks(workdir: Path, cache: Path) -> dict:
    return {"single_accum": train_check(workdir / "single_accum", cache, "train.micro_batch_size=2"),
            "single_fp32_dtypes": dtypes_check(workdir / "single_fp32_dtypes", cache),
            "single_bf16": dtypes_check(workdir / "single_bf16", cache, BF16)}


@pytest.fixture(scope="module")
def singles(one_process, reference_losses):
    return {"single": reference_losses, "single_accum": one_process["test_training:single_accum"].value()}


@pytest.fixture(scope="module")
def two_processes(runs_dir, data_cache, singles):
    return _world(2, runs_dir, data_cache, {
        "fsdp2": ("fsdp2", ["train.micro_batch_size=4"]),  # dp_shard=-1 fills the world
        "fsdp2_lr_perturbed": ("fsdp2_lr_perturbed", ["train.micro_batch_size=4", perturbed_lr()]),
        "fsdp2_ac_full": ("fsdp2_ac_full", ["train.micro_batch_size=4", "train.activation_checkpoint=full"]),
        "fsdp2_ac_selective": ("fsdp2_ac_selective", ["train.micro_batch_size=4",
                                                      "train.activation_checkpoint=selective"]),
        "fsdp2_compile": ("fsdp2_compile", ["train.micro_batch_size=4", "train.compile=true"]),
        "fsdp2_accum": ("fsdp2_accum", ["train.micro_batch_size=2"]),
        "stop_at_5": ("resume_same", ["train.micro_batch_size=4", STOP]),
        "resume_to_10": ("resume_same", ["train.micro_batch_size=4"]),
        "dp2_stop_at_5": ("resume_other", ["train.micro_batch_size=4", STOP]),
        "fsdp2_bf16_dtypes": ("fsdp2_bf16", ["train.micro_batch_size=4", BF16]),
    })


@pytest.fixture(scope="module")
def four_processes(runs_dir, data_cache, two_processes):
    return _world(4, runs_dir, data_cache, {
        "fsdp4": ("fsdp4", ["train.micro_batch_size=2"]),
        "hsdp_2x2": ("hsdp_2x2", ["parallel.dp_replicate=2", "train.micro_batch_size=2"]),
        "hsdp_2x2_accum": ("hsdp_2x2_accum", ["parallel.dp_replicate=2", "train.micro_batch_size=1"]),
        "ddp4": ("ddp4", ["parallel.dp_replicate=4", "parallel.dp_shard=1", "train.micro_batch_size=2"]),
        "resume_dp2_on_dp4": ("resume_other", ["train.micro_batch_size=2"]),
    })


def test_loss_falls(singles):
    losses = singles["single"]
    assert len(losses) == 10 and losses[-1] < losses[0] - 0.5


def test_gradient_accumulation_matches(singles):
    assert_same_losses(singles["single_accum"], singles["single"])


@pytest.mark.parametrize("run", ["fsdp2", "fsdp2_accum"])
def test_two_process_layouts_match_one_process(two_processes, singles, run):
    assert_same_losses(two_processes[run], singles["single"])


def test_perturbed_run_fails_the_comparison(two_processes, singles):
    """Negative control: FSDP2 with the learning rate off by LR_PERTURBATION does not match."""
    assert_losses_differ(two_processes["fsdp2_lr_perturbed"], singles["single"])


@pytest.mark.parametrize("run", ["fsdp2_ac_full", "fsdp2_ac_selective"])
def test_activation_checkpointing_matches_plain_run(two_processes, run):
    """Recomputing in backward under FSDP2 (which re-gathers the block's parameters for it) runs the
    same kernels on the same inputs: measured bitwise equal to the plain run."""
    assert_same_losses(two_processes[run], two_processes["fsdp2"])


def test_compiled_blocks_match_plain_run(two_processes):
    """Inductor's kernels reorder float ops: measured 1.6e-7 relative at most, well inside RTOL.
    The one compiled run of the suite: building its C++ kernels (for the training graph, and again
    for eval's no-grad forward) makes it ~35 s on a cold inductor cache with both cores free, vs
    ~4 s for the plain run (~6 s warm)."""
    assert_same_losses(two_processes["fsdp2_compile"], two_processes["fsdp2"])


@pytest.mark.parametrize("run", ["fsdp4", "hsdp_2x2", "hsdp_2x2_accum", "ddp4"])
def test_four_process_layouts_match_one_process(four_processes, singles, run):
    assert_same_losses(four_processes[run], singles["single"])


@pytest.mark.parametrize("run", ["single_bf16", "fsdp2_bf16"])
def test_bf16_on_cpu_computes_in_bf16_close_to_fp32(one_process, two_processes, singles, run):
    """train.mixed_precision=bf16 on CPU: autocast on one process, FSDP2's bf16 parameters on two. Every linear
    layer computes in bf16 (the fp32 run, the negative control, in fp32), and the losses stay within BF16_RTOL of
    fp32's."""
    result = (one_process[f"test_training:{run}"].value() if run == "single_bf16" else
              two_processes[f"{run}_dtypes"])
    assert result["linear_dtypes"] == ["torch.bfloat16"]
    assert one_process["test_training:single_fp32_dtypes"].value()["linear_dtypes"] == ["torch.float32"]
    fp32 = singles["single"]
    assert len(result["losses"]) == len(fp32)
    for step, (got, want) in enumerate(zip(result["losses"], fp32), start=1):
        assert abs(got - want) <= BF16_RTOL * abs(want), f"step {step}: bf16 {got} vs fp32 {want}"


def test_stop_and_resume_matches_uninterrupted(two_processes, singles):
    assert_same_losses(two_processes["stop_at_5"], singles["single"][:5])
    assert_same_losses(two_processes["resume_to_10"], singles["single"][5:])


def test_resume_on_a_different_dp_size(four_processes, two_processes, singles):
    assert_same_losses(two_processes["dp2_stop_at_5"], singles["single"][:5])
    assert_same_losses(four_processes["resume_dp2_on_dp4"], singles["single"][5:])
