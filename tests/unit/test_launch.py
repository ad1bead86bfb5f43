"""Launching: which world a process is in (launcher.distributed.detect_world, from what torchrun or srun set), and
what the local launcher says when its world stopped on a signal."""
import os
import signal
from pathlib import Path

import pytest

import launcher.cli
from launcher.cli import main
from launcher.distributed import World, detect_world
from launcher.errors import PREEMPTED_EXIT, USER_ERROR_EXIT
from launcher.stop_signals import STOP_SIGNALS, StartUp, StoppedBeforeFirstStep
from launcher.trainer import catch_stop_signals, release_stop_signals
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


@pytest.mark.parametrize("checkpoints", ["true", "false"])
@pytest.mark.parametrize("said", [False, True], ids=["workers-silent", "rank-0-said-it"])
def test_a_world_stopped_before_its_first_step_says_so(tmp_path, capsys, monkeypatch, said, checkpoints):
    """A signal that ended the workers while they started Python (before they could handle it): torchrun exits 75
    after any stop signal, but no rank said anything, so the launcher says it in one line, with exit 75 (a requeue
    starts again where the run was) or, without checkpoints, exit 2. The control: a world whose rank 0 had taken the
    signals over (it wrote the stop note: it says how a stop ends the world) gets no such line."""
    run_dir = tmp_path / "run"

    def stopped_world(*_args, stop_note):
        if said:
            Path(stop_note).write_text("rank 0 says how a stop signal ends this world\n")
        return PREEMPTED_EXIT

    monkeypatch.setattr(launcher.cli, "launch_local_world", stopped_world)
    code = main(["train", str(TINY), "--nproc-per-node", "2", "--set", f"run.dir={run_dir}",
                 "--set", f"checkpoint.enabled={checkpoints}"])
    assert code == (PREEMPTED_EXIT if checkpoints == "true" else USER_ERROR_EXIT)
    lines = [line for line in capsys.readouterr().err.splitlines() if "before the first step" in line]
    assert len(lines) == (0 if said else 1), lines
    if not said and checkpoints == "true":
        assert lines[0] == ("[shardwright] a stop signal arrived before the first step: stopped with nothing trained "
                            "or saved, the last checkpoint is none (none saved yet); exit code 75: run the same "
                            "command to start again")
    elif not said:
        assert lines[0] == ("error: a stop signal arrived before the first step: stopped with nothing trained or saved "
                            "(checkpoint.enabled=false); run the same command to start again")


def test_start_up_records_a_stop_signal_until_armed_then_ends_the_command_once(request):
    """launcher/stop_signals.py: before the config is known a stop signal is only recorded; arming acts on it (once:
    a second signal is only recorded); a stop whose exception was lost on the way (here: never raised) is found by
    the trainer when it takes the signals over; the handlers put back are the ones before the StartUp; a command
    other than train gets a recorded signal's usual effect."""
    seen = []
    for sig in STOP_SIGNALS:
        previous = signal.signal(sig, lambda signum, _frame: seen.append(signum))
        request.addfinalizer(lambda sig=sig, previous=previous: signal.signal(sig, previous))
    usual = signal.getsignal(signal.SIGTERM)

    start_up = StartUp().install()
    os.kill(os.getpid(), signal.SIGUSR1)
    assert start_up.received == [signal.SIGUSR1] and not seen
    with pytest.raises(StoppedBeforeFirstStep, match="SIGUSR1 received before the first step"):
        start_up.arm(says_stops=False)
    os.kill(os.getpid(), signal.SIGTERM)  # while the first one unwinds: recorded only
    assert start_up.received == [signal.SIGUSR1, signal.SIGTERM]
    start_up.release()
    assert signal.getsignal(signal.SIGTERM) is usual

    lost = StartUp().install()
    lost.received.append(signal.SIGTERM)
    with pytest.raises(StoppedBeforeFirstStep, match="SIGTERM"):
        catch_stop_signals()
    lost.release()
    taken = StartUp().install()
    taken.arm(says_stops=False)
    _received, handlers = catch_stop_signals()
    assert handlers[signal.SIGTERM] is usual  # after the loop: the usual effect, not the StartUp's
    release_stop_signals(handlers)

    other = StartUp().install()
    os.kill(os.getpid(), signal.SIGTERM)
    other.release(redeliver=True)
    assert seen == [signal.SIGTERM] and signal.getsignal(signal.SIGTERM) is usual
