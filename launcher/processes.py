"""No process of a local world outlives the process that started it.

The launcher starts torchrun (launcher/torchrun.py), which starts the workers, each in a session of
its own (torchrun's choice): a signal to the launcher's process group never reaches them, and a
SIGKILL of a parent would leave its children running as orphans, training into the run directory.
So each child asks the kernel for a signal when its parent dies (Linux prctl PR_SET_PDEATHSIG).
"""
import ctypes
import os
import signal
import sys

from launcher.errors import UserError

# Set by the launcher for its torchrun, and by torchrun for its workers: the pid each one must die with.
LAUNCHER_PID_ENV = "SHARDWRIGHT_LAUNCHER_PID"
AGENT_PID_ENV = "SHARDWRIGHT_AGENT_PID"

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: signal.Signals, parent_pid: int) -> None:
    """Have the kernel send `sig` to this process when its parent (`parent_pid`) exits. If the parent is
    already gone (it died before this request), act on it now."""
    if not sys.platform.startswith("linux"):
        raise UserError(f"a local world needs Linux (prctl PR_SET_PDEATHSIG ties workers to their launcher), "
                      f"not {sys.platform}; start torchrun yourself or use Slurm")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), sig)
