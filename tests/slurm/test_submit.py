"""`shardwright submit` on a real Slurm (slurm/local-cluster.sh: nodes n1 and n2 on this machine):
a 2-node job is preempted (checkpoints, requeues, resumes) and matches a local run, a chain of
jobs carries a run on, hostile values stay inert, and a bad layout never reaches sbatch."""
import os
import re
import shlex
import signal
import stat
import subprocess
from pathlib import Path

import pytest

from tests.conftest import TINY
from tests.slurm.conftest import (STEPS, cli, job_info, log_of, losses_of, sets, submit, wait_for_job,
                                  wait_for_step)

# Spaces, both quotes, command substitution, backticks and a command separator.
HOSTILE = "it's a \"run\" $(touch pwned) `touch pwned2`; x"


def assert_one_error_line(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def stub(bin_dir: Path, name: str, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_2_node_job_is_preempted_requeued_resumed_and_matches_a_local_run(tmp_path, data_cache, slurm_cluster,
                                                                         local_losses):
    """2 nodes x 2 processes (torchrun on each node): SIGUSR1 (what --signal sends) checkpoints and
    requeues the job, which resumes; its losses at every step equal a local run's."""
    run_dir = tmp_path / "run"
    [job] = submit(run_dir, data_cache, "--nodes", "2", "--gpus-per-node", "2")
    wait_for_step(run_dir, job, 3, timeout_s=180)
    subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=30)
    info = wait_for_job(job, run_dir, timeout_s=240, restarts=1)
    log = log_of(run_dir, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    assert info["NodeList"] == "n[1-2]" and info["NumNodes"] == "2", info
    assert "dp_shard=4 on 4 cpu process(es)" in log, log
    assert (run_dir / "slurm" / "job.sbatch").is_file() and (run_dir / "slurm" / "config.yaml").is_file()
    stopped = re.search(r"SIGUSR1 received: stopped after step (\d+); exit code 75", log)
    assert stopped and 3 <= int(stopped.group(1)) < STEPS, log
    assert f"requeueing job {job}" in log and "(restart 1)" in log, log
    assert f"resumed from {run_dir}/checkpoints/step-{stopped.group(1)} at step {stopped.group(1)}" in log, log
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step-{STEPS}"
    losses = losses_of(run_dir)
    assert losses[STEPS] == pytest.approx(local_losses[STEPS], rel=1e-5)
    assert losses == pytest.approx(local_losses, rel=1e-5)


def test_chain_continues_a_stopped_job(tmp_path, data_cache, slurm_cluster, local_losses):
    run_dir = tmp_path / "run"
    first, second = submit(run_dir, data_cache, "--nodes", "2", "--gpus-per-node", "2", "--chain", "2",
                           "--launcher", "srun")  # srun: one task per rank
    assert job_info(second)["Dependency"] == f"afterany:{first}(unfulfilled)"
    wait_for_step(run_dir, first, 3, timeout_s=180)
    subprocess.run(["scancel", "--signal=USR1", first], check=True, timeout=30)
    first_info = wait_for_job(first, run_dir, timeout_s=120)
    assert first_info["ExitCode"] == "75:0" and first_info["Restarts"] == "0", log_of(run_dir, first)
    assert wait_for_job(second, run_dir, timeout_s=180)["JobState"] == "COMPLETED", log_of(run_dir, second)
    assert "resumed from" in log_of(run_dir, second)
    assert losses_of(run_dir) == pytest.approx(local_losses, rel=1e-5)


def hostile_dry_run(tmp_path: Path, cache: Path) -> tuple[Path, Path]:
    run_dir = tmp_path / HOSTILE
    result = cli("submit", str(TINY), "--nodes", "2", "--gpus-per-node", "2", "--device", "cpu", "--dry-run",
                 "--job-name", HOSTILE, "--env", f"FOO={HOSTILE}", "--partition", "debug",
                 *sets(run_dir, cache), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not run_dir.exists()  # a dry run writes nothing
    script = tmp_path / "job.sbatch"
    script.write_text(result.stdout)
    return script, run_dir


def test_dry_run_script_quotes_hostile_values(tmp_path, data_cache):
    script, run_dir = hostile_dry_run(tmp_path, data_cache)
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert syntax.returncode == 0, syntax.stderr
    header = {line.split("=", 1)[0]: line.split("=", 1)[1] for line in script.read_text().splitlines()
              if line.startswith("#SBATCH --") and "=" in line}
    assert shlex.split(header["#SBATCH --job-name"]) == [HOSTILE]
    assert shlex.split(header["#SBATCH --output"]) == [f"{run_dir}/slurm/job-%j.out"]
    # Run the script with srun and scontrol stubbed: the values must arrive verbatim, nothing runs.
    bin_dir, out = tmp_path / "bin", tmp_path / "out"
    out.mkdir()
    stub(bin_dir, "srun", f'printf "%s\\0" "$@" > {out}/srun.args; printf "%s" "$FOO" > {out}/foo')
    stub(bin_dir, "scontrol", "echo n1")
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="n[1-2]", SLURM_JOB_ID="7",
               SLURM_JOB_NUM_NODES="2")
    ran = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    args = (out / "srun.args").read_text().split("\0")[:-1]
    assert args[-4:] == ["-m", "launcher", "train", f"{run_dir}/slurm/config.yaml"], args
    assert "--rdzv-endpoint=n1:20007" in args and "--nnodes=2" in args and "--nproc-per-node=2" in args, args
    assert (out / "foo").read_text() == HOSTILE
    assert not list(tmp_path.rglob("pwned*")) and not list(Path.cwd().glob("pwned*"))


def test_sbatch_reads_hostile_header_verbatim(tmp_path, data_cache, slurm_cluster):
    script, run_dir = hostile_dry_run(tmp_path, data_cache)
    job = subprocess.run(["sbatch", "--hold", "--parsable", str(script)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert job.returncode == 0, job.stderr
    job_id = job.stdout.strip()
    try:
        line = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                              timeout=30).stdout
    finally:
        subprocess.run(["scancel", job_id], timeout=30)
    assert f" JobName={HOSTILE} UserId=" in line, line
    assert f" StdOut={run_dir}/slurm/job-{job_id}.out " in line, line
    assert f" WorkDir={tmp_path} " in line and " Partition=debug " in line, line
    assert not list(tmp_path.rglob("pwned*"))


@pytest.mark.parametrize("layout, message", [
    ("parallel.dp_replicate=3", "world size 4 is not divisible by dp_replicate*cp*tp*pp = 3"),
    ("train.micro_batch_size=8", "must be a multiple of micro_batch_size x dp = 8 x 4"),
])
def test_impossible_layout_fails_before_sbatch(tmp_path, data_cache, layout, message):
    bin_dir = tmp_path / "bin"
    stub(bin_dir, "sbatch", f"touch {tmp_path}/sbatch-called; echo 1")
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    result = cli("submit", str(TINY), "--nodes", "2", "--gpus-per-node", "2",
                 *sets(tmp_path / "run", data_cache, layout), env=env)
    assert_one_error_line(result, message, "--nodes 2 x --gpus-per-node 2", "nothing was submitted")
    assert not (tmp_path / "sbatch-called").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, requeue", [((), "yes"), (("checkpoint.enabled=false",), "no")])
def test_a_stopped_job_requeues_only_with_checkpoints(tmp_path, data_cache, overrides, requeue):
    """A job stopped by a signal requeues itself to resume from its checkpoint; without checkpoints it would start
    over at step 0, again at every stop: the script leaves it ended."""
    result = cli("submit", str(TINY), "--nodes", "1", "--gpus-per-node", "2", "--device", "cpu", "--dry-run",
                 *sets(tmp_path / "run", data_cache, *overrides))
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stdout.splitlines() if line.startswith("REQUEUE=")] == [f"REQUEUE={requeue}"]


def test_a_chain_without_checkpoints_is_refused(tmp_path, data_cache):
    result = cli("submit", str(TINY), "--nodes", "1", "--gpus-per-node", "2", "--device", "cpu", "--dry-run",
                 "--chain", "2", *sets(tmp_path / "run", data_cache, "checkpoint.enabled=false"))
    assert_one_error_line(result, "--chain 2", "checkpoint.enabled=false", "nothing was submitted")


def test_missing_sbatch_is_one_clear_line(tmp_path, data_cache):
    result = cli("submit", str(TINY), "--nodes", "1", "--gpus-per-node", "2", *sets(tmp_path / "run", data_cache),
                 env=dict(os.environ, PATH="/nonexistent"))
    assert_one_error_line(result, "sbatch not found", "slurm/local-cluster.sh up", "--dry-run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("codes, want", [([75, -15], 75), ([2, -15], 2), ([1, -15], 1), ([-9, -15], 1),
                                         ("SIGTERM to the agent", 75)])
def test_a_nodes_exit_code_says_how_its_workers_ended(monkeypatch, request, codes, want):
    """torchrun exits 1 whenever a worker failed; the node's share of a job passes on a stop after a checkpoint
    (75: the job requeues) and a refusal (2: a worker printed its line) instead, and 1 for anything else. Slurm
    signals the node's torchrun as well as the workers: its agent raises SignalException once it has passed the
    signal on, and the job still requeues (it ended FAILED, exit 1, with a traceback)."""
    import torch.distributed.run
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from launcher.submit import torchrun_node

    def failed_run(_args):
        if isinstance(codes, str):
            raise SignalException("Process 1 got signal: 15", sigval=signal.SIGTERM)
        raise ChildFailedError("train", {rank: ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=code,
                                                              error_file="/nonexistent")
                                         for rank, code in enumerate(codes)})

    monkeypatch.setattr(torch.distributed.run, "run", failed_run)
    usr1 = signal.getsignal(signal.SIGUSR1)  # torchrun_node ignores it, for the agent
    request.addfinalizer(lambda: signal.signal(signal.SIGUSR1, usr1))
    assert torchrun_node(["--nproc-per-node", "2", "-m", "launcher", "train", "x.yaml"]) == want
