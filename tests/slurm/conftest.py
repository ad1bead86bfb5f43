"""A real Slurm for the tests: slurm/local-cluster.sh brings up munge, slurmctld and two slurmd
nodes (n1, n2) on this machine, and takes them down again if it had to start them."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY, tiny_overrides

CLUSTER = REPO / "slurm" / "local-cluster.sh"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}
# The tiny test config for every Slurm run here: 16 steps, so that a signal sent at step 3 lands
# mid-run, and a micro-batch that divides the global batch of 8 over 2 or 4 ranks.
STEPS = 16
RUN = (f"train.steps={STEPS}", "train.micro_batch_size=2")


@pytest.fixture(scope="session")
def slurm_cluster():
    was_up = subprocess.run(["bash", str(CLUSTER), "status"], capture_output=True, timeout=60).returncode == 0
    if os.geteuid() == 0:
        up = subprocess.run(["bash", str(CLUSTER), "up"], capture_output=True, text=True, timeout=600)
        if up.returncode != 0:
            pytest.fail(f"slurm/local-cluster.sh up failed:\n{up.stdout}{up.stderr}")
    elif not was_up:
        pytest.skip("the local Slurm cluster is not up and starting it needs root: sudo slurm/local-cluster.sh up")
    yield
    if not was_up:
        subprocess.run(["bash", str(CLUSTER), "down"], capture_output=True, timeout=120)


def cli(*args: str, env: dict | None = None, cwd: Path = REPO, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ if env is None else env, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "launcher", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def sets(run_dir: Path, cache: Path, *extra: str) -> list[str]:
    return [a for o in tiny_overrides(run_dir, cache, *RUN, *extra) for a in ("--set", o)]


def submit(run_dir: Path, cache: Path, *args: str, extra: tuple[str, ...] = ()) -> list[str]:
    """`shardwright submit configs/llm/tiny.yaml ARGS` with the test overrides; the job ids."""
    result = cli("submit", str(TINY), *args, *sets(run_dir, cache, *extra))
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.match(r"submitted jobs? ([\d, ]+)", result.stdout)
    assert match, result.stdout
    return [j.strip() for j in match.group(1).split(",")]


def job_info(job_id: str) -> dict[str, str]:
    line = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                          timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S*)", line))


def wait_for_job(job_id: str, run_dir: Path, timeout_s: float, restarts: int = 0) -> dict[str, str]:
    """Wait until the job has ended (after at least `restarts` requeues); scancel it on timeout."""
    deadline = time.monotonic() + timeout_s
    info: dict[str, str] = {}
    while time.monotonic() < deadline:
        info = job_info(job_id)
        if info.get("JobState") in TERMINAL and int(info.get("Restarts", 0)) >= restarts:
            return info
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], timeout=30)
    raise AssertionError(f"job {job_id} did not end within {timeout_s} s ({info.get('JobState')}); "
                         f"log:\n{log_of(run_dir, job_id)[-4000:]}")


def wait_for_step(run_dir: Path, job_id: str, step: int, timeout_s: float) -> None:
    """Wait until the run has logged `step` (the trainer is in its loop, signal handlers installed)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if step in losses_of(run_dir):
            return
        if job_info(job_id).get("JobState") in TERMINAL:
            break
        time.sleep(0.2)
    subprocess.run(["scancel", job_id], timeout=30)
    raise AssertionError(f"job {job_id} did not reach step {step}; log:\n{log_of(run_dir, job_id)[-4000:]}")


def log_of(run_dir: Path, job_id: str) -> str:
    path = run_dir / "slurm" / f"job-{job_id}.out"
    return path.read_text() if path.exists() else f"(no log at {path})"


def losses_of(run_dir: Path) -> dict[int, float]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="session")
def local_losses(tmp_path_factory, data_cache) -> dict[int, float]:
    """The same config trained locally by one process: the reference (a run's losses do not depend on
    its layout; tests/distributed holds that for every layout)."""
    run_dir = tmp_path_factory.mktemp("local") / "run"
    result = cli("train", str(TINY), *sets(run_dir, data_cache))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    losses = losses_of(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses
