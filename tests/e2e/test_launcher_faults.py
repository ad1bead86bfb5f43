"""Faults injected into real `shardwright train --nproc-per-node 2` worlds: signals to the launcher, to its
torchrun and to one worker, SIGKILL of each of them, a second run on a locked run directory, a worker
killed mid-run and the world restarted. Expected: exit 75 after a stop signal (with a checkpoint), one
line, no process left behind, and a restarted world ending with the losses of an uninterrupted run.

FAULTS counts what was injected; the module prints it at its end (run with -s to see it)."""
import collections
import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY
from tests.e2e.test_cli import losses_of, sets, shardwright

FAULTS: collections.Counter = collections.Counter()
WORLD = ["train.global_batch_size=8", "train.micro_batch_size=4"]


@pytest.fixture(scope="module", autouse=True)
def fault_report():
    yield
    print(f"\nfaults injected: {dict(FAULTS)}")


@pytest.fixture(autouse=True)
def no_leftovers():
    """A failed test must not leave its world training: SIGKILL whatever of it still runs."""
    yield
    for launch in Launch.started:
        if launch.proc.poll() is None:
            for pid in [*descendants(launch.proc.pid), launch.proc.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            launch.proc.wait()
    Launch.started.clear()


class Launch:
    """`shardwright train --nproc-per-node 2` running in the background, its output in files."""

    started: list["Launch"] = []

    def __init__(self, tmp_path: Path, run_dir: Path, cache: Path, *extra: str):
        self.run_dir, self.out, self.err = run_dir, tmp_path / f"{run_dir.name}.out", tmp_path / f"{run_dir.name}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "launcher", "train", str(TINY), "--nproc-per-node", "2",
                 *sets(run_dir, cache, *WORLD, *extra)],
                cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=out, stderr=err)
        Launch.started.append(self)

    def wait_for_step(self, step: int, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not (self.run_dir / "metrics.jsonl").exists() or max(losses_of(self.run_dir), default=0) < step:
            assert self.proc.poll() is None, self.err.read_text()[-3000:]
            assert time.monotonic() < deadline, f"no step {step} within {timeout}s"
            time.sleep(0.2)

    def torchrun(self) -> int:
        (pid,) = children(self.proc.pid)
        return pid

    def workers(self) -> dict[int, int]:
        """rank -> pid"""
        return {int(environ(pid)["RANK"]): pid for pid in children(self.torchrun())}

    def finish(self, timeout: float = 300) -> int:
        return self.proc.wait(timeout)


def children(pid: int) -> list[int]:
    try:
        return [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
                for c in (task / "children").read_text().split()]
    except FileNotFoundError:  # it has ended
        return []


def descendants(pid: int) -> list[int]:
    return [d for child in children(pid) for d in (child, *descendants(child))]


def environ(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")
    return dict(e.split("=", 1) for e in entries if "=" in e)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def assert_all_gone(pids: list[int], within: float) -> None:
    deadline = time.monotonic() + within
    while any(alive(p) for p in pids):
        assert time.monotonic() < deadline, f"still running {within}s later: {[p for p in pids if alive(p)]}"
        time.sleep(0.2)


def assert_unlocked(run_dir: Path) -> None:
    with open(run_dir / ".lock") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if anyone still holds it


def assert_stopped_with_checkpoint(launch: Launch, signal_name: str) -> None:
    stdout, stderr = launch.out.read_text(), launch.err.read_text()
    assert f"{signal_name} received: stopped after step" in stdout, stdout[-2000:] + stderr[-2000:]
    assert "Traceback" not in stderr and "error:" not in stderr, stderr[-3000:]
    assert (launch.run_dir / "checkpoints" / "latest").read_text().startswith("step-")


def test_stop_signal_to_the_launcher_and_a_second_run(tmp_path, data_cache):
    """Ctrl-C (SIGINT) to the launcher: the world checkpoints and the launcher exits 75. While it runs, a
    second run on its directory is refused naming the launcher, and `submit --dry-run` is not blocked."""
    launch = Launch(tmp_path, tmp_path / "run", data_cache, "train.steps=1000")
    launch.wait_for_step(1)
    pids = [launch.proc.pid, launch.torchrun(), *launch.workers().values()]

    second = shardwright("train", str(TINY), *sets(launch.run_dir, data_cache, *WORLD, "train.steps=1000"))
    FAULTS["second run on a locked run directory"] += 1
    assert second.returncode == 2, second.stderr[-3000:]
    errors = [line for line in second.stderr.splitlines() if "error:" in line]
    assert errors == [f"error: run directory {launch.run_dir} is in use by another run (host {socket.gethostname()} "
                      f"pid {launch.proc.pid}): wait for it to end or stop it, or set another run.dir"], second.stderr
    dry = shardwright("submit", str(TINY), "--nodes", "1", "--gpus-per-node", "2", "--device", "cpu", "--dry-run",
                      *sets(launch.run_dir, data_cache, *WORLD, "train.steps=1000"))
    assert dry.returncode == 0, dry.stderr[-3000:]

    launch.proc.send_signal(signal.SIGINT)
    FAULTS["SIGINT to the launcher"] += 1
    assert launch.finish() == 75
    assert_stopped_with_checkpoint(launch, "SIGTERM")  # forwarded as SIGTERM
    assert_all_gone(pids, within=5)
    assert_unlocked(launch.run_dir)


@pytest.mark.parametrize("target", ["torchrun", "worker"])
def test_stop_signal_to_torchrun_or_one_worker(tmp_path, data_cache, target):
    """SIGUSR1 (Slurm's time-limit warning) to torchrun, or SIGTERM to rank 1 alone: every rank stops after
    the same step with a checkpoint, and the launcher exits 75 without a torchrun traceback."""
    launch = Launch(tmp_path, tmp_path / "run", data_cache, "train.steps=1000")
    launch.wait_for_step(1)
    pids = [launch.proc.pid, launch.torchrun(), *launch.workers().values()]
    if target == "torchrun":
        os.kill(launch.torchrun(), signal.SIGUSR1)
        FAULTS["SIGUSR1 to torchrun"] += 1
    else:
        os.kill(launch.workers()[1], signal.SIGTERM)
        FAULTS["SIGTERM to one worker"] += 1
    assert launch.finish() == 75, launch.err.read_text()[-3000:]
    assert_stopped_with_checkpoint(launch, "SIGUSR1" if target == "torchrun" else "SIGTERM")
    assert_all_gone(pids, within=5)


def test_a_stop_signal_without_checkpoints_does_not_ask_for_a_requeue(tmp_path, data_cache):
    """SIGTERM to the launcher of a run with checkpoint.enabled=false: the world stops after a step, but with nothing
    saved a requeue (exit 75) would start it again from step 0, forever; one line and exit 2 instead (torchrun itself
    exits 75 after any stop signal it forwarded)."""
    launch = Launch(tmp_path, tmp_path / "run", data_cache, "train.steps=1000", "checkpoint.enabled=false")
    launch.wait_for_step(1)
    pids = [launch.proc.pid, launch.torchrun(), *launch.workers().values()]
    launch.proc.send_signal(signal.SIGTERM)
    FAULTS["SIGTERM to the launcher, no checkpoints"] += 1
    assert launch.finish() == 2, launch.err.read_text()[-3000:]
    stderr = launch.err.read_text()
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert "SIGTERM received: stopped after step" in errors[0] and "without a checkpoint" in errors[0], errors
    assert "checkpoint.enabled=true" in errors[0]
    assert not (launch.run_dir / "checkpoints").exists()
    assert_all_gone(pids, within=5)


def catches(pid: int, sig: signal.Signals) -> bool:
    """Whether process `pid` runs `python -m launcher` (past its exec: a child forked but not yet exec'd shows its
    parent's handlers) with a handler of its own for `sig` (/proc's SigCgt mask)."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    mask = next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:"))
    return b"launcher" in command and bool(int(mask, 16) >> (sig - 1) & 1)


def starting_workers(launch: Launch) -> list[int]:
    """The workers of the launch's world that exist so far (none before its torchrun)."""
    agents = children(launch.proc.pid)
    return children(agents[0]) if len(agents) == 1 else []


def wait_until(condition, what: str, launch: Launch, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert launch.proc.poll() is None, launch.err.read_text()[-3000:]
        assert time.monotonic() < deadline, f"not {what} within {timeout}s"
        time.sleep(0.02)


@pytest.mark.parametrize("starting, checkpoints", [("launcher", "true"), ("workers", "false")])
def test_a_stop_signal_while_the_run_starts_is_one_line(tmp_path, data_cache, starting, checkpoints):
    """SIGTERM to the launcher while it starts (its imports, before any world), or while its workers start (once
    they can handle it, seconds before their first step): it ends the run at once, and one line says so, from the
    launcher or from rank 0, with exit 75 (nothing new saved: the same command starts again) or, with
    checkpoint.enabled=false, exit 2 (a requeue would start again from step 0). Before, the launcher died of it
    without a word, and a world of starting workers ended with exit 2 and no line at all."""
    launch = Launch(tmp_path, tmp_path / "run", data_cache, "train.steps=1000", f"checkpoint.enabled={checkpoints}")
    if starting == "launcher":
        wait_until(lambda: catches(launch.proc.pid, signal.SIGTERM), "handling SIGTERM", launch)
        pids = [launch.proc.pid]
    else:
        wait_until(lambda: len(workers := starting_workers(launch)) == 2
                   and all(catches(pid, signal.SIGTERM) for pid in workers), "two workers handling SIGTERM", launch)
        pids = [launch.proc.pid, launch.torchrun(), *launch.workers().values()]
    launch.proc.send_signal(signal.SIGTERM)
    FAULTS[f"SIGTERM to the launcher while the {starting} start"] += 1
    code = launch.finish()
    stderr = launch.err.read_text()
    said = [line for line in stderr.splitlines() if "before the first step" in line]
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(said) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert "SIGTERM received before the first step: stopped with nothing trained or saved" in said[0], said
    if checkpoints == "true":
        assert code == 75 and not errors, stderr[-3000:]
        assert "the last checkpoint is none (none saved yet); exit code 75" in said[0]
    else:
        assert code == 2 and errors == said, stderr[-3000:]
        assert said[0].startswith("error: ") and "(checkpoint.enabled=false)" in said[0]
    assert not (launch.run_dir / "checkpoints").exists() and not (launch.run_dir / "metrics.jsonl").exists()
    assert_all_gone(pids, within=5)


@pytest.mark.parametrize("victim", ["launcher", "torchrun"])
def test_sigkill_leaves_no_orphan(tmp_path, data_cache, victim):
    """SIGKILL of the launcher: its torchrun stops the world as a stop signal would. SIGKILL of torchrun:
    the workers die with it and the launcher says so in one line. Either way no worker outlives them and
    the run directory's lock is free again."""
    launch = Launch(tmp_path, tmp_path / "run", data_cache, "train.steps=1000")
    launch.wait_for_step(1)
    pids = [launch.proc.pid, launch.torchrun(), *launch.workers().values()]
    os.kill(launch.proc.pid if victim == "launcher" else launch.torchrun(), signal.SIGKILL)
    FAULTS[f"SIGKILL of the {victim}"] += 1
    code = launch.finish()
    if victim == "torchrun":
        assert code == 1
        errors = [line for line in launch.err.read_text().splitlines() if "error:" in line]
        assert len(errors) == 1 and "was killed by SIGKILL, and its workers with it" in errors[0], errors
        assert "Traceback" not in launch.err.read_text()
    assert_all_gone(pids, within=60)
    assert_unlocked(launch.run_dir)


def test_lost_rank_restarts_the_world_from_its_checkpoint(tmp_path, data_cache):
    """SIGKILL of rank 1 after the step-2 checkpoint, with run.max_restarts=1: the world restarts, resumes from
    the checkpoint and ends with the losses of an uninterrupted run."""
    extra = ["train.steps=6", "checkpoint.every=2"]
    reference = shardwright("train", str(TINY), *sets(tmp_path / "reference", data_cache, *WORLD, *extra))
    assert reference.returncode == 0, reference.stderr[-3000:]

    launch = Launch(tmp_path, tmp_path / "run", data_cache, *extra, "run.max_restarts=1")
    launch.wait_for_step(3)
    holder = (launch.run_dir / ".lock").read_text()
    os.kill(launch.workers()[1], signal.SIGKILL)
    FAULTS["SIGKILL of one worker (restarted)"] += 1
    assert launch.finish() == 0, launch.err.read_text()[-3000:]
    assert "resumed from" in launch.out.read_text()
    assert (launch.run_dir / ".lock").read_text() == holder  # the launcher held the lock through the restart
    want, got = losses_of(tmp_path / "reference"), losses_of(launch.run_dir)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5, 6]
    assert [got[s] for s in want] == pytest.approx([want[s] for s in want], rel=1e-5)
