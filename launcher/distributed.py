"""Where this process runs: an existing torchrun or srun world, a single process, or a local
torchrun world that the launcher starts itself."""
import datetime
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from launcher.processes import LAUNCHER_PID_ENV
from launcher.run_lock import HOLDER_ENV
from launcher.stop_signals import STOP_NOTE_ENV


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
    # A step of one task (an interactive `srun --pty bash`, a one-task job) is no world to join: its process runs
    # alone, and may start a local one (--nproc-per-node).
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return World(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)), "srun")
    return World(0, 1, 0, "single")


def all_reduce(tensor: torch.Tensor, group: dist.ProcessGroup | None = None, op=dist.ReduceOp.SUM) -> None:
    """dist.all_reduce in place, skipped over a group of one rank (the pipeline group without pp, the batch group of
    a tp-only layout, a one-process run): there is nothing to combine, yet each call costs a gloo round (~0.1 ms on
    CPU) or an NCCL launch, several times a step."""
    if dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)


def all_reduce_number(value: float, op=dist.ReduceOp.SUM, group: dist.ProcessGroup | None = None) -> float:
    """A Python number combined over `group` through a one-element tensor; in a group of one rank the number itself,
    where building that tensor and reading it back would be all the work."""
    if dist.get_world_size(group) == 1:
        return value
    tensor = torch.tensor(value)
    dist.all_reduce(tensor, op=op, group=group)
    return tensor.item()


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
        timeout = datetime.timedelta(seconds=timeout_s)
        if "TORCHELASTIC_RESTART_COUNT" in os.environ:
            # torchrun keeps one store for every restart of its world, and a restarted world's gloo then reads
            # the dead attempt's addresses from it and hangs (torch 2.13): each attempt gets keys of its own.
            env = os.environ
            store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world.world_size, timeout=timeout,
                                  is_master=env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" and world.rank == 0)
            dist.init_process_group(backend, store=dist.PrefixStore(f"attempt-{env['TORCHELASTIC_RESTART_COUNT']}", store),
                                    rank=world.rank, world_size=world.world_size, timeout=timeout)
        else:
            # A single process, or srun: the sbatch script sets MASTER_ADDR / MASTER_PORT.
            init_method = f"tcp://127.0.0.1:{_free_port()}" if world.launcher == "single" else "env://"
            dist.init_process_group(backend, init_method=init_method, rank=world.rank, world_size=world.world_size,
                                    timeout=timeout)
    return device


def launch_local_world(nproc: int, launcher_args: list[str], max_restarts: int, shutdown_timeout_s: int,
                       lock_fd: int | None, stop_note: str | None = None) -> int:
    """Re-run this command under torchrun (launcher/torchrun.py) with `nproc` local processes; return the
    world's exit code (0, 75 after a stop signal, 2 for bad input, 1 for a failure, each said in one line).

    SIGTERM, SIGINT and SIGUSR1 to this process are forwarded to torchrun (SIGINT as SIGTERM), which hands
    them to the workers: they checkpoint after their step and exit 75. torchrun runs in a session of its
    own, so a Ctrl-C reaches it once, through here. The run directory's lock (`lock_fd`) is inherited by
    torchrun: it stays held while either process lives. `stop_note`: a file the workers' rank 0 writes once it says
    how a stop ends the world (launcher/stop_signals.py)."""
    env = dict(os.environ)
    # Split the cores between workers instead of letting each one oversubscribe all of them.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env[LAUNCHER_PID_ENV] = str(os.getpid())
    if lock_fd is not None:
        env[HOLDER_ENV] = str(os.getpid())
    if stop_note is not None:
        env[STOP_NOTE_ENV] = stop_note
    cmd = [sys.executable, "-m", "launcher.torchrun", "--standalone", f"--nproc-per-node={nproc}",
           f"--max-restarts={max_restarts}", f"--shutdown-timeout={shutdown_timeout_s}",
           "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "-m", "launcher", *launcher_args]
    agent = subprocess.Popen(cmd, env=env, pass_fds=() if lock_fd is None else (lock_fd,), start_new_session=True)
    forwarded = {signal.SIGTERM: signal.SIGTERM, signal.SIGINT: signal.SIGTERM, signal.SIGUSR1: signal.SIGUSR1}
    previous = {sig: signal.signal(sig, lambda signum, _frame: agent.send_signal(forwarded[signum]))
                for sig in forwarded}
    try:
        code = agent.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code < 0:  # torchrun itself was killed: its workers died with it (launcher/processes.py)
        print(f"error: torchrun (pid {agent.pid}) was killed by {signal.Signals(-code).name}, and its workers with "
              f"it; run the same command to resume from the last checkpoint", file=sys.stderr, flush=True)
        return 1
    return code
