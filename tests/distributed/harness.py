"""Start a gloo world once and run many checks in it.

Spawning Python + torch costs seconds on a 2-core machine, so a test module describes its checks
up front, `run_world` starts `nproc` worker processes (each initializes one process group with a
timeout, so a deadlock fails instead of hanging), runs every check in order on every rank, and
returns each check's per-rank result or traceback. Tests then assert on those results.

Ranks are forked from one server process per test session that imported torch and the trainer once
(multiprocessing's forkserver): a fresh interpreter per rank spent seconds of CPU on those imports for
every world. Each rank still gets its own environment (rank, port, one thread), log file and exit.
"""
import json
import multiprocessing
import os
import pickle
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any



@dataclass
class CheckResult:
    name: str
    values: dict[int, Any] = field(default_factory=dict)  # rank -> return value
    errors: dict[int, str] = field(default_factory=dict)  # rank -> traceback

    def value(self, rank: int = 0) -> Any:
        """The check's return value on `rank`, failing the test with the traceback of any failed rank."""
        if self.errors:
            rank_, tb = next(iter(sorted(self.errors.items())))
            raise AssertionError(f"check {self.name} failed on rank {rank_}:\n{tb}")
        if rank not in self.values:
            raise AssertionError(f"check {self.name} produced no result on rank {rank}")
        return self.values[rank]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(nproc: int, checks: list[tuple[str, dict]], workdir: Path, timeout_s: float = 600,
              collective_timeout_s: int = 120) -> list[CheckResult]:
    """Run checks ("module:function", kwargs) in a fresh world of `nproc` ranks.

    Each check is called as function(**kwargs) on every rank, in the order given; the results
    come back in the same order.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    spec = workdir / "checks.json"
    spec.write_text(json.dumps({"checks": checks, "collective_timeout_s": collective_timeout_s}))
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(nproc),
               OMP_NUM_THREADS="1")
    procs = []
    for rank in range(nproc):
        procs.append(_forkserver().Process(target=run_rank, args=(
            dict(env, RANK=str(rank), LOCAL_RANK=str(rank)), str(spec), str(workdir / f"rank{rank}.pkl"),
            str(workdir / f"rank{rank}.log"))))
        procs[-1].start()
    deadline = time.monotonic() + timeout_s
    try:
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.exitcode is None:
                p.kill()
                p.join()
    results = [CheckResult(name_of(target)) for target, _ in checks]
    for rank, p in enumerate(procs):
        out = workdir / f"rank{rank}.pkl"
        done = pickle.loads(out.read_bytes()) if out.exists() else []
        for index, result in enumerate(results):
            if index < len(done):
                ok, payload = done[index]
                (result.values if ok else result.errors)[rank] = payload
            else:
                tail = (workdir / f"rank{rank}.log").read_text()[-3000:]
                result.errors[rank] = f"no result (exit code {p.exitcode}, timed out or crashed); log tail:\n{tail}"
    return results


_PRELOAD = ["torch", "torch.distributed.tensor", "torch.distributed.pipelining", "torch.distributed.checkpoint",
            "launcher.trainer", "tests.distributed.worker"]


def _forkserver():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)  # read when the server starts: the session's first world
    return context


def run_rank(env: dict, spec: str, out: str, log: str) -> None:
    """One rank, in a process forked from the server: its own environment, threads and log, then the checks."""
    import torch

    from tests.distributed.worker import main

    os.environ.clear()
    os.environ.update(env)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    torch.set_num_threads(int(env["OMP_NUM_THREADS"]))  # the server imported torch before this rank's env
    main(spec, out)


def name_of(target: str) -> str:
    return target.rpartition(":")[2]
