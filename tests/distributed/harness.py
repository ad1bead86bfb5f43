"""Start a gloo world once and run many checks in it.

Spawning Python + torch costs seconds on a 2-core machine, so a test module describes its checks
up front, `run_world` starts `nproc` worker processes (each initializes one process group with a
timeout, so a deadlock fails instead of hanging), runs every check in order on every rank, and
returns each check's per-rank result or traceback. Tests then assert on those results.
"""
import json
import os
import pickle
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


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
               OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    procs, logs = [], []
    for rank in range(nproc):
        log = open(workdir / f"rank{rank}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tests.distributed.worker", str(spec), str(workdir / f"rank{rank}.pkl")],
            env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)), stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
    deadline = time.monotonic() + timeout_s
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
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
                result.errors[rank] = f"no result (exit code {p.returncode}, timed out or crashed); log tail:\n{tail}"
    return results


def name_of(target: str) -> str:
    return target.rpartition(":")[2]
