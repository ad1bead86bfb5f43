"""One run writes a run directory at a time: an flock on <run.dir>/.lock, held for the run's life.

The lock is held by the process at the root of the run: `shardwright train --nproc-per-node N` (and
the torchrun it starts, which inherits the descriptor, so the lock outlives neither and survives the
world's restarts), else rank 0. The kernel releases it when its holders die, so nothing is left to
clean up after a crash, and a requeued Slurm job (its predecessor dead) takes it again. The file
names the holder (host, pid) for the message that refuses a second run.
"""
import fcntl
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist

from launcher.errors import UserError

LOCK_FILE = ".lock"
# Set by a launcher that holds the lock for the world it starts: the holder's pid.
HOLDER_ENV = "SHARDWRIGHT_RUN_LOCK_HOLDER"

_held: dict[Path, int] = {}  # lock file -> descriptor, for the life of this process


def _lock_path(run_dir: str | Path) -> Path:
    return Path(run_dir).expanduser().resolve() / LOCK_FILE


def _holder(fd: int) -> str:
    text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    return text or "a process that has not yet written its name"


def hold_run_lock(run_dir: str | Path) -> int:
    """Lock run_dir (creating it) for the rest of this process's life; return the lock's descriptor.
    Another run holding it is refused with one line naming it."""
    path = _lock_path(run_dir)
    if path in _held:
        return _held[path]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise UserError(f"run directory {path.parent} is in use by another run ({holder}): wait for it to end or "
                        f"stop it, or set another run.dir") from None
    except OSError as e:
        os.close(fd)
        raise UserError(f"cannot lock {path} ({e.strerror}): its file system has no flock; set run.lock=false "
                        f"to run without the lock (nothing then stops two runs writing {path.parent})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
    _held[path] = fd
    return fd


def held_by_launcher(run_dir: str | Path) -> bool:
    """Whether the launcher that started this world holds run_dir's lock (HOLDER_ENV names its pid, which
    the lock file names too, and the file is locked)."""
    holder_pid = os.environ.get(HOLDER_ENV)
    path = _lock_path(run_dir)
    if holder_pid is None or not path.is_file():
        return False
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        names_launcher = _holder(fd).endswith(f" pid {holder_pid}")
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return names_launcher
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def lock_for_world(run_dir: str | Path, enabled: bool) -> None:
    """Rank 0 takes run_dir's lock unless the launcher holds it; every rank learns whether it could, so
    all stop together (rank 0 with the message)."""
    if not enabled:
        return
    problem = ""
    if dist.get_rank() == 0 and not held_by_launcher(run_dir):
        try:
            hold_run_lock(run_dir)
        except UserError as e:
            problem = str(e)
    refused = torch.tensor(int(bool(problem)))
    dist.all_reduce(refused)
    if refused:
        raise UserError(problem or f"rank 0 could not lock run directory {run_dir}")
