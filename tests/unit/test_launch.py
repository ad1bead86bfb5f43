"""Launching: which world a process is in (launcher.distributed.detect_world, from what torchrun or srun set), and
what the local launcher says when its world stopped on a signal."""
import pytest

import launcher.cli
from launcher.cli import main
from launcher.distributed import World, detect_world
from launcher.errors import PREEMPTED_EXIT
from tests.conftest import TINY

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_STEP_ID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")


@pytest.mark.parametrize("env, world", [
    ({}, World(0, 1, 0, "single")),
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, World(3, 4, 1, "torchrun")),
    ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}, World(5, 8, 1, "srun")),
    # a step of one task (`srun --pty bash`): no world to join, so it may start a local one (--nproc-per-node)
    ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, World(0, 1, 0, "single")),
    ({"SLURM_JOB_ID": "7"}, World(0, 1, 0, "single")),  # the batch script itself, outside any step
], ids=["plain", "torchrun", "srun", "srun-one-task", "sbatch-script"])
def test_the_world_a_process_is_in(monkeypatch, env, world):
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert detect_world() == world


@pytest.mark.parametrize("saved", [False, True], ids=["before-the-first-step", "after-a-checkpoint"])
def test_a_world_stopped_before_its_first_step_says_so(tmp_path, capsys, monkeypatch, saved):
    """A signal that reached the workers while they started (before the trainer's handler): torchrun still exits 75
    (a requeue starts again, as it should), but no rank saved or said anything, so the launcher says it. The control:
    a world whose workers stopped after a checkpoint, which rank 0 reported, gets no such line."""
    run_dir = tmp_path / "run"

    def stopped_world(*_args):
        if saved:
            (run_dir / "checkpoints" / "step-3").mkdir(parents=True)
            (run_dir / "checkpoints" / "latest").write_text("step-3")
        return PREEMPTED_EXIT

    monkeypatch.setattr(launcher.cli, "launch_local_world", stopped_world)
    assert main(["train", str(TINY), "--nproc-per-node", "2", "--set", f"run.dir={run_dir}"]) == PREEMPTED_EXIT
    said = "stopped by a signal before the first step; nothing new was saved" in capsys.readouterr().err
    assert said != saved
