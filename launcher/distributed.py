"""Where this process runs: an existing torchrun or srun world, a single process, or a local
torchrun world that the launcher starts itself."""
import datetime
import os
import socket
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # torchrun | srun | single


def detect_world() -> World:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return World(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "torchrun")
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return World(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)), "srun")
    return World(0, 1, 0, "single")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(world: World, timeout_s: int) -> torch.device:
    """Join (or create) the process group: nccl on CUDA with gloo for CPU tensors, gloo on CPU."""
    if torch.cuda.is_available():
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        if world.launcher == "single":
            init_method = f"tcp://127.0.0.1:{_free_port()}"
        else:
            init_method = "env://"  # torchrun, or the sbatch script, sets MASTER_ADDR / MASTER_PORT
        dist.init_process_group(backend, init_method=init_method, rank=world.rank, world_size=world.world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return device


def launch_local_world(nproc: int, launcher_args: list[str]) -> int:
    """Re-run this command under torchrun with `nproc` local processes; return its exit code."""
    env = dict(os.environ)
    # Split the cores between workers instead of letting each one oversubscribe all of them.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "launcher", *launcher_args]
    return subprocess.run(cmd, env=env).returncode
