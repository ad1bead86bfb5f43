"""Stop signals before a run's first step.

SIGUSR1 (Slurm's warning before a time limit) and SIGTERM (preemption, scancel, the launcher of a local world) stop
a run. Once its training loop runs, the trainer records them and every rank stops after the same step, with a
checkpoint (launcher/trainer.py: catch_stop_signals). Before that, while `shardwright train` starts (Python's imports,
the preflight, the process group, the checkpoint's verification, the data, the model), a stop signal ends it at once,
as the signal's usual action would, but with one line and the documented exit code (docs/reliability.md): 75 with
checkpoints (nothing new was saved; the same command starts again where the run was), 2 with
checkpoint.enabled=false (nothing to resume from, and exit 75 would have a Slurm job requeue itself).

`StartUp` does it in two stages. The entry point (launcher/entry.py) installs it before the CLI's imports, which take
seconds: until the config is known a signal is only recorded. `arm` (the config known) acts on one recorded, and from
then on the handler raises StoppedBeforeFirstStep, which the CLI says (launcher/cli.py). Other commands get the usual
handlers back, and a signal recorded meanwhile its usual effect (`release(redeliver=True)`).

A worker of a local world (`train --nproc-per-node N`) tells its launcher, by writing the file STOP_NOTE_ENV names,
that its rank 0 says from here on how a stop ends the world. A stop that came earlier (the worker still starting
Python) killed the workers without a word, and then the launcher says it.
"""
import os
import signal
import threading
from pathlib import Path

from launcher.errors import PREEMPTED_EXIT, USER_ERROR_EXIT

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
STOP_NOTE_ENV = "SHARDWRIGHT_STOP_NOTE"  # set by the launcher of a local world for its workers


class StoppedBeforeFirstStep(BaseException):
    """A stop signal before the first step. A BaseException, as KeyboardInterrupt is, so that no `except Exception` on
    its way up (here or in a library) swallows it."""

    def __init__(self, signum: int):
        self.signal_name = signal.Signals(signum).name
        super().__init__(f"{self.signal_name} received before the first step")


class StartUp:
    """The stop signals of one command, from its start until the trainer takes them over."""

    def __init__(self):
        self.received: list[int] = []
        self.usual: dict = {}  # signal -> the handler before this one: what the trainer puts back after its loop
        self.armed = self.raised = False

    def install(self) -> "StartUp":
        if not self.usual and threading.current_thread() is threading.main_thread():  # Python sets handlers only there
            for sig in STOP_SIGNALS:
                self.usual[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum: int, _frame) -> None:
        self.received.append(signum)
        if self.armed:
            self._raise()

    def _raise(self) -> None:
        if not self.raised:  # once: a second signal while the first one unwinds is only recorded
            self.raised = True
            raise StoppedBeforeFirstStep(self.received[0])

    def arm(self, says_stops: bool) -> None:
        """From here a stop signal ends the command at once; one received before, now. `says_stops`: this process says
        how a stop ends its world (rank 0), which tells a local world's launcher so."""
        self.install()
        if says_stops and (note := os.environ.get(STOP_NOTE_ENV)):
            Path(note).write_text("rank 0 says how a stop signal ends this world\n")
        self.armed = True
        if self.received:
            self._raise()

    def stop(self) -> StoppedBeforeFirstStep | None:
        """The stop, if a signal came. A call, so that a signal still pending runs its handler first."""
        return StoppedBeforeFirstStep(self.received[0]) if self.received else None

    def release(self, redeliver: bool = False) -> None:
        """The usual handlers back; with `redeliver`, a signal recorded and not acted on gets its usual effect now."""
        usual, self.usual = self.usual, {}
        for sig, handler in usual.items():
            signal.signal(sig, handler)
        if redeliver and not self.armed:
            for sig in dict.fromkeys(self.received):
                os.kill(os.getpid(), sig)


def taken_over(sig: int, handler) -> tuple[object, StoppedBeforeFirstStep | None]:
    """For the trainer taking signal `sig` over from `handler`: the handler to put back after its loop (for a StartUp's,
    the one before it), and the stop that StartUp recorded, if any (its exception swallowed on the way: raised in a
    `__del__`, say)."""
    start_up = getattr(handler, "__self__", None)
    if not isinstance(start_up, StartUp):
        return handler, None
    return start_up.usual.get(sig, signal.SIG_DFL), start_up.stop()


def stopped_before_first_step(what: str, checkpoints: bool, last_checkpoint: str) -> tuple[int, str]:
    """(exit code, the line to say) for a stop before the first step; `what` happened ("SIGTERM received");
    `last_checkpoint` as Checkpointer.last_complete says it. The line of exit 2 is a refusal's (the CLI prefixes
    `error: `)."""
    if checkpoints:
        return PREEMPTED_EXIT, (f"[shardwright] {what} before the first step: stopped with nothing trained or saved, "
                                f"the last checkpoint is {last_checkpoint}; exit code {PREEMPTED_EXIT}: run the same "
                                f"command to start again")
    return USER_ERROR_EXIT, (f"{what} before the first step: stopped with nothing trained or saved "
                             f"(checkpoint.enabled=false); run the same command to start again")
