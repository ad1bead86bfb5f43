"""Checkpoint writers whose write into one staging directory hits a file size limit (RLIMIT_FSIZE: the kernel
fails the write with EFBIG, as a full disk does with ENOSPC), in whichever process writes: the training process
for a synchronous save, DCP's writer process for an async one (which imports this module to unpickle it)."""
import resource
import signal
from pathlib import Path

from launcher.checkpoint import _BackgroundWriter, _ErrnoKeepingWriter

FULL_STAGING = ".staging-step-6"


class _FullDisk:
    def write_data(self, plan, planner):
        if Path(self.path).name != FULL_STAGING:
            return super().write_data(plan, planner)
        # EFBIG rather than the signal; both writers write on their process's main thread, which may set it
        previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        limits = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, limits[1]))
        try:
            return super().write_data(plan, planner)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, limits)
            signal.signal(signal.SIGXFSZ, previous)


class FullDiskWriter(_FullDisk, _ErrnoKeepingWriter):
    pass


class FullDiskBackgroundWriter(_FullDisk, _BackgroundWriter):
    pass
